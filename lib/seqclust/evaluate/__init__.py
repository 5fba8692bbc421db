"""How good the segments are: internal, stability, external, downstream, drift, baselines."""
