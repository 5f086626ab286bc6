"""Galleries at scale: inputs, the output store, leased shard tasks, encoding and the run loop
(local processes or Ray Data).

:mod:`.run` holds the entry points (``invert_gallery``, ``encode_gallery``); :mod:`.settings`
checks their arguments; :mod:`.placement` picks the process's device; :mod:`.worker` is one
process's shard loop, with :mod:`.results` (a shard's results and their write),
:mod:`.warm_run` (the warm start's phases, on the calibration set of :mod:`.calibration`) and :mod:`.summary` (what a run did);
:mod:`.encode` decodes and encodes items ahead of the optimiser; :mod:`.tasks` and
:mod:`.leases` let workers share the shards; :mod:`.inputs` reads what a run gets;
:mod:`.store` owns the output folder; :mod:`.ray_engine` runs shards on Ray Data;
:mod:`.status` reports a run's progress.
"""
