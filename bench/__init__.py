"""Benchmarks of cmserve; run each from the repository root as `python -m bench.<name>` (BENCHMARKS.md)."""
