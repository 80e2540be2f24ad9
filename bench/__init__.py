"""Benchmarks: each runs its baseline beside the service in the same run and prints ratios."""
