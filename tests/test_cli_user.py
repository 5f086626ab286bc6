"""The command line as a new user meets it: a required ``--model``, a summary that
names the model and device, ``--precision``, grouped help, exit codes that tell "nothing ran"
from "too many items failed", ``--json``, one line for an unreachable hub, progress bars that
never overshoot, messages that say what happened, rates that count the calibration, a quiet
Ray. Tiny model, ``--pretrained random``, in-process unless the point is the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast import cli
from crossgap_fast.cli import hub
from crossgap_fast.cli.messages import EXIT_BAD_INPUT, EXIT_DEVICE, EXIT_ITEMS_FAILED
from crossgap_fast.pipeline import calibration as cal_mod
from crossgap_fast.pipeline import worker as worker_mod
from crossgap_fast.pipeline.status import read_status
from crossgap_fast.progress import Progress
from test_cli import make_images

TINY = ["--model", "crossgap-tiny", "--pretrained", "random", "--no-progress", "--workers", "0"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def feats(tmp_path) -> Path:
    path = tmp_path / "f.npy"
    np.save(path, torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).numpy())
    return path


# ------------------------------------------------------------------------------- --model
@pytest.mark.parametrize("command", [
    ["invert", "images", "--input", "x", "--out", "o"],
    ["encode", "texts", "--input", "x", "--out", "o"],
    ["eval", "retrieval", "--dataset", "csv", "--dataroot", "x"],
    ["eval", "paper", "--dataroot", "x"],
])
def test_model_is_required(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(command + ["--pretrained", "random"])
    assert exc.value.code == EXIT_BAD_INPUT
    assert "--model" in capsys.readouterr().err


def test_the_demo_model_is_one_word_away(tmp_path, capsys):
    path = tmp_path / "f.npy"
    np.save(path, torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).numpy())
    code = cli.main(["invert", "images", "--input", str(path), "--out", str(tmp_path / "o"), "--steps", "1",
                     "--model", "crossgap-demo", "--no-progress", "--workers", "0"])
    assert code == 0
    assert "model: crossgap-demo (pretrained crossgap-demo.pt) on cpu" in capsys.readouterr().out


# ------------------------------------------------------------- summary, --precision, --json
def test_summary_names_model_pretrained_and_device(feats, tmp_path, capsys):
    assert cli.main(["invert", "images", "--input", str(feats), "--out", str(tmp_path / "o"), "--steps", "1"]
                    + TINY) == 0
    assert "model: crossgap-tiny (pretrained random) on cpu" in capsys.readouterr().out


def test_precision_reaches_the_inversion(feats, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["invert", "images", "--input", str(feats), "--out", str(out), "--steps", "1",
                     "--precision", "bf16"] + TINY) == 0
    assert cg.load_inversions(out).manifest["inversion"]["precision"] == "bf16"
    with pytest.raises(SystemExit) as exc:
        cli.main(["invert", "images", "--input", str(feats), "--out", str(tmp_path / "p"),
                  "--precision", "fp8"] + TINY)
    assert exc.value.code == EXIT_BAD_INPUT and "--precision" in capsys.readouterr().err


def test_json_summary_is_one_object_on_stdout(feats, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["invert", "images", "--input", str(feats), "--out", str(out), "--steps", "1",
                     "--shard-size", "4", "--json"] + TINY) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed)  # the whole of stdout is the object
    assert summary["items_done"] == 6 and summary["num_shards"] == 2 and summary["complete"] is True
    assert (summary["model"], summary["pretrained"], summary["device"]) == ("crossgap-tiny", "random", "cpu")
    assert summary["failed"] == 0 and summary["failed_fraction"] == 0.0


# ---------------------------------------------------------------------------- help groups
def _help(*command: str) -> None:
    """Print ``crossgap COMMAND --help`` (argparse exits after printing)."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*command, "--help"])


def test_help_is_grouped_and_worker_is_not_workers(capsys):
    for command in (("invert", "images"), ("encode", "texts")):
        _help(*command)
        text = capsys.readouterr().out
        heads = [line.rstrip(":") for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
        assert {"model", "input", "output", "workers", "engine"} <= set(heads), heads
        assert ("inversion" in heads) == (command[0] == "invert")
        sections = text.split("\n\n")
        inputs = next(s for s in sections if s.startswith("  --input "))
        assert "--decode-workers" in inputs and "--worker " not in inputs
        assert "\n  --workers" not in text  # the old, confusable name is not offered
        assert f"{EXIT_ITEMS_FAILED} the run finished but too many items failed" in " ".join(text.split())
    args = cli.build_parser().parse_args(["invert", "images", "--input", "x", "--out", "o", "--model", "m",
                                          "--workers", "3"])
    assert args.workers == 3 and args.worker is False  # the old name still works


# ------------------------------------------------------------------------------ exit codes
def test_exit_codes_tell_nothing_ran_from_too_many_failed(tmp_path, capsys):
    assert len({0, EXIT_BAD_INPUT, EXIT_DEVICE, EXIT_ITEMS_FAILED}) == 4
    root = tmp_path / "imgs"
    (root / "x" / "y").mkdir(parents=True)
    make_images(root, n=1)  # one good image, one corrupt
    for i in range(2):
        (root / f"broken{i}.png").write_bytes(b"not an image")
    code = cli.main(["encode", "images", "--input", str(root), "--out", str(tmp_path / "o"), "--json"] + TINY)
    captured = capsys.readouterr()
    assert code == EXIT_ITEMS_FAILED, captured.err
    assert json.loads(captured.out)["failed"] == 3  # the summary still comes, as asked
    assert "75% of the items failed" in captured.err
    assert cli.main(["encode", "images", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "p")]
                    + TINY) == EXIT_BAD_INPUT


# ------------------------------------------------------------------------------ offline hub
def test_unreachable_hub_is_one_line_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "XDG_CACHE_HOME": str(tmp_path / "c")}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # a machine's own cache could hold the weights
        env.pop(name, None)
    cmd = [sys.executable, "-m", "crossgap_fast", "invert", "images", "--input", str(tmp_path),
           "--out", str(tmp_path / "o"), "--model", "ViT-B-32", "--pretrained", "openai"]
    try:  # a hang guard only: unbounded, huggingface_hub retries for about 50 s
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=45)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"still retrying after 45 s: {err.stderr!r}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_BAD_INPUT and len(lines) == 1, proc.stderr
    assert "127.0.0.1:9 cannot be reached" in lines[0] and "ViT-B-32" in lines[0]
    assert not (tmp_path / "o").exists()


def test_hub_offline_mode_and_cached_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    problem = hub.download_problem("ViT-B-32", "openai")
    assert problem and "HF_HUB_OFFLINE is set" in problem
    # weights in the cache need no network: open_clip will find them there
    snap = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc")
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "snapshots" / "abc" / "open_clip_model.safetensors").write_bytes(b"x")
    assert hub.download_problem("ViT-B-32", "openai") is None
    assert hub.download_problem("crossgap-tiny", "random") is None  # nothing to download


# ---------------------------------------------------------------------------- progress bars
def test_progress_never_overshoots_and_empty_bars_are_not_shown(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm's "clamping frac" would raise here
        bar = Progress(3, "x")
        for _ in range(5):
            bar.update(0.7)
        bar.update(2)
        bar.update(2)
        assert bar.bar.n == pytest.approx(3)
        bar.close()
    err = capsys.readouterr().err
    assert "3/3" in err and "4/3" not in err and "<-" not in err
    empty = Progress(0, "nothing", enabled=True)
    empty.update(5)
    empty.close()
    assert empty.bar is None and "0/0" not in capsys.readouterr().err


def test_a_rerun_shows_no_empty_bars_and_no_zero_rate(feats, tmp_path, capsys):
    base = ["invert", "images", "--input", str(feats), "--out", str(tmp_path / "o"), "--steps", "1",
            "--model", "crossgap-tiny", "--pretrained", "random", "--workers", "0"]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main(base + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "0/0" not in captured.err and "0.0 items/s" not in captured.out
    assert "inverted (OTI) 0 images: nothing to do, all 1 shard(s) were already finished" in captured.out


# ------------------------------------------------------------------ worker / resume messages
def test_a_joining_worker_says_joined_not_resumed(feats, tmp_path, capsys):
    base = ["invert", "images", "--input", str(feats), "--out", str(tmp_path / "o"), "--steps", "1",
            "--shard-size", "2", "--worker"] + TINY
    assert cli.main(base) == 0  # the first worker starts the run and does it all
    first = capsys.readouterr().out
    assert "joined" not in first and "resumed" not in first
    assert cli.main(base) == 0  # a second worker arrives when the others are done
    out = capsys.readouterr().out
    assert "joined: 3 shard(s) already done by other workers" in out and "resumed" not in out
    assert cli.main(base[:-len(TINY) - 1] + TINY + ["--resume"]) == 0
    assert "resumed: skipped 3 finished shard(s) of an earlier run" in capsys.readouterr().out


def test_shards_done_by_other_workers_meanwhile_are_said():
    from crossgap_fast.pipeline.summary import GallerySummary

    summary = GallerySummary(out_dir="o", kind="images", method="oti", total_items=10, items_done=4, items_ok=10,
                             failed=0, warnings=0, shards_done=2, shards_skipped=1, num_shards=5, complete=True,
                             resumed=True, seconds=2.0, items_per_s=2.0, joined=True)
    text = summary.format()
    assert "joined: 1 shard(s) already done by other workers" in text
    assert "other workers: 2 shard(s) done meanwhile; this worker did 2" in text


# -------------------------------------------------------------------- warm-start rates
class _Clock:
    """The time module as the worker sees it, with a clock that jumps ahead on request: a
    calibration that "takes" an hour without the test waiting for it."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def test_warm_start_rates_count_the_calibration(tiny, tmp_path, monkeypatch):
    hour = 3600.0
    clock = _Clock()
    real = cal_mod.run_calibration

    def slow(*a, **k):
        clock.offset += hour  # the calibration takes an hour by the worker's clock
        return real(*a, **k)

    monkeypatch.setattr(worker_mod, "time", clock)
    monkeypatch.setattr(cal_mod, "run_calibration", slow)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    out = tmp_path / "o"
    summary = cg.invert_gallery(x, out, tiny, warm_start=32, steps=2, calibration_steps=3, shard_size=20,
                                progress=False)
    assert summary.seconds >= hour and summary.items_per_s <= 40 / hour
    assert read_status(out).items_per_s <= 40 / hour  # the first shard's recorded time holds it


# ----------------------------------------------------------------------------------- Ray
def test_ray_starts_quietly(monkeypatch):
    driver = pytest.importorskip("crossgap_fast.pipeline.ray_engine.driver")
    seen = {}
    monkeypatch.setattr(driver.ray, "init", lambda **kw: seen.update(kw))
    driver.start_ray()
    assert seen.get("log_to_driver") is False and seen.get("logging_level") == "ERROR"


def test_ray_run_prints_no_core_worker_lines(tmp_path):
    pytest.importorskip("ray")
    np.save(tmp_path / "f.npy", np.random.default_rng(8).standard_normal((5, 32)).astype(np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "crossgap_fast", "invert", "images", "--input", str(tmp_path / "f.npy"),
           "--out", str(tmp_path / "o"), "--steps", "2", "--shard-size", "2", "--engine", "ray",
           "--no-progress"] + TINY[:4]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)  # a hang guard
    assert proc.returncode == 0, proc.stderr
    assert "inverted (OTI) 5 images" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr  # no core_worker.cc, raylet or conversion lines
