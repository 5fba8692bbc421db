"""Segments: the k sweep, k-means, refinement and per-segment profiles."""
