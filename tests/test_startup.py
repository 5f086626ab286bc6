"""Start-up: the commands that only read an output folder, and the store reader, run with torch,
open_clip and triton blocked from import; ``import crossgap_fast`` loads none of them, and every
public name still resolves (on first use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from test_store import features_of, new_store, write

import crossgap_fast as cg

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "triton")

#: Run first in the subprocess: any import of a blocked package raises ImportError, and every
#: attempt is recorded (an optional import caught by the code is still a failure of the test).
BLOCKER = textwrap.dedent(f"""
    import atexit, json, sys
    ATTEMPTS = []

    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                ATTEMPTS.append(name)
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Blocked())
    atexit.register(lambda: print("ATTEMPTS=" + json.dumps(ATTEMPTS), file=sys.stderr))
""")


def run_blocked(code: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``code`` after :data:`BLOCKER` in a fresh interpreter; the process and the blocked
    imports it attempted."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ATTEMPTS=")]
    assert lines, proc.stderr
    return proc, json.loads(lines[-1][len("ATTEMPTS="):])


def _finished_run(out: Path) -> None:
    """A finished two-shard run of known features (items 0..5, item 4 failed)."""
    store = new_store(out, total=6, shard_size=4)
    write(store, 0)
    write(store, 1, skip=(4,))
    store.finalize()


CLI = """
    import sys
    from crossgap_fast.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
    sys.exit(code)
"""


def test_help_imports_no_torch_open_clip_or_triton():
    proc, attempts = run_blocked(CLI, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "invert" in proc.stdout and "status" in proc.stdout
    assert attempts == []


def test_every_sub_command_help_imports_nothing_heavy():
    # building the whole parser (every option's help text) must not need the heavy packages
    for command in (["invert", "images"], ["encode", "texts"], ["eval", "retrieval"], ["export"],
                    ["selfcheck"], ["demo"]):
        proc, attempts = run_blocked(CLI, *command, "--help")
        assert proc.returncode == 0, (command, proc.stderr)
        assert attempts == [], command


def test_status_reads_a_run_without_torch(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    proc, attempts = run_blocked(CLI, "status", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["shards"]["done"] == 2 and report["items"]["failed"] == 1, report
    assert attempts == []


def test_export_rewrites_a_run_without_torch(tmp_path):
    out, to = tmp_path / "run", tmp_path / "exported"
    _finished_run(out)
    proc, attempts = run_blocked(CLI, "export", str(out), "--to", str(to), "--dtype", "float16",
                                 "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert attempts == []
    inv = cg.load_inversions(to)
    assert inv.indices.tolist() == [0, 1, 2, 3, 5]
    np.testing.assert_allclose(inv.features.numpy(), features_of([0, 1, 2, 3, 5]), rtol=1e-3)


def test_iter_inversions_reads_a_run_without_torch(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    code = """
        import sys
        import numpy as np
        from crossgap_fast import iter_inversions
        feats, names = [], []
        for arrays, meta in iter_inversions(sys.argv[1], ("features", "tokens"), batch_size=3):
            feats.append(arrays["features"])
            names += meta.column("name").to_pylist()
        np.save(sys.argv[2], np.concatenate(feats))
        print(",".join(names))
    """
    proc, attempts = run_blocked(code, str(out), str(tmp_path / "f.npy"))
    assert proc.returncode == 0, proc.stderr
    assert attempts == []
    assert proc.stdout.strip() == "item0,item1,item2,item3,item5"
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), features_of([0, 1, 2, 3, 5]))


def test_importing_the_package_loads_no_open_clip_dynamo_or_triton():
    code = """
        import sys
        import crossgap_fast
        print(",".join(m for m in ("torch", "open_clip", "triton", "torch._dynamo") if m in sys.modules))
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_every_public_name_resolves_and_is_listed():
    # a name added to __all__ but not to the lazy table (or the reverse) is caught here
    assert set(cg.__all__) == set(cg._EXPORTS) | set(cg._RENAMED) | {"__version__"}
    for name in cg.__all__:
        assert getattr(cg, name) is not None, name
    assert set(cg.__all__) <= set(dir(cg))
    assert cg.oti is cg.api.oti and cg.Inverter.__name__ == "Inverter"
    assert cg.__version__
    try:
        cg.not_a_name  # noqa: B018
    except AttributeError as err:
        assert "not_a_name" in str(err)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
