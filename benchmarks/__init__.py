"""Benchmark suite for connshare (baselines, reference implementation, connshare itself)."""
