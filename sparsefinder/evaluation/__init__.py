"""Evaluation floor: the sweep, Pareto fronts, test-time approximation, learned windows, interpretation."""
