"""Evaluation: does inversion help? Retrieval metrics (:mod:`.metrics`, :mod:`.revisited_metrics`),
training-free baselines (:mod:`.baselines`), reports from features (:mod:`.reports`), the benchmark
pipelines (:mod:`.harness`) with their on-disk caches (:mod:`.caches`), and the dataset loaders
(:mod:`.datasets`)."""
