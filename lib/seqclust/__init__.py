"""seqclust: user-behaviour segments from e-commerce event logs, with evidence of their quality."""

__version__ = "0.1.0"
