"""Benchmarks (run as scripts, see docs/performance.md); not part of the installed package."""
