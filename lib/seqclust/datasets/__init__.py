"""Generated event logs with known structure, for the demo, tests and benchmarks."""
