"""Bad inputs and faults: every case is built here and the behaviour asserted.

Anything that used to hang runs under a deadline (``deadline`` for in-process calls, a
subprocess timeout for the command line), so a regression fails instead of blocking CI.
Models: the session's random ``tiny`` (conftest) in-process; ``--pretrained random`` on the
command line (the same weights, built under ``RANDOM_MODEL_SEED``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossgap_fast import cli, encode_gallery, invert_gallery, load_inversions, load_model
from crossgap_fast.cli.messages import EXIT_ITEMS_FAILED
from crossgap_fast.models import RANDOM_MODEL_SEED
from crossgap_fast.pipeline import encode as encode_mod
from crossgap_fast.pipeline import store as store_mod
from crossgap_fast.pipeline.inputs import load_input, load_image
from crossgap_fast.pipeline.inputs.folders import scan_images
from crossgap_fast.pipeline.inputs.texts import read_texts
from crossgap_fast.errors import CorruptStoreError, InputError, SettingsMismatchError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--model", "crossgap-tiny", "--pretrained", "random", "--no-progress"]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test (instead of hanging it) when the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: this used to hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(args: list[str], timeout: float = 180, wrapper: str | None = None) -> subprocess.CompletedProcess:
    """The real command in a subprocess (its own session, killed as a group on timeout)."""
    from test_cli import run

    return run([sys.executable] + (["-c", wrapper] if wrapper else ["-m", "crossgap_fast"]) + args, timeout)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ln.startswith("crossgap: error:")]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def save_png(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def features_file(tmp_path: Path, n: int = 6, dim: int = 32, seed: int = 0) -> Path:
    path = tmp_path / "feats.npy"
    np.save(path, torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).numpy())
    return path


# --------------------------------------------------------------------------------------------
# the image folder listing
# --------------------------------------------------------------------------------------------
def test_symlink_loops_are_listed_once_and_never_hang(tmp_path):
    root = tmp_path / "g"
    for rel in ("a.png", "sub/b.png", "sub/deeper/c.png"):
        save_png(root / rel, 0)
    outside = tmp_path / "elsewhere"
    save_png(outside / "d.png", 1)
    os.symlink(".", root / "loop")  # 3 images became 123 items
    os.symlink("..", root / "sub" / "up")  # with the first loop, os.walk never ended
    os.symlink(outside, root / "ext")  # a link out of the tree is still followed
    os.symlink(root / "sub", root / "also_sub")  # a second path to a listed folder
    with deadline(20):
        names, problems = scan_images(root)
    assert names == ["a.png", "also_sub/b.png", "also_sub/deeper/c.png", "ext/d.png"]
    assert problems == []


def test_hostile_folder_through_the_command_line(tmp_path):
    """Loops, a FIFO and names that are not UTF-8, all in one folder given to ``crossgap``."""
    root = tmp_path / "g"
    for i in range(4):
        save_png(root / "sub" / f"{i}.png", i)
    os.symlink(".", root / "loop")
    os.symlink("..", root / "sub" / "up")
    os.mkfifo(root / "x.png")
    raw = os.fsencode(root)
    save_png(Path(os.fsdecode(raw + b"/caf\xe9.png")), 7)
    corrupt(Path(os.fsdecode(raw + b"/bad\xff.png")))
    out = tmp_path / "out"
    args = ["invert", "images", "--input", str(root), "--out", str(out), "--steps", "1",
            "--workers", "1"] + TINY
    proc = run_cli(args, timeout=150)  # one subprocess (~5 s idle): the real entry point
    assert proc.returncode == 0, proc.stderr
    assert "failed: 2 item(s)" in proc.stdout and "output: 5 of 7 items" in proc.stdout
    inv = load_inversions(out)
    assert sorted(os.fsencode(n) for n in inv.names) == sorted(
        [b"caf\xe9.png"] + [f"sub/{i}.png".encode() for i in range(4)])
    assert [(os.fsencode(e["name"]), e["reason"][:18]) for e in inv.errors] == [
        (b"bad\xff.png", "unreadable image ("), (b"x.png", "not a regular file")]


def test_non_regular_files_are_errors_and_never_opened(tiny, tmp_path):
    root = tmp_path / "g"
    save_png(root / "ok.png", 0)
    os.mkfifo(root / "x.png")  # opening a FIFO for reading blocks until a writer comes
    with deadline(60):
        summary = encode_gallery(root, tmp_path / "out", tiny, workers=0, progress=False)
        with pytest.raises(OSError, match="not a regular file"):
            load_image(str(root / "x.png"), tiny.preprocess)
    inv = load_inversions(tmp_path / "out")
    assert inv.names == ["ok.png"] and summary.failed == 1
    assert [(e["name"], e["reason"]) for e in inv.errors] == [("x.png", "not a regular file (a FIFO)")]
    # a list file naming the FIFO, and the FIFO itself given as the input
    listing = tmp_path / "list.txt"
    listing.write_text("g/x.png\ng/ok.png\n")
    assert load_input(listing, "images").issues == {0: {"level": "error", "reason": "not a regular file (a FIFO)"}}
    with deadline(20), pytest.raises(InputError, match="is a FIFO"):
        load_input(root / "x.png", "images")


def test_unreadable_sub_folder_is_recorded(tiny, tmp_path, monkeypatch):
    root = tmp_path / "g"
    save_png(root / "a.png", 0)
    save_png(root / "locked" / "b.png", 1)
    real = os.scandir
    locked = str(root / "locked")

    def scandir(path="."):  # the tests run as root, whom chmod cannot lock out
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match="could not be read.*'locked'"):
        summary = encode_gallery(root, tmp_path / "out", tiny, workers=0, progress=False)
    monkeypatch.setattr(os, "scandir", real)
    assert summary.problems == 1 and "1 unreadable folder" in summary.format()
    records = list(store_mod.iter_error_records(tmp_path / "out" / "errors.jsonl"))
    assert records == [{"index": None, "name": "locked", "level": "error",
                        "reason": "unreadable folder (PermissionError: Permission denied)"}]
    inv = load_inversions(tmp_path / "out")
    assert inv.names == ["a.png"] and inv.errors == records


# --------------------------------------------------------------------------------------------
# decoding workers that die, and too little shared memory
# --------------------------------------------------------------------------------------------
# The real command, but decoding POISON in a DataLoader worker kills that worker (SIGKILL, as
# the OOM killer or a SIGBUS on a full /dev/shm would); the main process decodes it fine.
KILL_WORKER = """
import os, signal, sys
import torch.utils.data
from crossgap_fast.pipeline.inputs import decode as data
real = data.load_image
def load_image(path, preprocess):
    if path.endswith("POISON.png") and torch.utils.data.get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, preprocess)
data.load_image = load_image
from crossgap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_decoding_worker_falls_back_to_main_process(tiny, tmp_path):
    """About 10 s: a subprocess, plus up to 5 s until torch's liveness check (its
    MP_STATUS_CHECK_INTERVAL) notices the dead worker, which is the detection under test."""
    root = tmp_path / "g"
    for i in range(12):
        save_png(root / f"img{i:02d}.png", i)
    save_png(root / "img05POISON.png", 99)
    out = tmp_path / "out"
    proc = run_cli(["encode", "images", "--input", str(root), "--out", str(out), "--workers", "2",
                    "--batch-size", "3", "--shard-size", "5"] + TINY, wrapper=KILL_WORKER)
    assert proc.returncode == 0, proc.stderr
    assert "image decoding workers failed" in proc.stderr
    # torch's liveness check names the dead worker; when the kill lands mid-transfer the main
    # process sees the broken pipe first: either way the death is detected and named
    assert re.search(r"exited unexpectedly|ConnectionResetError|Connection reset by peer", proc.stderr)
    assert "decoding the remaining" in proc.stderr
    inv = load_inversions(out)
    expected = encode_gallery(root, tmp_path / "ref", _cli_model(), workers=0, encode_batch_size=3,
                              shard_size=5, progress=False)
    ref = load_inversions(tmp_path / "ref")
    assert expected.failed == 0 and inv.names == ref.names and len(inv) == 13 and not inv.errors
    torch.testing.assert_close(inv.features, ref.features, atol=1e-5, rtol=1e-4)


def _cli_model():
    torch.manual_seed(RANDOM_MODEL_SEED)
    return load_model("crossgap-tiny", "random")


def test_too_little_shared_memory_decodes_in_main_process(tiny, tmp_path, monkeypatch):
    root = tmp_path / "g"
    for i in range(5):
        save_png(root / f"{i}.png", i)
    ref = encode_gallery(root, tmp_path / "ref", tiny, workers=0, progress=False)
    created = []
    monkeypatch.setattr(encode_mod, "shared_memory_free", lambda: 1 << 20)  # 1 MiB, like a tiny /dev/shm
    monkeypatch.setattr(encode_mod._DecodeThread, "__init__",
                        lambda self, *a: created.append(a) or pytest.fail("workers were started"))
    with pytest.warns(UserWarning, match=r"/dev/shm has 1 MiB free.*decoding in the main process"):
        got = encode_gallery(root, tmp_path / "out", tiny, workers=2, progress=False)
    assert not created and got.items_ok == ref.items_ok == 5
    assert torch.equal(load_inversions(tmp_path / "out").features, load_inversions(tmp_path / "ref").features)


# --------------------------------------------------------------------------------------------
# file names that are not UTF-8
# --------------------------------------------------------------------------------------------
def test_non_utf8_file_names_round_trip(tiny, tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    good, bad = b"caf\xe9.png", b"bad\xff.png"  # Latin-1 names, invalid as UTF-8
    save_png(Path(os.fsdecode(os.path.join(os.fsencode(root), good))), 0)
    corrupt(Path(os.fsdecode(os.path.join(os.fsencode(root), bad))))
    save_png(root / "plain.png", 1)
    out = tmp_path / "out"
    for resume in (False, True, True):  # every resume used to repeat the crash
        summary = invert_gallery(root, out, tiny, steps=1, workers=0, progress=False, resume=resume)
        assert summary.complete and summary.failed == 1
    inv = load_inversions(out)
    assert sorted(os.fsencode(n) for n in inv.names) == sorted([good, b"plain.png"])
    raw = (out / "errors.jsonl").read_bytes()
    raw.decode("utf-8")  # the file is valid UTF-8 (the name is escaped, not written raw)
    (record,) = [json.loads(line) for line in raw.splitlines()]
    assert os.fsencode(record["name"]) == bad and record["level"] == "error"
    assert [os.fsencode(e["name"]) for e in inv.errors] == [bad]


# --------------------------------------------------------------------------------------------
# resume verifies finished shards; the manifest carries the digest of what is on disk
# --------------------------------------------------------------------------------------------
def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_matches_disk(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    for e in manifest["shards"]:
        for rel, info in e["files"].items():
            assert info["sha256"] == _file_sha(out / rel), rel


def test_deleted_shard_redone_under_other_thread_count_loads(tiny, tmp_path):
    src = features_file(tmp_path)
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    invert_gallery(src, out, tiny, steps=2, shard_size=2, progress=False)
    (out / "tokens" / "tokens_00001.npy").unlink()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        with pytest.warns(UserWarning) as caught:
            summary = invert_gallery(src, out, tiny, steps=2, shard_size=2, progress=False, resume=True)
    finally:
        torch.set_num_threads(threads)
    text = " ".join(str(w.message) for w in caught)
    assert "shard 1: tokens/tokens_00001.npy is missing" in text and "threads" in text
    assert summary.complete and summary.shards_done == 1 and summary.shards_skipped == 2
    _manifest_matches_disk(out)
    assert len(load_inversions(out)) == 6  # raised CorruptStoreError forever before
    entries = {e["shard"]: e for e in json.loads((out / "manifest.json").read_text())["shards"]}
    assert entries[0]["threads"] == threads and entries[1]["threads"] == (1 if threads > 1 else 2)


def test_flipped_byte_in_finished_shard_is_redone(tiny, tmp_path):
    src = features_file(tmp_path)
    out = tmp_path / "out"
    invert_gallery(src, out, tiny, steps=2, shard_size=4, progress=False)
    before = load_inversions(out)
    path = out / "text_emb" / "text_emb_00000.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a feature value, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="shard 0"):
        load_inversions(out)
    with pytest.warns(UserWarning, match="missing or changed and will be redone.*shard 0"):
        summary = invert_gallery(src, out, tiny, steps=2, shard_size=4, progress=False, resume=True)
    assert summary.shards_done == 1 and summary.shards_skipped == 1  # not "2 of 2" untouched
    _manifest_matches_disk(out)
    after = load_inversions(out)
    assert torch.equal(after.features, before.features) and torch.equal(after.tokens, before.tokens)


# --------------------------------------------------------------------------------------------
# runs in which (too many) items failed
# --------------------------------------------------------------------------------------------
def test_every_image_unreadable_exits_items_failed(tmp_path, capsys):
    root = tmp_path / "g"
    for i in range(3):
        corrupt(root / f"{i}.png")
    out = tmp_path / "out"
    code = cli.main(["invert", "images", "--input", str(root), "--out", str(out), "--steps", "1",
                     "--workers", "0"] + TINY)
    captured = capsys.readouterr()
    assert code == EXIT_ITEMS_FAILED  # the run ran: not the "nothing ran" code 2
    assert "that is ALL of them" in captured.out  # the summary still says what happened
    (line,) = error_lines(captured.err)
    assert "every item failed: 3 of 3" in line and "unreadable image" in line and "errors.jsonl" in line
    assert len(list(store_mod.iter_error_records(out / "errors.jsonl"))) == 3


def test_csv_given_as_image_list_exits_items_failed(tmp_path, capsys):
    src = tmp_path / "captions.csv"
    src.write_text("id,text\n1,a dog\n2,a cat\n")
    code = cli.main(["encode", "images", "--input", str(src), "--out", str(tmp_path / "o"), "--workers", "0"] + TINY)
    assert code == EXIT_ITEMS_FAILED
    line = one_line_error(capsys)
    assert "every item failed" in line and "'id,text': file not found" in line


def test_text_file_of_blank_lines_is_refused_before_writing(tmp_path, capsys):
    src = tmp_path / "blank.txt"
    src.write_text("\n  \n\n")
    out = tmp_path / "o"
    code = cli.main(["invert", "texts", "--input", str(src), "--out", str(out), "--steps", "1"] + TINY)
    assert code == 2
    line = one_line_error(capsys)
    assert "no usable item" in line and "3 x empty text" in line
    assert not out.exists()


def test_max_failed_fraction(tmp_path, capsys):
    root = tmp_path / "g"
    save_png(root / "a.png", 0)
    corrupt(root / "b.png")
    corrupt(root / "c.png")
    args = ["encode", "images", "--input", str(root), "--workers", "0", "--shard-size", "2"] + TINY
    assert cli.main(args + ["--out", str(tmp_path / "o1")]) == EXIT_ITEMS_FAILED  # 2 of 3 > 0.5 (the default)
    line = one_line_error(capsys)
    assert "67% of the items failed, more than the allowed 50%" in line
    assert "the finished shards in" in line and load_inversions(tmp_path / "o1").names == ["a.png"]
    assert cli.main(args + ["--out", str(tmp_path / "o2"), "--max-failed-fraction", "0.7"]) == 0
    assert "failed: 2 item(s), warnings: 0" in (out := capsys.readouterr().out) and "66.7% of the items" in out
    with pytest.raises(SystemExit):
        cli.main(args + ["--out", str(tmp_path / "o3"), "--max-failed-fraction", "1.5"])


# --------------------------------------------------------------------------------------------
# high-bit-depth images are mapped by their range, never clipped
# --------------------------------------------------------------------------------------------
def _fed(path: Path, preprocess) -> torch.Tensor:
    return load_image(str(path), preprocess)


def _expected(grey8: np.ndarray, preprocess) -> torch.Tensor:
    return preprocess(Image.fromarray(grey8.astype(np.uint8)).convert("RGB"))


def test_sixteen_bit_and_float_images_keep_their_picture(tiny, tmp_path):
    pre = tiny.preprocess
    ramp8 = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (64, 1))  # 64 x 64 grey ramp
    # 16-bit PNG over the full range: v16 = v8 * 257 must come back as v8
    Image.fromarray(ramp8 * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert torch.equal(_fed(tmp_path / "g16.png", pre), _expected(ramp8, pre))
    # big-endian 16-bit TIFF
    Image.fromarray((ramp8 * 257).astype(">u2")).save(tmp_path / "g16b.tif")
    assert torch.equal(_fed(tmp_path / "g16b.tif", pre), _expected(ramp8, pre))
    # 32-bit float TIFF in [0, 1]: scaled by 255
    Image.fromarray((ramp8 / 255.0).astype(np.float32)).save(tmp_path / "f01.tif")
    assert Image.open(tmp_path / "f01.tif").mode == "F"
    assert torch.equal(_fed(tmp_path / "f01.tif", pre), _expected(ramp8, pre))
    # float outside [0, 1] and 32-bit integer: their own min..max becomes 0..255
    stretched = np.tile(np.linspace(-3.0, 5.0, 64, dtype=np.float32), (64, 1))
    Image.fromarray(stretched).save(tmp_path / "fwide.tif")
    want = np.rint((stretched.astype(np.float64) + 3.0) * 255.0 / 8.0)
    assert torch.equal(_fed(tmp_path / "fwide.tif", pre), _expected(want, pre))
    ints = np.tile(np.arange(64, dtype=np.int32) * 1000 - 7000, (64, 1))
    Image.fromarray(ints).save(tmp_path / "i32.tif")
    want = np.rint((ints + 7000).astype(np.float64) * 255.0 / 63000.0)
    assert torch.equal(_fed(tmp_path / "i32.tif", pre), _expected(want, pre))
    # what PIL's own conversion would have fed: nearly all white / all black
    assert np.asarray(Image.open(tmp_path / "g16.png").convert("L")).mean() > 200
    assert np.asarray(Image.open(tmp_path / "f01.tif").convert("L")).max() <= 1


def test_float_image_with_nan_is_an_item_error(tiny, tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    bad = np.ones((16, 16), dtype=np.float32)
    bad[3, 4] = np.nan
    Image.fromarray(bad).save(root / "nan.tif")
    save_png(root / "ok.png", 0)
    summary = encode_gallery(root, tmp_path / "out", tiny, workers=0, progress=False)
    (record,) = load_inversions(tmp_path / "out").errors
    assert summary.items_ok == 1 and record["name"] == "nan.tif" and "NaN or infinite" in record["reason"]


# --------------------------------------------------------------------------------------------
# text inputs
# --------------------------------------------------------------------------------------------
BOM = "\ufeff"


def test_byte_order_marks_are_dropped(tiny, tmp_path):
    save_png(tmp_path / "a.png", 0)
    listing = tmp_path / "list.txt"
    listing.write_text(BOM + "a.png\n", encoding="utf-8")
    gal = load_input(listing, "images")
    assert gal.names == ["a.png"] and gal.stamps[0] is not None and not gal.issues
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(BOM + "text,id\nhello,h1\n", encoding="utf-8")
    assert read_texts(csv_path)[:2] == (["h1"], ["hello"])
    txt = tmp_path / "t.txt"
    txt.write_text(BOM + "first\nsecond\n", encoding="utf-8")
    assert read_texts(txt)[1] == ["first", "second"]
    jl = tmp_path / "t.jsonl"
    jl.write_text(BOM + '{"id": "x", "text": "first"}\n', encoding="utf-8")
    assert read_texts(jl)[:2] == (["x"], ["first"])


def test_duplicate_ids_are_refused(tmp_path):
    jl = tmp_path / "dup.jsonl"
    jl.write_text('{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n{"id": "a", "text": "three"}\n')
    with pytest.raises(InputError, match=r"dup\.jsonl.*1 duplicate id.*'a' x2"):
        read_texts(jl)
    csv_path = tmp_path / "dup.csv"
    csv_path.write_text("id,text\nq,one\nq,two\n")
    with pytest.raises(InputError, match=r"dup\.csv.*'q' x2"):
        read_texts(csv_path)


def test_json_array_files(tmp_path):
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["a dog", "a cat", ""]))
    names, texts, issues = read_texts(strings)
    assert (names, texts, issues) == (["1", "2", "3"], ["a dog", "a cat", ""], {})
    objects = tmp_path / "o.json"
    objects.write_text(json.dumps([{"id": "d", "text": "a dog"}, {"caption": "a cat"}, 5]))
    names, texts, issues = read_texts(objects)
    assert names == ["d", "2", "3"] and texts == ["a dog", "a cat", None]
    assert issues == {2: {"level": "error", "reason": "not a JSON object"}}
    wrong = tmp_path / "w.json"
    wrong.write_text(json.dumps({"text": "one caption"}))
    with pytest.raises(InputError, match=r"w\.json.*JSON dict.*array"):
        read_texts(wrong)


# --------------------------------------------------------------------------------------------
# one line, exit code 2, for bad models, files, devices and output locations
# --------------------------------------------------------------------------------------------
def test_bad_checkpoints_one_line(tiny, tmp_path, capsys):
    rand = tmp_path / "random.pt"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    other = tmp_path / "tiny_state.pt"
    torch.save(tiny.model.state_dict(), other)
    src = features_file(tmp_path, dim=128)
    cases = [(rand, "crossgap-demo", "it is not a PyTorch checkpoint of tensors"),
             (empty, "crossgap-demo", "the file is empty"),
             (other, "crossgap-demo", "do not fit the 'crossgap-demo' architecture"),
             (Path(__file__).parents[1] / "crossgap_fast/demo/assets/crossgap-demo.pt", "crossgap-tiny",
              "do not fit the 'crossgap-tiny' architecture")]
    for path, model, why in cases:
        code = cli.main(["invert", "images", "--input", str(src), "--out", str(tmp_path / "o"),
                         "--model", model, "--pretrained", str(path), "--no-progress"])
        line = one_line_error(capsys)
        assert code == 2 and str(path) in line and why in line, line
        assert "weights_only" not in line and "Half" not in line
    assert not (tmp_path / "o").exists()


def test_random_bytes_as_features_one_line(tmp_path, capsys):
    for name in ("x.npy", "x.pt"):
        path = tmp_path / name
        path.write_bytes(np.random.default_rng(1).bytes(2048))
        code = cli.main(["invert", "images", "--input", str(path), "--out", str(tmp_path / "o")] + TINY)
        line = one_line_error(capsys)
        assert code == 2 and name in line and "is unreadable" in line
        assert "weights_only" not in line and "allow_pickle" not in line and "trust" not in line


def test_bad_device_and_output_location_one_line(tmp_path, capsys):
    src = features_file(tmp_path)
    base = ["invert", "images", "--input", str(src), "--steps", "1"] + TINY
    assert cli.main(base + ["--out", str(tmp_path / "o"), "--device", "banana"]) == 2
    assert "device 'banana' is not a device" in one_line_error(capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(base + ["--out", str(blocker / "sub")]) == 2
    line = one_line_error(capsys)
    assert "cannot write" in line and "a_file/sub" in line and "Not a directory" in line


def test_full_disk_keeps_finished_shards(tiny, tmp_path, capsys, monkeypatch):
    src = features_file(tmp_path)
    out = tmp_path / "out"
    args = ["invert", "images", "--input", str(src), "--out", str(out), "--steps", "2",
            "--shard-size", "2"] + TINY
    real = os.replace
    landed = []

    def replace(a, b):  # the disk fills up after the first shard and its entry landed
        if Path(b).name.startswith("metadata_") and len(landed) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        if Path(b).name.startswith("metadata_"):
            landed.append(b)
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    assert cli.main(args) == 2
    line = one_line_error(capsys)
    assert "No space left on device" in line and "finished shards are kept" in line and "--resume" in line
    (worker,) = (out / "workers").glob("*.jsonl")
    assert [json.loads(line)["shard"] for line in worker.read_text().splitlines()] == [0]
    assert not [p for _, _, files in os.walk(out) for p in files if ".tmp-" in p]
    monkeypatch.setattr(os, "replace", real)
    assert cli.main(args + ["--resume"]) == 0
    assert "skipped 1 finished shard" in capsys.readouterr().out
    assert cli.main(["invert", "images", "--input", str(src), "--out", str(tmp_path / "full"),
                     "--steps", "2", "--shard-size", "2"] + TINY) == 0
    a, b = load_inversions(out), load_inversions(tmp_path / "full")
    assert torch.equal(a.features, b.features) and torch.equal(a.tokens, b.tokens)


def test_truncated_manifest_is_named(tmp_path, capsys):
    src = features_file(tmp_path)
    out = tmp_path / "out"
    args = ["invert", "images", "--input", str(src), "--out", str(out), "--steps", "1"] + TINY
    assert cli.main(args) == 0
    capsys.readouterr()
    path = out / "manifest.json"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptStoreError, match=r"manifest\.json.*unreadable.*JSONDecodeError"):
        load_inversions(out)
    assert cli.main(args + ["--resume"]) == 2
    assert "manifest.json" in one_line_error(capsys)


# --------------------------------------------------------------------------------------------
# what a resume checks and records
# --------------------------------------------------------------------------------------------
def test_image_contents_replaced_under_same_names_refuse_resume(tiny, tmp_path):
    root = tmp_path / "g"
    for i in range(3):
        save_png(root / f"{i}.png", i)
    out = tmp_path / "out"
    encode_gallery(root, out, tiny, workers=0, progress=False)
    assert encode_gallery(root, out, tiny, workers=0, progress=False, resume=True).shards_skipped == 1
    st = os.stat(root / "1.png")
    save_png(root / "1.png", 42, size=(21, 24))  # other picture, other size
    with pytest.raises(SettingsMismatchError, match="image sizes or modification times"):
        encode_gallery(root, out, tiny, workers=0, progress=False, resume=True)
    save_png(root / "1.png", 43)  # same size as the original, only the time differs
    os.utime(root / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(SettingsMismatchError, match="input"):
        encode_gallery(root, out, tiny, workers=0, progress=False, resume=True)


def test_batch_size_change_on_resume_warns_and_is_recorded(tiny, tmp_path, monkeypatch):
    src = features_file(tmp_path, n=6)
    out = tmp_path / "out"
    real = store_mod.GalleryStore.write_shard

    def stop_after_first(self, index, payload, entry):
        if index > 0:
            raise KeyboardInterrupt
        return real(self, index, payload, entry)

    monkeypatch.setattr(store_mod.GalleryStore, "write_shard", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        invert_gallery(src, out, tiny, steps=2, shard_size=3, batch_size=3, progress=False)
    monkeypatch.setattr(store_mod.GalleryStore, "write_shard", real)
    with pytest.warns(UserWarning, match=r"batch_size 2 \(recorded 3\).*float-rounding"):
        invert_gallery(src, out, tiny, steps=2, shard_size=3, batch_size=2, progress=False, resume=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["batch_size"] == 3 and manifest["threads"] == torch.get_num_threads()
    assert [(s["shard"], s["batch_size"]) for s in manifest["shards"]] == [(0, 3), (1, 2)]
    assert all(s["encode_batch_size"] == 128 for s in manifest["shards"])
