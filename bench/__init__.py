"""Benchmarks: `python -m bench <suite>`; results committed under bench/results/."""
