"""MAOF benchmarks: `make bench` (python -m bench). See README, "Benchmarks"."""
