"""Load generation and benchmarks (see README.md in this folder)."""
