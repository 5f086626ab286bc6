"""Galleries at scale: inputs, the output store, leased shard tasks, encoding and the run loop
(local processes or Ray Data)."""
