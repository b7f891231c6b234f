"""Random-weight SDXL-architecture models and tiny data for tests, the demo and benchmarks."""
