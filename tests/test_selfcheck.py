"""``crossgap selfcheck``: per-stage parity and throughput in one command, exit code 0 only when
every stage that ran agreed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from crossgap_fast import cli
from crossgap_fast.inversion.selfcheck import default_stages, parse_stages
from crossgap_fast.kernels import adamw as adamw_mod, attention as pa_mod, cosine as cosine_mod
from crossgap_fast.kernels import pseudo_patches as patches_mod, pseudo_tokens as tokens_mod


def test_selfcheck_on_cpu_writes_parity_and_throughput(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "crossgap_fast", "selfcheck", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and "open_clip" in env
    stages = {(r["stage"], r["method"]) for r in report["parity"]}
    assert stages == {(s, m) for s in ("eager-fp32", "eager-bf16") for m in ("oti", "ovi")}
    for row in report["parity"]:
        assert row["status"] == "agreed" and row["cos_min"] >= row["tolerance"]["cos_min"]
    fp32 = [r for r in report["parity"] if r["precision"] == "fp32"]
    assert all(r["cos_min"] > 0.9999 for r in fp32)  # the same loop in fp32: float rounding only
    rates = {r["method"]: r for r in report["throughput"]}
    assert set(rates) == {"oti", "ovi"}
    for r in rates.values():
        assert r["reference"] > 0 and r["fast"] > 0 and r["fast_path"] == "eager"
    assert "every stage agreed" in proc.stdout


def test_selfcheck_on_cuda_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["selfcheck", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["--device", "banana"], "is not a device"),
    (["--stages", "turbo-fp8"], "unknown stage 'turbo-fp8'"),
])
def test_selfcheck_bad_arguments(capsys, argv, match):
    assert cli.main(["selfcheck", *argv]) == 2
    assert match in capsys.readouterr().err


def test_a_stage_that_disagrees_fails_the_check(monkeypatch, tmp_path, capsys):
    """A Triton kernel with wrong values: the forced stage fails (no fallback in a selfcheck), the
    report says which one, and the exit code is 1."""
    monkeypatch.setattr(tokens_mod, "insert_pseudo_tokens_triton", tokens_mod.insert_pseudo_tokens_torch)
    monkeypatch.setattr(adamw_mod, "adamw_step_triton", adamw_mod.adamw_step_torch)
    monkeypatch.setattr(pa_mod, "prefix_attention_triton", pa_mod.prefix_attention_torch)
    monkeypatch.setattr(pa_mod, "prefix_attention_qkv_triton", pa_mod.prefix_attention_qkv_torch)
    monkeypatch.setattr(patches_mod, "expand_pseudo_patches_triton", patches_mod.expand_pseudo_patches_torch)
    monkeypatch.setattr(cosine_mod, "cosine_loss_triton",
                        lambda pred, target: cosine_mod.cosine_loss_torch(pred, target) + 0.05)
    out = tmp_path / "r.json"
    code = cli.main(["selfcheck", "--device", "cpu", "--stages", "eager-fp32,eager+kernels-fp32",
                     "--no-throughput", "--json", str(out)])
    assert code == 1
    rows = {(r["stage"], r["method"]): r for r in json.loads(out.read_text())["parity"]}
    assert rows["eager-fp32", "oti"]["status"] == "agreed"
    bad = rows["eager+kernels-fp32", "oti"]
    assert bad["status"] == "failed" and "self-check" in bad["error"]
    assert "FAILED" in capsys.readouterr().out


def test_stage_lists():
    cpu = torch.device("cpu")
    assert [s.name for s in default_stages(cpu)] == ["eager-fp32", "eager-bf16"]
    assert "compile-fp32" in [s.name for s in default_stages(cpu, everything=True)]
    cuda = [s.name for s in default_stages(torch.device("cuda"))]
    assert cuda[0] == "eager-fp32" and cuda[-1].startswith("compile+graph")
    assert [s.name for s in parse_stages("compile+graph+kernels-bf16", cpu)] == ["compile+graph+kernels-bf16"]
