"""`crossgap demo` and the built-in default model."""

from __future__ import annotations

import json

import torch
from PIL import Image

import crossgap_fast as cg
from crossgap_fast import cli, defaults
from crossgap_fast.demo import demo_checkpoint_path


def test_demo_model_is_the_default_and_loads_the_shipped_weights():
    model = cg.load_model("crossgap-demo")
    shipped = torch.load(demo_checkpoint_path(), map_location="cpu", weights_only=True)
    shipped = shipped.get("state_dict", shipped)
    key = "token_embedding.weight"
    torch.testing.assert_close(model.model.state_dict()[key], shipped[key].float())
    torch.manual_seed(0)
    random = cg.load_model("crossgap-demo", pretrained="random")
    assert not torch.allclose(random.model.state_dict()[key], model.model.state_dict()[key])
    assert defaults.DEFAULT_MODEL == "crossgap-demo"


def test_demo_command_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "image retrieval on crossgap demo gallery" in printed
    assert "zero-shot classification" in printed and "items/s" in printed
    report = json.loads((out / "report.json").read_text())
    assert {"intra", "oti", "oti_warm_15_steps", "centered", "text_subspace"} <= set(report["rows"])
    assert report["labels"]["oti_warm_15_steps"] == "oti warm (15 steps)"
    assert set(report["rows"]["intra"]) >= {"map", "map_at_r", "map_at_r_authors", "p_at_r", "r_at_1"}
    assert report["versions"]["crossgap_fast"] == cg.__version__ and report["throughput_items_per_s"]
    zeroshot = json.loads((out / "zeroshot.json").read_text())
    assert set(zeroshot["rows"]) == {"inter", "intra_oti"} and zeroshot["rows"]["inter"]["top_1"] > 0
    assert "OTI warm start: 128 queries x 15 steps" in printed
    assert "best of 3 runs each" in printed  # the speed-up compares the fastest timed runs
    assert len(cg.load_inversions(out / "oti-gallery-4")) == 346  # the map's fitting set
    assert report["rows"]["intra"]["num_queries"] == 128
    assert sorted(int(k) for k in report["curve"]) == [0, 4]
    for picture in ("report.png", "retrievals.png"):
        with Image.open(out / picture) as im:
            assert im.size[0] >= 1000 and im.size[1] >= 400  # readable, not a thumbnail
    inverted = cg.load_inversions(out / "oti-4")
    assert len(inverted) == 128 and inverted.tokens.shape == (128, 1, 128)
    # the queries' image paths are kept (the encode run's folder is the OTI run's input)
    import pyarrow.parquet as pq

    paths = pq.read_table(out / "oti-4" / "metadata").column("image_path").to_pylist()
    assert len(paths) == 128 and all(p and p == n for p, n in zip(paths, inverted.names))
    # A rerun reuses the stored inversions and gives the same table, with no bar for the work
    # already done and no rate for the work it did not do.
    assert cli.main(["demo", "--out", str(out), "--steps", "4"]) == 0
    rerun = capsys.readouterr()
    assert "reused from an earlier run" in rerun.out and "0.0 items/s" not in rerun.out
    assert "0/0" not in rerun.err
    again = json.loads((out / "report.json").read_text())
    assert again["rows"] == report["rows"]


def test_cli_without_pretrained_uses_the_demo_weights_only_for_the_demo_model(tmp_path, capsys):
    code = cli.main(["invert", "texts", "--input", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o"),
                     "--model", "ViT-B-32"])
    assert code == 2
    assert "no --pretrained given for --model ViT-B-32" in capsys.readouterr().err
