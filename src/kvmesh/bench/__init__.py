"""Benchmark building blocks: trace loaders and workload generators."""
