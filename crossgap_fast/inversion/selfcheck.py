"""``crossgap selfcheck``: does every fast stage agree with the reference on this device, and how fast is it?

The first thing to run on a new machine. It prints the environment, then runs OTI and OVI with
each fast stage forced on (no fallback: ``selfcheck="strict"``) and compares the result with
the paper's loop in fp32 (same starts, same targets), then times the reference against the
fast engine's default path. Every result is appended to the JSON report as soon as it exists,
so an interrupted check keeps what it measured. The check passes when every stage that ran
agreed within its precision's tolerance.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from crossgap_fast.files import atomic_write_json
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.engine import FastPath
from crossgap_fast.inversion.inputs import initial_tokens
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.kernels import triton_available
from crossgap_fast.models import ClipModel
from crossgap_fast.towers.text import check_text_tower
from crossgap_fast.towers.vision import check_vision_tower

#: Per precision: smallest mean and minimum cosine of the final features to the fp32
#: reference, and the largest loss difference along the curve (the CPU tier's parity rule for
#: fp32; bf16 / fp16 trajectories drift apart by rounding, as the GPU tier allows).
PARITY_TOLERANCES = {
    "fp32": {"cos_mean": 0.9999, "cos_min": 0.999, "max_loss_diff": 1e-3},
    "bf16": {"cos_mean": 0.99, "cos_min": 0.95, "max_loss_diff": 5e-2},
    "fp16": {"cos_mean": 0.99, "cos_min": 0.95, "max_loss_diff": 5e-2},
}
#: Samples and steps of the parity runs.
PARITY_SAMPLES = 8
PARITY_STEPS = {"oti": 10, "ovi": 10}
#: Throughput runs: (samples, steps) per device type and method.
THROUGHPUT_SIZES = {
    "cpu": {"oti": (32, 5), "ovi": (8, 3)},
    "cuda": {"oti": (1024, 20), "ovi": (256, 10)},
}


@dataclass(frozen=True)
class Stage:
    """A fast path forced on at one precision."""

    path: FastPath
    precision: str

    @property
    def name(self) -> str:
        return f"{self.path.name}-{self.precision}"

    def settings(self) -> dict:
        p = self.path
        return {"compile": p.compile, "cuda_graph": p.graph, "use_kernels": p.kernels,
                "precision": self.precision, "selfcheck": "strict"}


def default_stages(device: torch.device, everything: bool = False) -> list[Stage]:
    """The stages worth checking on ``device``: on CUDA every rung of the fallback ladder in
    bf16 plus eager fp32; on the CPU eager fp32 and bf16 (``everything`` adds compile and, when
    Triton's interpreter is on (TRITON_INTERPRET=1), the Triton kernels, which take minutes there)."""
    if device.type == "cuda":
        kernels = triton_available()
        paths = [FastPath(), FastPath(kernels=kernels), FastPath(compile=True),
                 FastPath(compile=True, graph=True), FastPath(compile=True, graph=True, kernels=kernels)]
        stages = [Stage(FastPath(), "fp32")] + [Stage(p, "bf16") for p in dict.fromkeys(paths)]
        return stages
    stages = [Stage(FastPath(), "fp32"), Stage(FastPath(), "bf16")]
    if everything:
        stages.append(Stage(FastPath(compile=True), "fp32"))
        if triton_available(device):
            stages.append(Stage(FastPath(kernels=True), "fp32"))
    return stages


def parse_stages(text: str, device: torch.device) -> list[Stage]:
    """``"all"``, or a comma list of stage names such as ``compile+graph-bf16``."""
    if text == "all":
        return default_stages(device, everything=True)
    known = {s.name: s for s in default_stages(device, everything=True)}
    for p in (FastPath(), FastPath(kernels=True), FastPath(compile=True), FastPath(graph=True),
              FastPath(compile=True, graph=True), FastPath(compile=True, kernels=True),
              FastPath(graph=True, kernels=True), FastPath(compile=True, graph=True, kernels=True)):
        for prec in PARITY_TOLERANCES:
            known.setdefault(Stage(p, prec).name, Stage(p, prec))
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name not in known:
            raise ValueError(f"unknown stage {name!r}; known: all, {', '.join(sorted(known))}")
        out.append(known[name])
    return out


def environment(device: torch.device) -> dict:
    """Versions and the device, as a report's header."""
    import open_clip

    from crossgap_fast.version import __version__

    env: dict[str, Any] = {
        "crossgap_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "open_clip": open_clip.__version__, "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(), "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _problem(cm: ClipModel, method: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, cm.embed_dim, generator=gen)
    width = check_text_tower(cm.model).width if method == "oti" else check_vision_tower(cm.model).width
    return feats, initial_tokens(n, 1, width, seed=seed)


def parity(fast, ref, precision: str) -> dict:
    """Agreement of a fast result with the reference, and whether it is within tolerance."""
    cos = F.cosine_similarity(fast.features.double(), ref.features.double(), dim=-1)
    out = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
           "max_loss_diff": float((fast.losses - ref.losses).abs().max())}
    tol = PARITY_TOLERANCES[precision]
    out["agreed"] = (out["cos_mean"] >= tol["cos_mean"] and out["cos_min"] >= tol["cos_min"]
                     and out["max_loss_diff"] <= tol["max_loss_diff"])
    out["tolerance"] = tol
    return out


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def run_selfcheck(
    cm: ClipModel,
    *,
    stages: list[Stage] | None = None,
    json_path: str | os.PathLike | None = None,
    throughput: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the check on ``cm``'s device; returns the report (``report["passed"]``)."""
    device = cm.device
    stages = default_stages(device) if stages is None else stages
    report: dict[str, Any] = {"environment": environment(device), "model": cm.name,
                              "pretrained": cm.pretrained or "random", "parity": [], "throughput": [],
                              "passed": None}

    def save() -> None:
        if json_path is not None:
            atomic_write_json(json_path, report)

    env = report["environment"]
    echo(f"crossgap selfcheck on {env['device']} ({env['device_name']}"
         + (f", sm_{env['capability'].replace('.', '')}" if "capability" in env else "") + ")")
    echo("  " + ", ".join(f"{k} {env[k]}" for k in ("crossgap_fast", "torch", "triton", "open_clip", "python")))
    echo(f"  model {cm.name} ({report['pretrained']})")
    save()

    echo("\nparity against the reference (fp32), "
         f"{PARITY_SAMPLES} samples, OTI {PARITY_STEPS['oti']} / OVI {PARITY_STEPS['ovi']} steps:")
    echo(f"  {'stage':<30}{'method':<7}{'cos mean':>10}{'cos min':>10}{'loss diff':>11}  result")
    all_ok = True
    for method in ("oti", "ovi"):
        feats, init = _problem(cm, method, PARITY_SAMPLES)
        base = InversionConfig(method=method, steps=PARITY_STEPS[method])
        ref = Inverter(cm, base.replace(backend="reference", precision="fp32")).run(feats, init=init)
        for stage in stages:
            row: dict[str, Any] = {"stage": stage.name, "method": method, "precision": stage.precision}
            t0 = time.perf_counter()
            try:
                fast = Inverter(cm, base.replace(**stage.settings())).run(feats, init=init)
            except Exception as err:  # a stage that cannot run here is a failed stage
                row.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0])
            else:
                p = parity(fast, ref, stage.precision)
                row.update(p, status="agreed" if p["agreed"] else "disagreed", ran=fast.info["fast_path"],
                           selfcheck=fast.info["selfcheck"].get("status"))
            row["seconds"] = time.perf_counter() - t0
            all_ok &= row["status"] == "agreed"
            report["parity"].append(row)
            save()
            if "cos_mean" in row:
                echo(f"  {stage.name:<30}{method:<7}{row['cos_mean']:>10.6f}{row['cos_min']:>10.6f}"
                     f"{row['max_loss_diff']:>11.2e}  {row['status']}")
            else:
                echo(f"  {stage.name:<30}{method:<7}{'':>31}  FAILED: {row['error']}")

    if throughput:
        echo("\nthroughput (sample-steps/s; fast = the default path, timed on its second run):")
        sizes = THROUGHPUT_SIZES["cuda" if device.type == "cuda" else "cpu"]
        for method, (n, steps) in sizes.items():
            feats, init = _problem(cm, method, n)
            cfg = InversionConfig(method=method, steps=steps)
            row = {"method": method, "samples": n, "steps": steps}
            try:
                inv = Inverter(cm, cfg)
                first, row["fast_first_call_s"] = _timed(lambda: inv.run(feats, init=init), device)
                res, secs = _timed(lambda: inv.run(feats, init=init), device)
                row.update(fast_path=res.info["fast_path"], fast=n * steps / secs)
                ref_n = min(n, 256)
                _, secs = _timed(lambda: Inverter(cm, cfg.replace(backend="reference")).run(
                    feats[:ref_n], init=init[:ref_n]), device)
                row["reference"] = ref_n * steps / secs
                row["speedup"] = row["fast"] / row["reference"]
                echo(f"  {method.upper()} {n} x {steps}: reference {row['reference']:.1f}, fast "
                     f"({row['fast_path']}) {row['fast']:.1f}, {row['speedup']:.1f}x "
                     f"(first call {row['fast_first_call_s']:.1f} s)")
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
                echo(f"  {method.upper()}: FAILED: {row['error']}")
            report["throughput"].append(row)
            save()

    report["passed"] = bool(all_ok)
    save()
    echo("\nselfcheck " + ("passed: every stage agreed with the reference" if all_ok else
                           "FAILED: see the stages above"))
    if json_path is not None:
        echo(f"wrote {json_path}")
    sys.stdout.flush()
    return report
