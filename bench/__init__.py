"""Benchmarks and sizing scripts, each run as `python -m bench.<name>`."""
