"""Benchmarks: scripts run as ``python benchmarks/<name>.py``; their core functions are importable for tests."""
