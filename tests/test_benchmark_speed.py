"""benchmarks/speed.py end to end on the embedded model at tiny N, and its quality cache."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder is not installed

from benchmarks import speed  # noqa: E402
from unnoise.eval import Context, Scorers, evaluate_setting, resolve_setting  # noqa: E402
from unnoise.eval.features import MNISTFeatures  # noqa: E402
from unnoise.eval.reference import load_reference  # noqa: E402
from unnoise.eval.samples import digit_plan  # noqa: E402
from unnoise.models.classifier import SHIPPED_WEIGHTS  # noqa: E402
from unnoise.pipeline import Pipeline  # noqa: E402
from unnoise.pipeline.loading import DEFAULT_MODEL  # noqa: E402
from unnoise.train.distributed import World  # noqa: E402


@pytest.fixture
def two_step_model(tmp_path):
    """The embedded model with a 2-step default, so that the default row (the base of every ratio) is cheap."""
    folder = tmp_path / "model"
    folder.mkdir()
    for part in ("unet", "vae"):
        (folder / part).symlink_to(DEFAULT_MODEL / part)
    config = json.loads((DEFAULT_MODEL / "pipeline.json").read_text())
    config["sampling"]["steps"] = 2
    (folder / "pipeline.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow  # the script three times end to end (about 20 s of CPU): `make test-slow`
def test_speed_script_writes_the_report_and_reuses_quality(two_step_model, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(two_step_model), "-n", "10", "--grids", "euler:trailing", "--nfe", "1", "--threads", "1",
              "--high-grids", "0", "--cache-intervals", "2", "--cache-on", "", "--batches", "1,2", "--rounds", "1,1",
              "--latent-digits", "20", "--out", str(out)]  # fmt: skip
    first = speed.main([*common, "--bf16-nfe", "1"])
    assert {p.name for p in out.iterdir()} == {"speed.md", "speed.json", "speed.png", speed.QUALITY_FILE}
    rows = {r["key"]: r for r in first["rows"]}
    base = rows[first["default"]]
    assert (base["sampler"], base["steps"], base["spacing"], base["guidance_scale"]) == ("dpmpp_2m", 2, "trailing", 3)
    families = sorted(r["family"] for r in first["rows"])
    assert families == ["bf16", "bf16", "cache", "sampler", "sampler"]
    assert base["speed"]["batch1"]["ratio"] == 1.0 and base["speed"]["batch2"]["ratio"] == 1.0
    # the sweep row's quality is what unnoise.eval measures for that setting on the same plan
    euler = rows["default/fp32/euler/trailing/steps1/guidance3"]
    pipe = Pipeline.from_pretrained(two_step_model)
    features = MNISTFeatures.load(SHIPPED_WEIGHTS)
    ctx = Context(Scorers(features, classifier=features), ("fid", "adherence"), load_reference("mnist-train", features),
                  None, World(0, 1, torch.device("cpu")))  # fmt: skip
    direct = evaluate_setting(pipe, digit_plan(10, 0), resolve_setting(pipe, sampler="euler", steps=1), ctx)
    assert euler["quality"]["fid"] == direct["metrics"]["fid"]
    assert euler["quality"]["adherence"] == direct["metrics"]["adherence"]["overall"]
    # approximations are compared with their exact setting's pixels; bf16 of the default is timed, not scored
    cached = next(r for r in first["rows"] if r["family"] == "cache")
    assert cached["exact"] == first["default"] and cached["max_pixel_difference"] > 0
    bf16 = [r for r in first["rows"] if r["family"] == "bf16"]
    assert [r["quality"] is None for r in bf16] == [True, False]
    assert all(0 < r["max_pixel_difference"] <= 64 for r in bf16)  # bf16 rounding, not another image
    assert first["quality_cache"] == {"file": speed.QUALITY_FILE, "reused": 0, "computed": 4}
    text = (out / "speed.md").read_text()
    assert "## Headline" in text and first["headline"]["label"] in text and "bf16 hardware: amx_bf16" in text
    # a second run takes every quality result from the file and measures speed anew
    second = speed.main([*common, "--bf16", "off"])
    assert second["quality_cache"] == {"file": speed.QUALITY_FILE, "reused": 3, "computed": 0}
    again = {r["key"]: r for r in second["rows"]}
    assert again[euler["key"]]["quality"]["fid"] == euler["quality"]["fid"]
    # --estimate projects only what the file does not hold yet: here nothing of the sweep
    capsys.readouterr()
    assert speed.main([*common, "--estimate"]) is None
    assert capsys.readouterr().out.startswith("0 of 2 sweep rows to compute x 10 images")
    kept = out / speed.QUALITY_FILE  # --fresh ignores what it holds (and rewrites it as rows are measured)
    assert len(speed.QualityCache(kept).entries) == 4 and not speed.QualityCache(kept, fresh=True).entries


def test_grids_and_budgets():
    assert speed.parse_grids("gauss_pc:tau,heun:karras") == [("gauss_pc", "tau"), ("heun", "karras")]
    assert ("unipc", "exponential") in speed.parse_grids("all") and ("ddim", "trailing") not in speed.parse_grids("all")
    for bad in ("gauss_pc:uniform", "euler_a:trailing", "ddim:trailing", "gauss_pc"):
        with pytest.raises(ValueError, match="--grids"):
            speed.parse_grids(bad)
    # Heun makes 2 steps - 1 evaluations: the most steps within each budget
    assert [speed.steps_for_budget("heun", b) for b in (2, 3, 4, 10, 20)] == [1, 2, 2, 5, 10]
    assert [speed.steps_for_budget("dpmpp_2m", b) for b in (2, 10)] == [2, 10]
