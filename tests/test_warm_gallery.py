"""Warm-started gallery runs (``invert_gallery(warm_start=N)`` / ``crossgap invert --warm-start N``):
calibration items inverted exactly, every other item from the fitted map's prediction; the
choice and the results independent of shards, ranks and interruptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast.pipeline import calibration as cal_mod
from crossgap_fast.errors import SettingsMismatchError
from crossgap_fast.inversion.warm_start import load_warm_start
from test_cli import SLOW_WRAPPER, kill_when_written, recorded_shards

N_ITEMS, N_CAL, WARM, EXACT = 90, 40, 4, 30
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def feats_file(tmp_path_factory):
    """Features with structure (a few clusters), as real galleries have."""
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 32, generator=gen)
    x = centres[torch.arange(N_ITEMS) % 6] + 0.3 * torch.randn(N_ITEMS, 32, generator=gen)
    path = tmp_path_factory.mktemp("in") / "feats.npy"
    np.save(path, x.numpy())
    return path, x


def _run(tiny, src, out, **kw):
    args = dict(kind="images", warm_start=N_CAL, steps=WARM, calibration_steps=EXACT, shard_size=16,
                progress=False)
    args.update(kw)
    return cg.invert_gallery(str(src), out, tiny, **args)


@pytest.fixture(scope="module")
def warm_run(tiny, feats_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("warm") / "out"
    summary = _run(tiny, feats_file[0], out)
    return out, summary


def test_calibration_items_exact_and_the_rest_warm_started(tiny, feats_file, warm_run):
    out, summary = warm_run
    _, x = feats_file
    inv = cg.load_inversions(out)
    assert inv.complete and len(inv) == N_ITEMS
    cal = inv.calibration
    assert int(cal.sum()) == N_CAL
    ids = inv.indices[cal].tolist()
    assert ids == cal_mod.calibration_indices(range(N_ITEMS), N_CAL, seed=0)
    # the calibration rows are the exact inversion, started as any exact run starts them
    exact = cg.oti(x[ids], tiny, steps=EXACT, sample_ids=ids)
    unit = lambda t: torch.nn.functional.normalize(t, dim=-1)  # noqa: E731  (stored normalised)
    torch.testing.assert_close(inv.features[cal], unit(exact.features), atol=1e-5, rtol=0)
    # every other row: WARM steps from the stored map's prediction
    ws = load_warm_start(out / cal_mod.MAP_FILE)
    rest = inv.indices[~cal].tolist()
    warm = cg.oti(x[rest], tiny, steps=WARM, init=ws.init(x[rest]), sample_ids=rest)
    torch.testing.assert_close(inv.features[~cal], unit(warm.features), atol=1e-5, rtol=0)
    torch.testing.assert_close(inv.targets, unit(x), atol=1e-6, rtol=0)
    # the map is the one fitted on exactly those results
    refit = cg.fit_warm_start(x[ids], exact, model=tiny)
    np.testing.assert_allclose(ws.weight, refit.weight, atol=1e-6)
    w = summary.warm_start
    assert (w["calibration_items"], w["warm_items"]) == (N_CAL, N_ITEMS - N_CAL)
    assert (w["calibration_steps"], w["warm_steps"]) == (EXACT, WARM)
    assert w["warm_loss"] == pytest.approx(float(inv.losses[~cal].mean()), abs=1e-6)
    assert "warm start: 40 calibration item(s)" in summary.format()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["warm_start"] == {"items": N_CAL, "calibration_steps": EXACT}
    assert manifest["warm_start_result"]["warm_items"] == N_ITEMS - N_CAL


def test_warm_start_beats_a_random_start_at_the_same_steps(tiny, feats_file, warm_run):
    out, _ = warm_run
    _, x = feats_file
    inv = cg.load_inversions(out)
    rest = inv.indices[~inv.calibration].tolist()
    cold = cg.oti(x[rest], tiny, steps=WARM, sample_ids=rest)
    cold_loss = (1 - torch.nn.functional.cosine_similarity(cold.features, x[rest])).mean()
    assert float(inv.losses[~inv.calibration].mean()) < float(cold_loss) - 0.01


def test_results_do_not_depend_on_the_shard_size(tiny, feats_file, warm_run, tmp_path):
    other = tmp_path / "other"
    _run(tiny, feats_file[0], other, shard_size=7)
    a, b = cg.load_inversions(warm_run[0]), cg.load_inversions(other)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=0)


def test_calibration_choice_is_a_function_of_seed_and_index():
    ids = list(range(1000))
    chosen = cal_mod.calibration_indices(ids, 50, seed=7)
    assert len(chosen) == 50 and chosen == sorted(set(chosen))
    # order and holes in the candidate list do not move the choice of the others
    assert cal_mod.calibration_indices(ids[::-1], 50, seed=7) == chosen
    survivors = [i for i in ids if i not in chosen[:5]]
    again = cal_mod.calibration_indices(survivors, 45, seed=7)
    assert again == chosen[5:]
    assert cal_mod.calibration_indices(ids, 50, seed=8) != chosen


def test_interrupted_calibration_and_warm_phase_resume_to_the_same_result(tiny, feats_file, warm_run,
                                                                          tmp_path, monkeypatch):
    from crossgap_fast.pipeline.store import folder as store_mod

    src = feats_file[0]
    # killed after the calibration file, before the map: the calibration is redone
    out = tmp_path / "cal"
    real_fit = cal_mod.fit_warm_start
    monkeypatch.setattr(cal_mod, "fit_warm_start", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, src, out)
    assert (out / cal_mod.CALIBRATION_FILE).exists() and not (out / cal_mod.MAP_FILE).exists()
    monkeypatch.setattr(cal_mod, "fit_warm_start", real_fit)
    _run(tiny, src, out, resume=True)
    # killed in the warm phase after two shards: the stored map is reused
    out2 = tmp_path / "warm"
    real_write = store_mod.GalleryStore.write_shard
    calls = []

    def failing(self, index, payload, entry):
        if len(calls) == 2:
            raise KeyboardInterrupt()
        calls.append(index)
        return real_write(self, index, payload, entry)

    monkeypatch.setattr(store_mod.GalleryStore, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, src, out2)
    monkeypatch.setattr(store_mod.GalleryStore, "write_shard", real_write)
    map_time = (out2 / cal_mod.MAP_FILE).stat().st_mtime_ns
    summary = _run(tiny, src, out2, resume=True)
    assert summary.shards_skipped == 2 and (out2 / cal_mod.MAP_FILE).stat().st_mtime_ns == map_time
    full = cg.load_inversions(warm_run[0])
    for o in (out, out2):
        again = cg.load_inversions(o)
        assert torch.equal(again.features, full.features) and torch.equal(again.tokens, full.tokens)


def test_resume_refuses_other_warm_settings_and_another_models_map(tiny, feats_file, warm_run, tmp_path):
    with pytest.raises(SettingsMismatchError, match="warm_start"):
        _run(tiny, feats_file[0], warm_run[0], warm_start=50, resume=True)
    # same name, other weights: the store cannot tell, the map's fingerprint can
    out = tmp_path / "copy"
    out.mkdir()
    for f in os.listdir(warm_run[0]):
        if f in ("manifest.json", cal_mod.CALIBRATION_FILE, cal_mod.MAP_FILE):
            (out / f).write_bytes((warm_run[0] / f).read_bytes())
    torch.manual_seed(99)
    other = cg.load_model("crossgap-tiny")
    with pytest.warns(UserWarning, match="missing or changed"):  # no shard was copied
        with pytest.raises(Exception, match="warm start does not match: model fingerprint"):
            _run(other, feats_file[0], out, resume=True)


def test_bad_warm_start_settings(tiny, feats_file, tmp_path):
    with pytest.raises(ValueError, match="at least 32"):
        _run(tiny, feats_file[0], tmp_path / "a", warm_start=5)
    with pytest.raises(ValueError, match="warm start only"):
        cg.invert_gallery(str(feats_file[0]), tmp_path / "b", tiny, calibration_steps=10, progress=False)


# ---------------------------------------------------------------- the command line, SIGKILL
HOLD_CALIBRATION = """
import sys, time
from crossgap_fast.pipeline import calibration
real = calibration.fit_warm_start
def held(*a, **k):
    time.sleep(120)
calibration.fit_warm_start = held
from crossgap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_args(src, out):
    return ["invert", "images", "--input", str(src), "--out", str(out), "--model", "crossgap-tiny",
            "--pretrained", "random", "--warm-start", str(N_CAL), "--steps", str(WARM),
            "--calibration-steps", str(EXACT), "--shard-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def cli_full(feats_file, tmp_path_factory):
    full = tmp_path_factory.mktemp("cli") / "full"
    done = subprocess.run([sys.executable, "-m", "crossgap_fast", *_cli_args(feats_file[0], full)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warm start: 40 calibration item(s)" in done.stdout
    return full


def test_cli_two_ranks_equal_one_process(feats_file, cli_full, tmp_path):
    out = tmp_path / "ranks"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", "-m", "crossgap_fast", *_cli_args(feats_file[0], out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert recorded_shards(out) == list(range(manifest["num_shards"]))  # leased: each shard made once
    a, b = cg.load_inversions(cli_full), cg.load_inversions(out)
    assert torch.equal(a.calibration, b.calibration)
    torch.testing.assert_close(a.features, b.features, atol=1e-6, rtol=0)


def test_cli_sigkill_during_calibration_then_resume(feats_file, cli_full, tmp_path):
    src = feats_file[0]
    full = cli_full
    out = tmp_path / "killed"
    kill_when_written(HOLD_CALIBRATION, _cli_args(src, out), out / cal_mod.CALIBRATION_FILE, settle=0)
    resumed = subprocess.run([sys.executable, "-m", "crossgap_fast", *_cli_args(src, out), "--resume"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = cg.load_inversions(full), cg.load_inversions(out)
    assert torch.equal(a.features, b.features) and torch.equal(a.calibration, b.calibration)
    bad = subprocess.run([sys.executable, "-m", "crossgap_fast", *_cli_args(src, tmp_path / "x"),
                          "--warm-start", "3"], env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "at least 32" in bad.stderr


def test_cli_sigkill_during_the_warm_phase_then_resume(feats_file, cli_full, tmp_path):
    """Killed after the map is stored and one shard is finished: the resume reuses the map and
    the finished shard and ends equal to the uninterrupted run."""
    src = feats_file[0]
    out = tmp_path / "killed"
    kill_when_written(SLOW_WRAPPER, _cli_args(src, out), out / "metadata" / "metadata_00001.parquet")  # held before its entry
    map_time = (out / cal_mod.MAP_FILE).stat().st_mtime_ns
    resumed = subprocess.run([sys.executable, "-m", "crossgap_fast", *_cli_args(src, out), "--resume"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipped 1 finished shard" in resumed.stdout
    assert (out / cal_mod.MAP_FILE).stat().st_mtime_ns == map_time  # the stored map was reused
    a, b = cg.load_inversions(cli_full), cg.load_inversions(out)
    assert torch.equal(a.features, b.features) and torch.equal(a.tokens, b.tokens)
