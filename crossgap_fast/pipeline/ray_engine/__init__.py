"""Ray Data for clusters: encode and invert batches in actors that each hold one model.

:class:`InvertBatches` is a callable class for ``ray.data.Dataset.map_batches``. Each actor
builds one :class:`~crossgap_fast.models.ClipModel` and one
:class:`~crossgap_fast.inversion.inverter.Inverter` (template, prefix cache, compiled step) in its
constructor and reuses them for every batch::

    import ray
    from crossgap_fast.pipeline.ray_engine import InvertBatches

    ds = ray.data.read_parquet("items.parquet")   # columns: index (int64), item (image path)
    out = ds.map_batches(
        InvertBatches, batch_format="numpy", batch_size=256, num_gpus=1,
        fn_constructor_kwargs={"model": ("ViT-B-32", "openai"), "config": {"method": "oti"},
                               "kind": "images", "device": "auto"},
        compute=ray.data.ActorPoolStrategy(size=8),
    )

An item's random start is seeded by its global ``index`` (``sample_ids``), so the results do not
depend on how Ray cuts the data into batches, blocks or actors (up to float rounding, see the
README's "Per-sample independence"). :func:`run_ray` is the driver behind
``crossgap invert ... --engine ray``: it runs a gallery's unfinished shards through the actors
and hands each shard's results to the store as soon as the shard is complete.

The parts: :mod:`.batches` (building an actor's model, decoding and encoding a batch),
:mod:`.actors` (the ``map_batches`` callables), :mod:`.shards` (gathering returned rows into
shards) and :mod:`.driver` (:func:`run_ray`). Ray is an optional dependency
(``pip install "crossgap-fast[ray]"``); ``import crossgap_fast`` never imports it.
"""

from crossgap_fast.errors import RayRunError
from crossgap_fast.pipeline.ray_engine.actors import EncodeBatches, InvertBatches
from crossgap_fast.pipeline.ray_engine.batches import ModelSpec, build_model
from crossgap_fast.pipeline.ray_engine.driver import run_ray

__all__ = ["EncodeBatches", "InvertBatches", "ModelSpec", "RayRunError", "build_model", "run_ray"]
