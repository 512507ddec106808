"""Primitives: exact entmax kernels and truly sparse (clustered) entmax attention."""
