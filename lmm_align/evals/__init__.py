"""Benchmarks and ground-truth evaluations."""
