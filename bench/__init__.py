"""Benchmarks: each measures docqa and its baseline in the same run and prints the ratio."""
