"""Warm-started vs exact inversion on the shipped demo model, in one run: items/s and mean final
loss (1 - cos of inverted and input feature) in ``extra_info``.

OTI: the map is fitted on the 346 gallery images' 150-step OTI; the 128 query images are
inverted exactly (150 steps, random start) and from the predicted start (15 steps). OVI: fitted
on 64 gallery captions' 1000-step OVI ("a photo of a {title}."); 32 query-image captions,
1000 exact steps vs 150 warm steps. Fitting is set-up, not timed; the warm timing includes the
prediction. ``scripts/measure_warm_start.py`` gives the full tables. Under
``--benchmark-disable`` every size shrinks so the file stays a quick smoke test.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import crossgap_fast as cg
from crossgap_fast.demo import DEMO_PROMPT, demo_gallery, load_demo_model
from crossgap_fast.defaults import DEFAULT_WARM_STEPS as WARM_STEPS
from timing import first_call

# method -> (fit items, fit steps, eval items, exact steps, warm steps), full / smoke
SIZES = {
    "oti": {"full": (346, 150, 128, 150, WARM_STEPS["oti"]), "smoke": (32, 5, 8, 5, 2)},
    "ovi": {"full": (64, 1000, 32, 1000, WARM_STEPS["ovi"]), "smoke": (32, 5, 8, 5, 2)},
}
_RATES: dict[str, dict[str, float]] = {}  # group -> start -> items/s, for the speed-up


@dataclass
class Problem:
    model: cg.ClipModel
    ws: cg.WarmStart
    inputs: torch.Tensor  # features to invert
    exact_steps: int
    warm_steps: int


def _images(split: str, n: int, model) -> torch.Tensor:
    paths = demo_gallery(split)[0][:n]
    return cg.encode_images([Image.open(p).convert("RGB") for p in paths], model)


def _captions(split: str, n: int, model, exclude=()) -> torch.Tensor:
    titles = sorted(set(demo_gallery(split)[2]) - set(exclude))
    return cg.encode_texts([DEMO_PROMPT.format(t) for t in titles[:n]], model)


@pytest.fixture(scope="module")
def demo_problems(request) -> dict[str, Problem]:
    size = "smoke" if request.config.getoption("benchmark_disable", False) else "full"
    model = load_demo_model()
    out = {}
    for method, fn in (("oti", cg.oti), ("ovi", cg.ovi)):
        n_fit, fit_steps, n_eval, exact, warm = SIZES[method][size]
        if method == "oti":
            fit_x, inputs = _images("gallery", n_fit, model), _images("query", n_eval, model)
            ws = cg.fit_warm_start(fit_x, fn(fit_x, model, steps=fit_steps), model=model,
                                   template="a photo of {}")
        else:
            query_titles = demo_gallery("query")[2]
            fit_x, inputs = _captions("gallery", n_fit, model, query_titles), _captions("query", n_eval, model)
            ws = cg.fit_warm_start(fit_x, fn(fit_x, model, steps=fit_steps), model=model)
        out[method] = Problem(model, ws, inputs, exact, warm)
    return out


@pytest.mark.parametrize("start", ["exact", "warm"])
@pytest.mark.parametrize("method", ["oti", "ovi"])
def test_demo_warm_start(measure, benchmark, demo_problems, method, start):
    p = demo_problems[method]
    x, n = p.inputs, len(p.inputs)
    steps = p.exact_steps if start == "exact" else p.warm_steps
    inv = cg.Inverter(p.model, method=method, steps=steps)
    setup = first_call(inv, x)  # built and warmed outside the timing (the same shapes)
    if start == "exact":
        run = lambda: inv.run(x)  # noqa: E731
    else:
        run = lambda: inv.run(x, init=p.ws.init(x))  # noqa: E731
    group = f"demo {method} warm start n={n}"
    slow = method == "ovi" and start == "exact"
    res = measure(run, group=group, provider=f"{start} {steps} steps", work=n, unit="items",
                  rounds=1 if slow else 3, warmup_rounds=0, setup=setup)
    loss = float((1 - F.cosine_similarity(res.features.double(), x.double())).mean())
    benchmark.extra_info.update(method=method, start=start, steps=steps, n_fit=p.ws.n_fit,
                                mean_final_loss=loss)
    rate = benchmark.extra_info.get("items_per_s")
    if rate is not None:
        _RATES.setdefault(group, {})[start] = rate
        if start == "warm" and "exact" in _RATES[group]:
            benchmark.extra_info["speedup_over_exact"] = rate / _RATES[group]["exact"]
    assert torch.isfinite(res.features).all() and 0 <= loss < 1
