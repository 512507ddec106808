"""Evaluation floor: every figure (Plotly)."""
