"""Benchmark harness: datasets, scoring, runners (offline and remote), reports."""
