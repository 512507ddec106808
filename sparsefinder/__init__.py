"""Sparsefinder: gold entmax attention graphs, their predictors and metrics."""

__version__ = "0.1.0"
