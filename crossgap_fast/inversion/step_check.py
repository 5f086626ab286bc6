"""The self-check of a fast path inside a run: does it agree with the plain eager step?

Once per compiled or captured shape in the process, after the first :data:`SELFCHECK_STEPS`
steps of its first chunk, the fast step is compared with the plain eager step at the same
precision on the rows of :func:`check_rows` (losses and token update directions), and the fp32
feature forward that gives the returned features with the plain one. On a disagreement each
stage is run alone against the plain step and only the stages that disagree on their own are
given up (:class:`~crossgap_fast.inversion.engine.StageFailure` names them).
(``crossgap selfcheck``, the command, is :mod:`crossgap_fast.inversion.selfcheck`.)
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from crossgap_fast.errors import DeviceFailure
from crossgap_fast.inversion.engine import STAGES, ChunkTooLarge, FastPath, StageFailure, Stepper

#: Steps the self-check compares.
SELFCHECK_STEPS = 3
#: Per autocast dtype: the largest loss difference and the smallest cosine between the token
#: updates of the fast and the plain step after ``SELFCHECK_STEPS`` steps. In fp32 the two differ
#: by reordered sums only. In bf16 / fp16 Adam's first steps move each element by about ``lr``
#: in the direction of its gradient's sign, so elements whose gradient is within rounding of
#: zero can flip (about 1% of them, measured on CPU bf16): the cosine stays near 0.98, while a
#: wrong kernel or an empty graph gives about 0.
SELFCHECK_TOLERANCES = {
    None: (1e-4, 0.999),
    torch.float16: (1e-2, 0.95),
    torch.bfloat16: (2e-2, 0.9),
}
#: Largest difference between the fast and the plain fp32 feature forward (the returned
#: features), relative to the largest feature value: reordered fp32 sums stay near 1e-6.
FEATURE_TOLERANCE = 1e-3
#: Rows per program of the kernels' tiles (attention 32 or 16, cosine and insertion 8 or 4 at
#: CLIP widths): the self-check takes the first and the last row of the first tile, the first
#: row of the second and the first and last row of the last tile of each.
KERNEL_TILES = (4, 8, 16, 32)


def check_rows(size: int) -> list[int]:
    """The rows of a chunk of ``size`` samples the self-check compares (at most 15)."""
    rows = {0, 1, size - 1}
    for tile in KERNEL_TILES:
        rows |= {tile - 1, tile, (size - 1) // tile * tile}
    return sorted(r for r in rows if 0 <= r < size)


def check(gp, st: Stepper, init: Tensor, target: Tensor, fast_losses: Tensor) -> None:
    """Compare the first steps of ``st`` (``fast_losses``) on the path of ``gp`` (a
    :class:`~.fast_path.GuardedPath`) and its feature forward with the plain eager ones. On a
    disagreement each stage runs alone, and :class:`StageFailure` names those that disagree on
    their own; else ``st`` is marked checked."""
    began, before = time.perf_counter(), gp.timings["compile_s"] + gp.timings["capture_s"]
    rows = torch.tensor(check_rows(init.shape[0]), device=init.device)
    steps = fast_losses.shape[1]
    plain_l, d_plain = _plain_run(gp, init[rows], target[rows], steps)
    d_fast = (st.tokens.detach()[rows] - init[rows]).flatten(1).float()
    agree, found = _agreement(fast_losses[rows].float(), d_fast, plain_l, d_plain, gp.amp)
    feature_diff = _feature_diff(gp, st.tokens.detach()[rows]) if gp.path.kernels else 0.0
    record = {"mode": gp.mode, "status": "passed", "path": gp.path.name, "samples": len(rows),
              "rows": rows.tolist(), "steps": steps, **found, "max_feature_diff": feature_diff,
              "tolerance": {"max_loss_diff": SELFCHECK_TOLERANCES[gp.amp][0],
                            "min_update_cos": SELFCHECK_TOLERANCES[gp.amp][1],
                            "max_feature_diff": FEATURE_TOLERANCE}}
    culprits: list[str] = []
    if not feature_diff <= FEATURE_TOLERANCE:
        culprits.append("kernels")  # the feature forward differs from the plain one by its kernels only
    if not agree:
        stages = [s for s in STAGES if getattr(gp.path, s)]
        alone = stages if len(stages) == 1 else [s for s in stages
                                                 if not _agrees_alone(gp, s, init, target, rows, plain_l, d_plain)]
        if not alone:
            record["isolation"] = "no stage disagreed on its own: all are given up"
        culprits += alone or stages
    # compiles and captures of the stages run alone are counted as such, not twice
    record["seconds"] = time.perf_counter() - began - (gp.timings["compile_s"] + gp.timings["capture_s"] - before)
    gp.spent("selfcheck", record["seconds"])
    if culprits:
        culprits = list(dict.fromkeys(culprits))
        record.update(status="failed", stages=culprits)
        gp.selfcheck = record
        raise StageFailure("+".join(culprits), "self-check against the plain eager step failed: "
                           + _why(found, feature_diff, gp.amp))
    gp.selfcheck = record
    if steps >= SELFCHECK_STEPS:  # a shorter comparison does not vouch for the shape's later runs
        st.check = record


def _plain_run(gp, init: Tensor, target: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Losses (k, steps) and token updates (k, R * d) of the plain eager step."""
    plain = gp.step_for(FastPath())
    st = Stepper(plain.loss_fn, init.shape[0], gp.token_shape, gp.embed_dim, gp.adamw(), gp.device, False)
    st.load(init, target)
    losses = []
    for _ in range(steps):
        st.step()
        losses.append(st.loss.clone())
    return torch.stack(losses, dim=1).float(), (st.tokens.detach() - init).flatten(1).float()


def _feature_diff(gp, tokens: Tensor) -> float:
    """The fast feature forward against the plain fp32 one, relative to the feature scale."""
    with torch.no_grad():
        fast = gp.feature_forward(tokens.clone()).float()
        plain = gp.step_for(FastPath()).feature_forward(tokens.clone()).float()
    if not bool(torch.isfinite(fast).all()):
        return float("inf")
    return float((fast - plain).abs().max() / plain.abs().max().clamp_min(1e-30))


def _agrees_alone(gp, stage: str, init: Tensor, target: Tensor, rows: Tensor,
                  plain_l: Tensor, d_plain: Tensor) -> bool:
    """Run the chunk's first steps with ``stage`` as the only fast stage; compare the rows."""
    path = FastPath(**{stage: True})
    shared = gp.step_for(path)
    try:
        st = gp.new_stepper(path, shared, init.shape[0])
        st.load(init, target)
        gp.prepare(st, path, shared)
        losses = []
        for _ in range(plain_l.shape[1]):
            st.run_step()
            losses.append(st.loss[rows].clone())
    except (ChunkTooLarge, DeviceFailure):
        raise
    except Exception as err:  # a stage that cannot even run alone is one to give up
        out = gp.failure(err, "step", init.shape[0], path)
        if isinstance(out, (ChunkTooLarge, DeviceFailure)):
            raise out from err
        return False
    d_fast = (st.tokens.detach()[rows] - init[rows]).flatten(1).float()
    return _agreement(torch.stack(losses, dim=1).float(), d_fast, plain_l, d_plain, gp.amp)[0]


def _agreement(fast_l: Tensor, d_fast: Tensor, plain_l: Tensor, d_plain: Tensor,
               amp: torch.dtype | None) -> tuple[bool, dict]:
    """Whether fast and plain losses and token updates agree within the tolerances of ``amp``."""
    finite = bool(torch.isfinite(fast_l).all() and torch.isfinite(d_fast).all())
    loss_diff = float((fast_l - plain_l).abs().max()) if finite else float("inf")
    cos = torch.nn.functional.cosine_similarity(d_fast.double(), d_plain.double(), dim=1, eps=1e-30)
    min_cos = float(cos.min()) if finite else float("nan")
    atol, min_ok = SELFCHECK_TOLERANCES[amp]
    return finite and loss_diff <= atol and min_cos >= min_ok, {
        "finite": finite, "max_loss_diff": loss_diff, "min_update_cos": min_cos}


def _why(found: dict, feature_diff: float, amp: torch.dtype | None) -> str:
    atol, min_ok = SELFCHECK_TOLERANCES[amp]
    if not found["finite"]:
        return "non-finite values"
    text = (f"max loss difference {found['max_loss_diff']:.3g} (tolerance {atol:g}), min update cosine "
            f"{found['min_update_cos']:.4f} (tolerance {min_ok:g})")
    if not feature_diff <= FEATURE_TOLERANCE:
        text += f", feature forward off by {feature_diff:.3g} (tolerance {FEATURE_TOLERANCE:g})"
    return text
