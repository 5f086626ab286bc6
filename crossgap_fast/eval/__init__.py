"""Retrieval evaluation: metrics, baselines, the benchmark harness and the dataset loaders."""
