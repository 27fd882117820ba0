"""The training benchmark compares like with like: same weights, data and draws give the same loss on both sides."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder is not installed

from benchmarks import training as bench  # noqa: E402
from unnoise.models.io import diffusers_key  # noqa: E402


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    return bench.build(bench.TINY_UNET, "fp32", batch=4, out_dir=str(tmp_path_factory.mktemp("run")))


def test_same_weights_at_the_start(sides):
    ours = sides.ours.task.unet.state_dict()
    for key, value in sides.plain.model.state_dict().items():
        assert torch.equal(ours[diffusers_key(key)], value), key


def test_same_loss_on_the_same_draws_and_after_an_update(sides):
    """Step 1 on identical inputs; step 2 also checks that clipping, AdamW and the EMA moved both alike."""
    for step in (1, 2):
        draws = bench.ours_draws(sides.ours, step)
        ours, plain = sides.ours_step(), sides.plain_step(draws)
        assert ours == pytest.approx(plain, rel=1e-5), f"step {step}"
    ours = dict(sides.ours.task.unet.named_parameters())
    shadow = sides.ours.ema.shadow
    for (key, value), averaged in zip(sides.plain.model.named_parameters(), sides.plain.ema.shadow_params):
        assert (ours[diffusers_key(key)] - value).abs().max() < 1e-4, key  # 2 AdamW steps of lr 1e-4 at most
        assert (shadow[diffusers_key(key)] - averaged).abs().max() < 1e-4, key


def test_bf16_autocast_sides_agree(tmp_path):
    sides = bench.build(bench.TINY_UNET, "bf16+chunked", batch=4, out_dir=str(tmp_path))
    draws = bench.ours_draws(sides.ours, 1)
    assert sides.ours_step() == pytest.approx(sides.plain_step(draws), rel=1e-3)


def _result(ours_s: float, diffusers_s: float) -> dict:
    side = lambda s: {"s_per_step": s, "cpu_s_per_step": s / 2, "wall": [s], "cpu": [s / 2], "mean_loss": 0.5}  # noqa: E731
    return {"ours": side(ours_s), "diffusers": side(diffusers_s), "ratio": diffusers_s / ours_s, "cpu_ratio": 1.0}


def test_report_table():
    meta = {
        "command": "python benchmarks/training.py",
        "date": "2000-01-01",
        "machine": "a CPU",
        "diffusers": "0.0",
        "load_start": 1.0,
        "load_end": 2.0,
        "unet": bench.UNET,
        "params": 1_500_000,
        "batch": 64,
        "warmup": 1,
        "repeats": 7,
        "block": 1,
        "threads": 1,
    }
    text = bench.report({"fp32": _result(2.0, 1.0), "bf16": _result(1.0, 2.0)}, meta)
    lines = text.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| setting |")))
    assert lines[header + 2] == "| fp32 | 0.500 | 1.000 | 32.0 | 64.0 | 0.500 | 1.00 | 0.50 | 1.000 | 0.5000 | 0.5000 |"
    assert lines[header + 3] == "| bf16 | 1.000 | 0.500 | 64.0 | 32.0 | 2.000 | 0.50 | 1.00 | 1.000 | 0.5000 | 0.5000 |"
    assert "`python benchmarks/training.py` on 2000-01-01" in text
    assert "- fp32: 0.500x by wall time (not met), 1.000x by CPU time (met)." in lines
    assert "- bf16: 2.000x by wall time (met), 1.000x by CPU time (met)." in lines
    assert "- fp32: 2.00 | 1.00" in lines  # the per-block wall seconds


def test_main_runs_end_to_end():
    out = bench.main(["--tiny", "--quick", "--settings", "fp32"])
    row = next(line for line in out["report"].splitlines() if line.startswith("| fp32 |"))
    assert len(row.split("|")) == 13
    assert "`python benchmarks/training.py --tiny --quick --settings fp32`" in out["report"]
    assert out["results"]["fp32"]["ours"]["s_per_step"] > 0 and out["results"]["fp32"]["diffusers"]["s_per_step"] > 0
