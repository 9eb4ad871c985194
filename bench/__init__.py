"""Benchmarks: scripts that print figures (and JSON); not tests."""
