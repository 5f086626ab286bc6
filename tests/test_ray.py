"""Ray Data: InvertBatches / EncodeBatches in actors of a local Ray instance, and run_ray.

The whole file starts one local Ray (2 CPUs) and six actor pools (seven actors); on 2 cores it
takes 35-50 s (shared machine), most of it actors starting and importing torch and open_clip.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import crossgap_fast as cg
from crossgap_fast.pipeline.inputs import load_input

ray = pytest.importorskip("ray")
cgray = pytest.importorskip("crossgap_fast.pipeline.ray_engine")

STEPS = 2
#: Features of the same items inverted in different batches agree to float rounding only (the
#: README's "Per-sample independence": the batch size changes how matrix products round).
#: Measured here on crossgap-tiny, 2 steps, batches of 2 / 3 / 4 in actors against 10 (or 4-5)
#: in this process: features differ by up to 6.0e-6 (entries reach about 3.4: 3e-6 relative),
#: tokens by up to 2.9e-7. The bounds below are about 17x that; a wrong start (another item's
#: seed, as batch-local ids would give) moves the features by about 4 (checked below).
FEATURE_ATOL = 1e-4
TOKEN_ATOL = 5e-6


def _factory():
    """A zero-argument factory of the ``tiny`` fixture's model (conftest: seed 0, random
    weights). Defined inside a function so that it is pickled by value: the actors cannot
    import this test module."""
    def tiny_model() -> cg.ClipModel:
        torch.manual_seed(0)
        return cg.load_model("crossgap-tiny", pretrained=None)

    return tiny_model


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module; workers find this checkout through the working
    directory Ray puts on their path."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def oti_config() -> cg.InversionConfig:
    return cg.InversionConfig(method="oti", steps=STEPS)


def _invert(ds, model, config, kind: str, batch_size: int, actors: int = 1) -> dict[str, np.ndarray]:
    """All output rows of ``map_batches(InvertBatches)``, sorted by index."""
    out = ds.map_batches(
        cgray.InvertBatches, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": model, "config": config, "kind": kind, "device": "cpu"},
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    batches = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(cols["index"])
    return {k: v[order] for k, v in cols.items()}


def _errors(out: dict) -> list:
    """The ``error`` column as a list, None where the item is fine: Ray hands a column that is
    null throughout back to numpy as NaN floats."""
    return [e if isinstance(e, str) else None for e in out["error"]]


def _close(got: np.ndarray | torch.Tensor, want: torch.Tensor, atol: float) -> None:
    got = torch.as_tensor(np.asarray(got))
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"max difference {diff:.3g} > {atol}"


# --------------------------------------------------------------------------------------------
# map_batches
# --------------------------------------------------------------------------------------------
def test_features_match_one_process(ray_local, tiny, oti_config):
    """10 feature rows equal one Inverter run over all 10 here: through map_batches in batches
    of 3 (model from a factory, 1 actor) and through run_ray in batches of 4 (the live model
    pickled into a pool of up to 2 actors, shards of 4)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, tiny.embed_dim, generator=g)
    want = cg.Inverter(tiny, oti_config).run(x, sample_ids=range(10))
    want_loss = 1 - F.cosine_similarity(want.features, x, dim=-1)

    ds = ray.data.from_items([{"index": i, "features": x[i].numpy()} for i in range(10)])
    got = _invert(ds, _factory(), oti_config.to_dict(), "images", batch_size=3)
    assert got["index"].tolist() == list(range(10))
    assert set(_errors(got)) == {None}  # null when fine
    _close(got["features"], want.features, FEATURE_ATOL)
    _close(got["tokens"], want.tokens, TOKEN_ATOL)
    _close(got["targets"], x, 0.0)
    _close(got["loss"], want_loss, 1e-5)

    written: dict[int, dict] = {}
    cgray.run_ray(load_input(x, "images"), tiny, oti_config, kind="images",
                  shard_ranges=[(0, 4), (4, 8), (8, 10)], skip=set(), write_shard=written.__setitem__,
                  batch_size=4, actors=2, device="cpu", progress=False)
    assert sorted(written) == [0, 1, 2]
    assert written[1]["indices"].tolist() == [4, 5, 6, 7] and written[1]["names"] == ["4", "5", "6", "7"]
    cat = {k: torch.cat([written[i][k] for i in range(3)]) for k in ("features", "targets", "tokens", "losses")}
    _close(cat["features"], want.features, FEATURE_ATOL)
    _close(cat["tokens"], want.tokens, TOKEN_ATOL)
    _close(cat["targets"], x, 0.0)
    _close(cat["losses"], want_loss, 1e-5)
    # the check has teeth: starts seeded by other ids (as batch-local ids would give) differ
    other = cg.Inverter(tiny, oti_config).run(x, sample_ids=range(100, 110))
    assert (other.features - want.features).abs().max() > 100 * FEATURE_ATOL


def _png(path, seed: int, size=(40, 36)) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_image_items_with_a_corrupt_file(ray_local, tiny, oti_config, tmp_path):
    """Image paths decoded in the actor: the corrupt file's row keeps its index, NaN numbers
    and the reason; the other rows equal encoding + inverting them in one process."""
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        _png(p, i)
        paths.append(str(p))
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    ds = ray.data.from_items([{"index": 10 + i, "item": p} for i, p in enumerate(paths)])
    got = _invert(ds, _factory(), oti_config, "images", batch_size=2)

    assert got["index"].tolist() == [10, 11, 12, 13, 14]
    assert got["error"][2].startswith("unreadable image (")
    assert [e for k, e in enumerate(_errors(got)) if k != 2] == [None] * 4
    for col in ("features", "targets", "tokens", "loss"):
        assert np.isnan(got[col][2]).all()
    ok = [0, 1, 3, 4]
    feats = cg.encode_images([Image.open(paths[k]) for k in ok], tiny)
    want = cg.Inverter(tiny, oti_config).run(feats, sample_ids=[10 + k for k in ok])
    _close(got["targets"][ok], feats, 1e-5)
    _close(got["features"][ok], want.features, FEATURE_ATOL)


def test_texts(ray_local, tiny):
    """OVI of texts encoded in the actor; an empty text is an error row, not a failed batch."""
    config = cg.InversionConfig(method="ovi", steps=STEPS)
    texts = ["a red car", "a dog on a beach", "", "two cats", "a tree"]
    ds = ray.data.from_items([{"index": i, "text": t} for i, t in enumerate(texts)])
    got = _invert(ds, _factory(), {"steps": STEPS}, "texts", batch_size=2)

    assert _errors(got) == [None, None, "empty text", None, None]
    assert np.isnan(got["features"][2]).all()
    ok = [0, 1, 3, 4]
    feats = cg.encode_texts([texts[k] for k in ok], tiny)
    want = cg.Inverter(tiny, config).run(feats, sample_ids=ok)
    _close(got["targets"][ok], feats, 1e-5)
    _close(got["features"][ok], want.features, FEATURE_ATOL)
    _close(got["tokens"][ok], want.tokens, TOKEN_ATOL)


# --------------------------------------------------------------------------------------------
# In one process (no actors): the decoders and the checks
# --------------------------------------------------------------------------------------------
def test_image_arrays_bytes_and_paths_agree(tiny, tmp_path):
    """``image`` as HWC arrays (ray.data.read_images) or encoded bytes gives what ``item``
    paths give; a bad entry of each is an error row."""
    arrays = [_png(tmp_path / f"{i}.png", i) for i in range(3)]
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    encoded = [(tmp_path / f"{i}.png").read_bytes() for i in range(3)]
    fn = cgray.EncodeBatches(tiny, "images", "cpu")
    index = np.arange(4)
    by_path = fn({"index": index, "item": np.array(paths + [str(tmp_path / "missing.png")], dtype=object)})
    by_array = fn({"index": index, "image": np.array(arrays + [np.zeros((0, 3, 3), np.uint8)], dtype=object)})
    by_bytes = fn({"index": index, "image": np.array(encoded + [b"junk"], dtype=object)})
    assert by_path["error"][3] == "file not found"
    assert by_array["error"][3].startswith("unreadable image (")
    assert by_bytes["error"][3].startswith("unreadable image (")
    want = cg.encode_images([Image.open(p) for p in paths], tiny)
    for out in (by_path, by_array, by_bytes):
        assert out["index"].tolist() == [0, 1, 2, 3]
        assert list(out["error"][:3]) == [None, None, None]
        _close(out["features"][:3], want, 1e-5)
        assert np.isnan(out["features"][3]).all()
    # a uniform-size batch arrives from Ray as one (N, H, W, C) array
    stacked = fn({"index": np.arange(3), "image": np.stack(arrays)})
    _close(stacked["features"], want, 1e-5)


def test_bad_batches_and_settings(tiny, oti_config):
    """A malformed batch or setting is refused with a message naming it; bad feature rows
    are error rows with the feature input's own reasons."""
    fn = cgray.InvertBatches(tiny, oti_config, "images", "cpu")
    with pytest.raises(ValueError, match="exactly one of the columns"):
        fn({"index": np.arange(2), "text": np.array(["a", "b"]), "item": np.array(["x", "y"])})
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        fn({"index": np.arange(2), "features": np.ones((2, 7), np.float32)})
    out = fn({"index": np.array([4, 5, 6]), "features": np.array(
        [[1.0] * 32, [float("nan")] * 32, [0.0] * 32], np.float32), "name": np.array(["a", "b", "c"])})
    assert out["error"].tolist() == [None, "NaN or infinite values", "all-zero feature (no direction to match)"]
    assert out["name"].tolist() == ["a", "b", "c"]  # other columns pass through
    empty = fn({"index": np.zeros(0, np.int64), "features": np.zeros((0, 32), np.float32)})
    assert empty["tokens"].shape == (0, 1, tiny.model.transformer.width)
    with pytest.raises(ValueError, match="kind='texts' runs OVI"):
        cgray.InvertBatches(tiny, oti_config, "texts", "cpu")
    with pytest.raises(ValueError, match="kind must be"):
        cgray.InvertBatches(tiny, oti_config, "videos", "cpu")
    with pytest.raises(TypeError, match=r"\(name, pretrained\) pair"):
        cgray.InvertBatches(42, oti_config, "images", "cpu")
    with pytest.raises(ValueError, match="nothing to encode"):
        cgray.EncodeBatches(tiny, "images", "cpu")({"index": np.arange(1), "features": np.ones((1, 32))})
    with pytest.raises(ValueError, match="columns features, text, not 'item'"):
        cgray.EncodeBatches(tiny, "texts", "cpu")({"index": np.arange(1), "item": np.array(["a.png"])})
    texts = load_input(["a cat"], "texts")
    with pytest.raises(ValueError, match="a gallery of texts cannot run as kind='images'"):
        cgray.run_ray(texts, tiny, oti_config, kind="images", shard_ranges=[(0, 1)], skip=set(),
                      write_shard=lambda i, p: None, batch_size=1, actors=1, device="cpu")


def test_read_images_output_as_it_comes(ray_local, tiny, oti_config, tmp_path):
    """``ray.data.read_images`` output (``image``, ``path``) goes into InvertBatches as it
    comes: no ``index`` column (each item's is a stable hash of its path), errors null, and
    the numbers equal one Inverter run here seeded by those indices."""
    paths = []
    for i in range(4):
        _png(tmp_path / f"{i}.png", i, size=(40 + i, 36))
        paths.append(str(tmp_path / f"{i}.png"))
    ds = ray.data.read_images(str(tmp_path), include_paths=True)
    got = _invert(ds, _factory(), oti_config.to_dict(), "images", batch_size=3)
    assert sorted(got["path"]) == paths and _errors(got) == [None] * 4
    want_index = [cgray.batches.stable_hash(p) for p in got["path"]]
    assert got["index"].tolist() == want_index
    x = cg.encode_images([Image.open(p) for p in got["path"]], tiny)
    want = cg.Inverter(tiny, oti_config).run(x, sample_ids=want_index)
    _close(got["targets"], x, 1e-5)
    _close(got["features"], want.features, FEATURE_ATOL)


def test_read_webdataset_output_as_it_comes(ray_local, tiny, oti_config, tmp_path):
    """``ray.data.read_webdataset`` output (``jpg``, ``txt``, ``json``, ``__key__``): images
    from ``jpg``, texts from ``txt``, indices hashed from ``__key__``; a ``column_map`` takes
    other names."""
    arrays = []
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tf:
        for i in range(3):
            rgb = np.random.default_rng(i).integers(0, 256, (30, 28, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, "PNG")  # lossless: the pixels are known here
            arrays.append(rgb)
            for suffix, data in (("jpg", buf.getvalue()), ("txt", f"caption {i}".encode()),
                                 ("json", b'{"width": 28}')):
                info = tarfile.TarInfo(f"{i:05d}.{suffix}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    batch = ray.data.read_webdataset(str(tmp_path / "shard-0.tar")).take_batch(10, batch_format="numpy")
    keys = [str(k) for k in batch["__key__"]]
    images = cgray.EncodeBatches(tiny, "images", "cpu")(batch)
    assert images["index"].tolist() == [cgray.batches.stable_hash(k) for k in keys]
    assert list(images["error"]) == [None] * 3 and list(images["txt"]) == list(batch["txt"])  # passed through
    _close(images["features"], cg.encode_images([Image.fromarray(a) for a in arrays], tiny), 1e-5)
    texts = cgray.EncodeBatches(tiny, "texts", "cpu")(batch)
    _close(texts["features"], cg.encode_texts([f"caption {i}" for i in range(3)], tiny), 1e-5)
    renamed = {"picture": batch["jpg"], "id": np.arange(3) + 10}
    mapped = cgray.EncodeBatches(tiny, "images", "cpu", column_map={"picture": "image"})(renamed)
    assert mapped["index"].tolist() == [10, 11, 12]
    _close(mapped["features"], images["features"], 0.0)
    # read_images without paths: each index is a stable hash of the pixels (same image, same index)
    pixels = np.empty(4, dtype=object)
    pixels[:] = arrays + [arrays[0].copy()]
    bare = cgray.EncodeBatches(tiny, "images", "cpu")({"image": pixels})
    assert bare["index"][0] == bare["index"][3] == cgray.batches.stable_hash(arrays[0]) != bare["index"][1]


def test_named_model_matches_the_fixture(tiny):
    """("crossgap-tiny", "random") is loaded under the command line's fixed seed: every actor
    builds the same weights (here: the ``tiny`` fixture's, made under seed 0 too)."""
    built = cgray.build_model(("crossgap-tiny", "random"))
    for a, b in zip(built.model.state_dict().values(), tiny.model.state_dict().values()):
        assert torch.equal(a, b)


def test_importing_the_package_does_not_import_ray():
    code = textwrap.dedent("""
        import sys
        import crossgap_fast
        assert "ray" not in sys.modules, "import crossgap_fast imported ray"
        sys.modules["ray"] = None  # as if Ray were not installed
        try:
            import crossgap_fast.pipeline.ray_engine
        except ImportError as err:
            print(err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "crossgap-fast[ray]"' in out.stdout


# --------------------------------------------------------------------------------------------
# run_ray: the driver behind --engine ray
# --------------------------------------------------------------------------------------------
def test_run_ray_writes_each_shard_once(ray_local, tiny, oti_config, tmp_path):
    """A gallery of 11 images in shards of 3 (shard 1 finished already, skipped; one file
    corrupt; shard 3's only items fail the input checks): every other shard is written once,
    in full, equal to a single-process run; decode failures come back in "errors"."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(11):
        _png(root / f"{i:02d}.png", i)
    (root / "07.png").write_bytes(b"not a png")
    gallery = load_input(str(root), "images")
    gallery.issues[9] = gallery.issues[10] = {"level": "error", "reason": "made unusable"}
    ranges = [(0, 3), (3, 6), (6, 9), (9, 11)]
    written: dict[int, dict] = {}

    def write_shard(index: int, payload: dict) -> None:
        assert index not in written, f"shard {index} written twice"
        written[index] = payload

    cgray.run_ray(gallery, _factory(), oti_config, kind="images", shard_ranges=ranges, skip={1},
                  write_shard=write_shard, batch_size=2, actors=1, device="cpu", progress=False)

    assert sorted(written) == [0, 2, 3]
    assert written[0]["indices"].tolist() == [0, 1, 2] and written[0]["errors"] == []
    assert written[2]["indices"].tolist() == [6, 8]
    assert [i for i, _ in written[2]["errors"]] == [7]
    assert written[2]["errors"][0][1].startswith("unreadable image (")
    assert written[3]["indices"].tolist() == [] and written[3]["tokens"].shape == (0, 1, 32)
    assert written[0]["names"] == ["00.png", "01.png", "02.png"]
    assert written[2]["columns"] == {"image_path": [str(root / "06.png"), str(root / "08.png")]}

    idx = [0, 1, 2, 6, 8]
    feats = cg.encode_images([Image.open(root / f"{i:02d}.png") for i in idx], tiny)
    want = cg.Inverter(tiny, oti_config).run(feats, sample_ids=idx)
    got = {k: torch.cat([written[0][k], written[2][k]]) for k in ("features", "targets", "tokens", "losses")}
    _close(got["targets"], feats, 1e-5)
    _close(got["features"], want.features, FEATURE_ATOL)
    _close(got["tokens"], want.tokens, TOKEN_ATOL)
    _close(got["losses"], 1 - F.cosine_similarity(want.features, feats, dim=-1), 1e-5)
    for payload in written.values():
        assert all(v.dtype == torch.float32 for k, v in payload.items() if k in got)


def _webdataset(path, n: int, corrupt: int) -> list[np.ndarray]:
    """A webdataset tar of ``n`` PNG samples; sample ``corrupt`` holds no image data."""
    arrays = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            rgb = np.random.default_rng(100 + i).integers(0, 256, (24, 20, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, "PNG")
            data = b"no image" if i == corrupt else buf.getvalue()
            info = tarfile.TarInfo(f"s{i:03d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            arrays.append(rgb)
    return arrays


def test_run_ray_webdataset_members(ray_local, tiny, oti_config, tmp_path):
    """Tar members (locators, not paths) travel through Ray and are decoded in the actor,
    here with a model named as on the command line (same weights as ``tiny``)."""
    arrays = _webdataset(tmp_path / "shard.tar", 5, corrupt=1)
    gallery = load_input(str(tmp_path / "shard.tar"), "images")
    written: dict[int, dict] = {}
    cgray.run_ray(gallery, ("crossgap-tiny", "random"), oti_config, kind="images", shard_ranges=[(0, 5)],
                  skip=set(), write_shard=written.__setitem__, batch_size=2, actors=1, device="cpu",
                  progress=False)
    payload = written[0]
    assert payload["indices"].tolist() == [0, 2, 3, 4]
    assert payload["names"] == ["s000", "s002", "s003", "s004"]
    assert payload["columns"]["image_path"][0] == f"{tmp_path / 'shard.tar'}#s000.png"
    assert [i for i, _ in payload["errors"]] == [1]
    feats = cg.encode_images([Image.fromarray(arrays[i]) for i in (0, 2, 3, 4)], tiny)
    want = cg.Inverter(tiny, oti_config).run(feats, sample_ids=[0, 2, 3, 4])
    _close(payload["targets"], feats, 1e-5)
    _close(payload["features"], want.features, FEATURE_ATOL)


def test_run_ray_nothing_left(tiny, oti_config):
    """Every shard finished already: no Ray, nothing written."""
    nothing: dict[int, dict] = {}
    cgray.run_ray(load_input(torch.randn(7, 32), "images"), tiny, oti_config, kind="images",
                  shard_ranges=[(0, 4), (4, 7)], skip={0, 1}, write_shard=nothing.__setitem__,
                  batch_size=3, actors=1, device="cpu", progress=False)
    assert nothing == {}


def test_run_ray_shards_without_usable_items(tiny, oti_config):
    """Shards whose items all failed the input checks are written empty (shapes from the
    model), for inversion and for encoding, without starting Ray."""
    x = torch.randn(6, tiny.embed_dim)
    x[3:] = float("nan")
    features = load_input(x, "images")
    texts = load_input(["a cat", "", " "], "texts")
    width = tiny.model.transformer.width
    for gallery, config in ((features, oti_config), (texts, None)):
        written: dict[int, dict] = {}
        cgray.run_ray(gallery, tiny, config, kind=gallery.kind if config is None else "images",
                      shard_ranges=[(0, 3), (3, 6)] if config else [(0, 1), (1, 3)], skip={0},
                      write_shard=written.__setitem__, batch_size=2, actors=1, device="cpu")
        assert list(written) == [1]
        payload = written[1]
        assert payload["indices"].tolist() == [] and payload["names"] == [] and payload["errors"] == []
        assert payload["features"].shape == (0, tiny.embed_dim)
        if config is not None:
            assert payload["tokens"].shape == (0, 1, width) and payload["losses"].shape == (0,)
        else:
            assert "tokens" not in payload and payload["columns"] == {"caption": []}
    with pytest.raises(ValueError, match="already holds features: nothing to encode"):
        cgray.run_ray(features, tiny, None, kind="images", shard_ranges=[(0, 6)], skip=set(),
                      write_shard=written.__setitem__, batch_size=2, actors=1, device="cpu")


def test_run_ray_actor_failure_is_one_line(ray_local, oti_config):
    """An actor that cannot build its model ends the run with one line naming the cause."""
    gallery = load_input(torch.randn(3, 32), "images")
    with pytest.raises(cgray.RayRunError, match=r"^the Ray run failed: ValueError: unknown model name "
                       r"'no-such-model'.*; 0 shard\(s\) written before are kept$") as info:
        cgray.run_ray(gallery, ("no-such-model", "random"), oti_config, kind="images", shard_ranges=[(0, 3)],
                      skip=set(), write_shard=lambda i, p: None, batch_size=2, actors=1, device="cpu",
                      progress=False)
    assert "\n" not in str(info.value)


def test_engine_ray_store_equals_the_local_engine(ray_local, tiny, tmp_path):
    """``invert_gallery(..., engine="ray")``: the same output store as the local engine, up to
    the rounding of other batches; every shard made once, the manifest complete."""
    from test_cli import recorded_shards

    feats = torch.randn(10, tiny.embed_dim, generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "f.npy", feats.numpy())
    kw = dict(steps=STEPS, shard_size=4, progress=False)
    cg.invert_gallery(str(tmp_path / "f.npy"), tmp_path / "local", tiny, **kw)
    summary = cg.invert_gallery(str(tmp_path / "f.npy"), tmp_path / "ray", tiny, engine="ray", ray_actors=2,
                                batch_size=3, **kw)
    assert summary.complete and summary.items_done == 10 and summary.shards_done == 3
    a, b = cg.load_inversions(tmp_path / "local"), cg.load_inversions(tmp_path / "ray")
    assert a.names == b.names and torch.equal(a.indices, b.indices) and torch.equal(a.targets, b.targets)
    _close(b.features, a.features, FEATURE_ATOL)
    _close(b.tokens, a.tokens, TOKEN_ATOL)
    assert recorded_shards(tmp_path / "ray") == [0, 1, 2]
    # the actors resolve precision "auto" on their own device: recorded as asked, not as the driver's
    assert a.manifest["engine"]["precision"] == "fp32" and b.manifest["engine"]["precision"] == "auto"
    with pytest.raises(ValueError, match="warm_start is not supported"):
        cg.invert_gallery(str(tmp_path / "f.npy"), tmp_path / "x", tiny, engine="ray", warm_start=40, **kw)


def test_engine_ray_in_windows_of_shards(ray_local, tiny, tmp_path, monkeypatch):
    """The Ray engine claims a bounded window of shards at a time; windows of one shard give
    the same store, each shard made once."""
    from crossgap_fast.pipeline import worker as gallery_mod
    from test_cli import recorded_shards

    from crossgap_fast.pipeline.ray_engine import driver

    monkeypatch.setattr(gallery_mod, "RAY_WINDOW_ITEMS", 1)
    windows = []
    run_ray = driver.run_ray
    monkeypatch.setattr(driver, "run_ray", lambda *a, **k: windows.append(1) or run_ray(*a, **k))
    feats = torch.randn(7, tiny.embed_dim, generator=torch.Generator().manual_seed(6))
    np.save(tmp_path / "f.npy", feats.numpy())
    kw = dict(steps=STEPS, shard_size=3, progress=False)
    cg.invert_gallery(str(tmp_path / "f.npy"), tmp_path / "local", tiny, **kw)
    summary = cg.invert_gallery(str(tmp_path / "f.npy"), tmp_path / "ray", tiny, engine="ray", **kw)
    assert summary.complete and summary.shards_done == 3 and len(windows) == 3  # one window per shard
    assert recorded_shards(tmp_path / "ray") == [0, 1, 2]
    a, b = cg.load_inversions(tmp_path / "local"), cg.load_inversions(tmp_path / "ray")
    assert a.names == b.names
    _close(b.features, a.features, FEATURE_ATOL)


def test_engine_ray_on_the_command_line(ray_local, tmp_path, capsys):
    from crossgap_fast import cli

    feats = np.random.default_rng(8).standard_normal((5, 32)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    args = ["invert", "images", "--input", str(tmp_path / "f.npy"), "--model", "crossgap-tiny", "--pretrained",
            "random", "--steps", "2", "--shard-size", "2", "--no-progress", "--engine", "ray", "--ray-actors", "2"]
    assert cli.main(args + ["--out", str(tmp_path / "out")]) == 0
    assert "inverted (OTI) 5 images" in capsys.readouterr().out
    inv = cg.load_inversions(tmp_path / "out")
    assert inv.indices.tolist() == list(range(5))
    _close(inv.targets, F.normalize(torch.from_numpy(feats), dim=-1), 1e-6)  # stored normalised (the default)
    assert cli.main(args + ["--out", str(tmp_path / "w"), "--warm-start", "40"]) == 2
    assert "warm_start is not supported with engine='ray'" in capsys.readouterr().err
