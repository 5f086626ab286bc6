"""End-to-end tests of the ``crossgap`` command (subprocesses: kill + resume, torchrun) and of
its refusals and inputs (in-process ``cli.main``). Tiny model, ``--pretrained random``.

Every subprocess runs with ``OMP_NUM_THREADS=1`` (torchrun's default for its ranks), so the
single-process and two-rank runs do the same float operations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossgap_fast import cli, defaults, encode_images, load_inversions, load_model, oti
from crossgap_fast.models import RANDOM_MODEL_SEED


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of unit length: the store keeps features L2-normalised by default."""
    return torch.nn.functional.normalize(x.float(), dim=-1)

STEPS = "3"
SHARD = "4"
COMMON = ["--model", "crossgap-tiny", "--pretrained", "random", "--steps", STEPS,
          "--shard-size", SHARD, "--workers", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Runs the real CLI, but holds the process after shard 1's file is written and before its
# manifest entry lands, so that the SIGKILL reliably hits mid-run at the worst moment.
SLOW_WRAPPER = """
import sys, time
from crossgap_fast.pipeline.store import folder as store
real = store.GalleryStore._record
def held(self, entry):
    if entry["shard"] >= 1:
        time.sleep(120)
    real(self, entry)
store.GalleryStore._record = held
from crossgap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def crossgap_cmd() -> list[str]:
    exe = shutil.which("crossgap")
    return [exe] if exe else [sys.executable, "-m", "crossgap_fast"]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout the whole group (ranks, DataLoader
    workers) is killed, so nothing is left behind."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:6]))} ... timed out after {timeout} s\n{out!r}\n{err!r}")
    # names that are not UTF-8 come back escaped; decoding must not fail on them
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def kill_when_written(wrapper: str, args: list[str], path: Path, settle: float = 0.2) -> subprocess.Popen:
    """Run ``wrapper`` (a Python script taking the CLI's arguments) with ``args`` in its own
    session and SIGKILL the whole group (the run and its DataLoader workers) once ``path``
    exists; returns the finished process."""
    proc = subprocess.Popen([sys.executable, "-c", wrapper] + list(args), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not path.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, f"the run never wrote {path.name}"
            time.sleep(0.02)
        time.sleep(settle)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc


def recorded_shards(out: Path) -> list[int]:
    """Every shard recorded by any worker of the run in ``out``, with repeats, sorted."""
    return sorted(json.loads(line)["shard"] for w in (out / "workers").glob("*.jsonl")
                  for line in w.read_text().splitlines())


def make_images(root: Path, n: int = 22) -> tuple[list[str], str]:
    rng = np.random.default_rng(1)
    good = []
    for i in range(n):
        rel = Path(["x", "x/y", "z/deep/er"][i % 3]) / f"p{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)).save(root / rel)
        good.append(rel.as_posix())
    bad = "x/y/corrupt.png"
    (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return sorted(good), bad


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good, bad = make_images(root)
    return root, good, bad


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    root, _, _ = images
    out = tmp_path_factory.mktemp("runs") / "full"
    proc = run(crossgap_cmd() + ["invert", "images", "--input", str(root), "--out", str(out)] + COMMON)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_uninterrupted_run_output(uninterrupted, images):
    out, proc = uninterrupted
    _, good, bad = images
    inv = load_inversions(out)
    assert inv.names == good and bad not in inv.names
    assert inv.features.shape == (len(good), 32) and torch.isfinite(inv.features).all()
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["name"], e["level"]) for e in errors] == [(bad, "error")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_shards"] == 6  # 23 items / 4
    assert (manifest["model"], manifest["pretrained"], manifest["method"]) == ("crossgap-tiny", "random", "oti")
    assert (manifest["steps"], manifest["seed"], manifest["num_tokens"]) == (3, 0, 1)
    # summary: items/s, failures with the errors file, time shares
    assert "items/s" in proc.stdout and "failed: 1 item(s)" in proc.stdout
    assert str(out / "errors.jsonl") in proc.stdout
    assert "data loading" in proc.stdout and "optimisation" in proc.stdout


def test_matches_in_process_reference(uninterrupted, images):
    """The CLI's --pretrained random model is the one built under torch.manual_seed(0)."""
    out, _ = uninterrupted
    root, good, bad = images
    torch.manual_seed(RANDOM_MODEL_SEED)
    model = load_model("crossgap-tiny", "random")
    everything = sorted(good + [bad])
    ids = [everything.index(g) for g in good]
    targets = encode_images([Image.open(root / g).convert("RGB") for g in good], model)
    ref = oti(targets, model, steps=int(STEPS), sample_ids=ids)
    inv = load_inversions(out)
    torch.testing.assert_close(inv.features, unit(ref.features), atol=1e-5, rtol=1e-4)


def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, images, tmp_path):
    root, good, bad = images
    out = tmp_path / "killed"
    args = ["invert", "images", "--input", str(root), "--out", str(out)] + COMMON
    proc = kill_when_written(SLOW_WRAPPER, args, out / "metadata" / "metadata_00001.parquet")
    assert proc.returncode == -signal.SIGKILL
    # killed mid-run: shard 1's files exist but only shard 0 is recorded as finished
    (worker,) = (out / "workers").glob("*.jsonl")
    assert [json.loads(line)["shard"] for line in worker.read_text().splitlines()] == [0]
    with pytest.raises(Exception, match="unfinished"):
        load_inversions(out)
    shard0 = (out / "text_emb" / "text_emb_00000.npy").stat().st_mtime_ns

    refused = run(crossgap_cmd() + args)  # without --resume: refused, nothing touched
    assert refused.returncode == 2 and "not empty" in refused.stderr and "--resume" in refused.stderr

    resumed = run(crossgap_cmd() + args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "skipped 1 finished shard" in resumed.stdout
    assert (out / "text_emb" / "text_emb_00000.npy").stat().st_mtime_ns == shard0
    full, again = load_inversions(uninterrupted[0]), load_inversions(out)
    assert again.names == full.names
    assert torch.equal(again.indices, full.indices)
    assert torch.equal(again.features, full.features)
    assert torch.equal(again.tokens, full.tokens)
    assert torch.equal(again.losses, full.losses)
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["name"] for e in errors] == [bad]  # recorded once, and nowhere else
    assert bad not in again.names


def test_torchrun_two_ranks_equal_single_process(uninterrupted, images, tmp_path):
    root, good, bad = images
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "crossgap_fast", "invert", "images",
           "--input", str(root), "--out", str(out)] + COMMON
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("crossgap: inverted") == 2  # each rank reports its own part
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [s["shard"] for s in manifest["shards"]] == list(range(6))
    # shards are leased: each was made once, by whichever rank claimed it
    assert recorded_shards(out) == list(range(6))
    again = run(cmd, timeout=300)  # a new launch into the finished folder, without --resume: refused
    assert again.returncode != 0 and again.stderr.count("is not empty") == 2  # each rank says so
    single, multi = load_inversions(uninterrupted[0]), load_inversions(out)
    assert multi.names == single.names
    torch.testing.assert_close(multi.features, single.features, atol=1e-6, rtol=0)
    torch.testing.assert_close(multi.tokens, single.tokens, atol=1e-6, rtol=0)
    assert [e["name"] for e in multi.errors] == [bad]


def test_texts_via_python_m(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text('id,text\nd1,a red car\nd2,\nd3,"' + "very " * 90 + 'long"\nd4,a blue sky\n')
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "crossgap_fast", "invert", "texts", "--input", str(src),
                "--out", str(out), "--model", "crossgap-tiny", "--pretrained", "random",
                "--steps", "2", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "truncated" in proc.stderr
    inv = load_inversions(out)
    assert inv.names == ["d1", "d3", "d4"] and inv.manifest["method"] == "ovi"
    assert [(e["name"], e["level"]) for e in inv.errors] == [("d2", "error"), ("d3", "warning")]
    assert "failed: 1 item(s), warnings: 1" in proc.stdout


# --------------------------------------------------------------------------------------------
# In-process: refusals, messages, features input, encode
# --------------------------------------------------------------------------------------------
TINY = ["--model", "crossgap-tiny", "--pretrained", "random", "--no-progress", "--workers", "0"]


def test_missing_pretrained_is_refused_with_a_hint(tmp_path, capsys):
    assert defaults.DEFAULT_PRETRAINED is None
    code = cli.main(["invert", "images", "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--model", "crossgap-tiny"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "random" in err
    assert not (tmp_path / "o").exists()


def test_refusals(tmp_path, capsys):
    feats = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "f.npy", feats.numpy())
    out = tmp_path / "out"
    base = ["invert", "images", "--input", str(tmp_path / "f.npy"), "--out", str(out), "--steps", "2"] + TINY
    assert cli.main(base) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(base) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(base[:-len(TINY)] + TINY + ["--resume", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "seed: recorded 0, now 5" in err
    assert cli.main(["invert", "images", "--input", str(tmp_path / "f.npy"), "--out", str(out),
                     "--steps", "2", "--template", "a picture of {}", "--resume"] + TINY) == 2
    assert "template" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost
    assert cli.main(base + ["--resume"]) == 0  # same settings: nothing left to do
    assert "skipped 1 finished shard" in capsys.readouterr().out
    assert cli.main(["invert", "images", "--input", str(tmp_path / "missing"), "--out",
                     str(tmp_path / "o2")] + TINY) == 2
    assert "missing" in capsys.readouterr().err


def test_precomputed_pt_features_and_encode(tmp_path, capsys):
    feats = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    torch.save(feats, tmp_path / "f.pt")
    assert cli.main(["invert", "images", "--input", str(tmp_path / "f.pt"), "--out",
                     str(tmp_path / "o"), "--steps", "2", "--shard-size", "2"] + TINY) == 0
    inv = load_inversions(tmp_path / "o")
    assert inv.names == ["0", "1", "2", "3", "4"]
    torch.testing.assert_close(inv.targets, unit(feats), atol=1e-6, rtol=0)  # stored normalised
    torch.manual_seed(RANDOM_MODEL_SEED)
    model = load_model("crossgap-tiny", "random")
    ref = oti(feats, model, steps=2, sample_ids=list(range(5)))
    torch.testing.assert_close(inv.features, unit(ref.features), atol=1e-5, rtol=1e-4)

    img_dir = tmp_path / "imgs"
    good, bad = make_images(img_dir, n=3)
    assert cli.main(["encode", "images", "--input", str(img_dir), "--out", str(tmp_path / "e")] + TINY) == 0
    enc = load_inversions(tmp_path / "e")
    assert enc.names == good and enc.tokens is None
    expected = encode_images([Image.open(img_dir / g).convert("RGB") for g in good], model)
    torch.testing.assert_close(enc.features, unit(expected), atol=1e-5, rtol=1e-4)
    assert "encoded 3 images" in capsys.readouterr().out
    # an image list file: names are the entries as written, paths relative to the list
    listing = img_dir / "list.txt"
    listing.write_text(f"{good[1]}\n\n{bad}\n{good[0]}\n")
    assert cli.main(["encode", "images", "--input", str(listing), "--out", str(tmp_path / "l")] + TINY) == 0
    lst = load_inversions(tmp_path / "l")
    assert lst.names == [good[1], good[0]] and [e["name"] for e in lst.errors] == [bad]
    torch.testing.assert_close(lst.features, unit(expected[[1, 0]]), atol=1e-5, rtol=1e-4)
