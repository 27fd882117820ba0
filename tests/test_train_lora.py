"""Training a LoRA (``[lora]``): config validation, exact resume, the upside-down data option, and the acceptance
test: a LoRA trained on a tiny diffusers Stable Diffusion folder loads into diffusers' ``load_lora_weights`` and
gives the images ours gives, in the kohya and the diffusers format."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from helpers import SD_SCHEDULER, SIZE, captioned_images, free_port, tiny_components
from PIL import Image
from safetensors import safe_open

from unnoise import Pipeline
from unnoise.models import lora
from unnoise.train import config_from_dict, load_config, train
from unnoise.train.checkpoint import list_checkpoints, load_checkpoint
from unnoise.train.config import DataConfig
from unnoise.train.data import cache_key

PROMPT = "a red cat"
CAPTIONS = ("a red cat", "a blue dog", "a green bird", "a red dog", "a blue cat", "a green cat")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers StableDiffusionPipeline, its saved folder): a tiny random SD 1.x model with a DDIM scheduler."""
    theirs = diffusers.StableDiffusionPipeline(
        **tiny_components(tmp_path_factory.mktemp("tokenizer")), scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sd")
    theirs.save_pretrained(folder)
    return theirs, folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six RGB images with ``.txt`` captions (unnoise.data.folder), smooth enough for the tiny autoencoder."""
    return captioned_images(tmp_path_factory.mktemp("images"), CAPTIONS)


def lora_config(out_dir, base, images, *, lora_table=None, **train) -> dict:
    """A few LoRA steps on ``base`` at a learning rate high enough to move the images, without the EMA."""
    return {
        "task": "diffusion",
        "out_dir": str(out_dir),
        "seed": 1,
        "data": {"dataset": "folder", "path": str(images), "size": SIZE},
        "lora": {"base": str(base), "rank": 4, "alpha": 2.0, **(lora_table or {})},
        "diffusion": {"cond_dropout": 0.25, "sample_prompts": [PROMPT]},
        "optim": {"lr": 0.05, "decay": "constant", "warmup_steps": 0},
        "ema": {"decay": 0.0},
        "train": {"steps": 3, "batch_size": 4, "threads": 1, "log_every": 1, "sample_steps": 2, **train},
    }


# -- configuration ---------------------------------------------------------------------------------------------


def test_lora_config_round_trips_without_the_base_settings(tmp_path):
    data = {"out_dir": str(tmp_path), "lora": {"base": "default", "rank": 8, "targets": ["to_k", "to_v"]}}
    cfg = config_from_dict(data)
    assert cfg.lora.targets == ("to_k", "to_v") and cfg.lora.scale_alpha == 8.0 and cfg.lora.format == "kohya"
    plain = cfg.to_dict()
    assert "model" not in plain and "prediction" not in plain["diffusion"] and plain["lora"]["rank"] == 8
    assert config_from_dict(plain) == cfg
    assert "lora" not in config_from_dict({"out_dir": str(tmp_path)}).to_dict()  # configs without [lora] as before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora": {"base": "default", "bogus": 1}}, r"unknown keys \['lora.bogus'\]"),
        ({"lora": {"rank": 4}}, r"lora.base='' is not allowed; allowed: a pipeline folder"),
        ({"lora": {"base": "default", "rank": 0}}, r"lora.rank=0 is not allowed; allowed: an integer >= 1"),
        ({"lora": {"base": "default", "alpha": -1}}, r"lora.alpha=-1.0 is not allowed"),
        ({"lora": {"base": "default", "format": "peft"}}, r"lora.format='peft' is not supported; allowed .*kohya"),
        ({"lora": {"base": "default", "dropout": 1.0}}, r"lora.dropout=1.0 is not allowed; allowed: a number in"),
        ({"lora": {"base": "default", "targets": []}}, r"lora.targets=\(\) is not allowed"),
        ({"lora": {"base": "default", "convs": "yes"}}, r"lora.convs='yes' is not allowed; allowed: true or false"),
        ({"lora": "default"}, r"lora='default' is not allowed; allowed: a table"),
        (
            {"lora": {"base": "default"}, "model": {"block_out_channels": [8, 16]}},
            r"\['model.block_out_channels'\] conflict with the \[lora\] table",
        ),
        (
            {"lora": {"base": "default"}, "diffusion": {"prediction": "epsilon", "schedule": {}}},
            r"\['diffusion.prediction', 'diffusion.schedule'\] conflict .*allowed in \[diffusion\] with \[lora\]",
        ),
        ({"lora": {"base": "default"}, "task": "autoencoder"}, r"task='autoencoder' is not allowed; allowed: 'diff"),
        ({"data": {"upside_down": 1.5}}, r"data.upside_down=1.5 is not allowed; allowed: a finite number in"),
        (
            {"data": {"dataset": "folder", "path": "x", "upside_down": 0.5}},
            r"data.upside_down=0.5 is not allowed; allowed: 0 with data.dataset='folder'",
        ),
    ],
)
def test_lora_config_errors_name_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"out_dir": str(tmp_path), **change})


def test_the_shipped_config_loads():
    cfg = load_config("configs/mnist-lora-upside-down.toml")
    assert cfg.lora.base == "default" and cfg.data.upside_down > 0


def test_lora_errors_that_need_the_base(tmp_path, sd, images):
    with pytest.raises(ValueError, match=r"lora.targets=\['nothing'\] with lora.base=.*no layer of \['unet'\]"):
        train(config_from_dict(lora_config(tmp_path / "a", sd[1], images, lora_table={"targets": ["nothing"]})))
    bad = lora_config(tmp_path / "b", sd[1], images)
    bad["data"]["size"] = 36
    with pytest.raises(ValueError, match=r"data.size=36 is not allowed for lora.base=.*a multiple of 8"):
        train(config_from_dict(bad))
    bad = lora_config(tmp_path / "c", sd[1], images)
    bad["data"]["channels"] = 1
    with pytest.raises(ValueError, match=r"the autoencoder reads 3-channel images; the data set has 1"):
        train(config_from_dict(bad))


# -- the upside-down data option -----------------------------------------------------------------------------------


def test_upside_down_items_are_rotated_and_captioned_and_cached_apart():
    from unnoise.data.mnist import MNIST

    plain, mixed = MNIST("val", size=32), MNIST("val", size=32, upside_down=0.5)
    assert mixed.rotated.sum() == round(0.5 * len(mixed)) and not plain.rotated.any()
    rotated, upright = np.flatnonzero(mixed.rotated)[:4], np.flatnonzero(~mixed.rotated)[:4]
    np.testing.assert_array_equal(mixed.images[rotated], plain.images[rotated][:, ::-1, ::-1])
    np.testing.assert_array_equal(mixed.images[upright], plain.images[upright])
    chosen = np.concatenate([rotated, upright])
    batch = mixed.batch(chosen, np.random.default_rng(0))
    assert all("upside down" in c for c in batch.captions[:4]) and not any("upside" in c for c in batch.captions[4:])
    # the caption draws do not depend on the option: the upright items get the captions they always got
    assert batch.captions[4:] == plain.batch(chosen, np.random.default_rng(0)).captions[4:]
    # the latent cache tells the data sets apart; configs without the option keep their old keys
    assert "upside_down" not in cache_key(DataConfig())
    assert cache_key(DataConfig(upside_down=0.5))["upside_down"] == 0.5


# -- training, resume, export --------------------------------------------------------------------------------------


def test_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, sd, images):
    steps = {"checkpoint_every": 2, "keep": 5}
    whole = train(config_from_dict(lora_config(tmp_path / "whole", sd[1], images, steps=4, **steps)), log=print)
    train(config_from_dict(lora_config(tmp_path / "cut", sd[1], images, steps=2, **steps)), log=print)
    cut = train(config_from_dict(lora_config(tmp_path / "cut", sd[1], images, steps=4, **steps)), resume=True)
    changed = lora_config(tmp_path / "cut", sd[1], images, lora_table={"rank": 8}, steps=6, **steps)
    with pytest.raises(ValueError, match=r"differs from the checkpoint's: \[\"lora: .*'rank': 4.* -> .*'rank': 8"):
        train(config_from_dict(changed), resume=True)
    a, b = (load_checkpoint(list_checkpoints(path.parent)[-1])[0] for path in (whole, cut))
    assert whole.name == "lora.safetensors" and a.keys() == b.keys()
    assert any(key.startswith("net.model.layers.lora_unet_") for key in a)
    assert not any(key.startswith("net.model.") and "lora" not in key for key in a)  # only the adapter is trained
    for key in a:
        if not key.startswith("rng."):
            assert torch.equal(a[key], b[key]), key
    with safe_open(str(cut), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert json.loads(metadata["unnoise_targets"]) == list(lora.ATTENTION_TARGETS)
    assert metadata["unnoise_base_model_hash"] == Pipeline.from_pretrained(sd[1]).model_hash
    assert json.loads(metadata["unnoise_training_config"])["lora"]["base"] == str(sd[1])
    data = cut.read_bytes()  # kohya's sshs_model_hash: the sha256 of the bytes after the header
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert lora.lora_hash(cut) == metadata["sshs_model_hash"][:12]


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.float64) / 255 for img in images])


@pytest.mark.parametrize(
    "lora_table",
    [
        {},
        {"format": "diffusers"},
        {"convs": True},
        {"convs": True, "format": "diffusers"},
        {"text_encoder": True},
        {"text_encoder": True, "format": "diffusers"},
    ],
    ids=["kohya", "diffusers", "kohya-convs", "diffusers-convs", "kohya-text", "diffusers-text"],
)
def test_a_trained_lora_gives_diffusers_the_images_it_gives_us(tmp_path, sd, images, lora_table):
    theirs, folder = sd
    path = train(config_from_dict(lora_config(tmp_path / "run", folder, images, lora_table=lora_table)))
    ours = Pipeline.from_pretrained(folder)
    latents = torch.randn(2, 4, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(7))
    kwargs = dict(negative_prompt="blue dog", guidance_scale=6.0, height=SIZE, width=SIZE, latents=latents)
    base = pixels(ours(PROMPT, num_images=2, steps=8, seed=0, **kwargs))
    ours.load_lora(path)
    got = pixels(ours(PROMPT, num_images=2, steps=8, seed=0, **kwargs))
    theirs.load_lora_weights(str(path))
    try:
        with torch.no_grad():
            out = theirs(PROMPT, num_images_per_prompt=2, num_inference_steps=8, output_type="np", **kwargs)
    finally:
        theirs.unload_lora_weights()
    error, change = np.abs(got - out.images).max(), np.abs(got - base).max()
    print(f"{lora_table}: max abs difference {error * 255:.3f}/255, the LoRA changed pixels by {change * 255:.1f}")
    assert change > 10 / 255  # the LoRA moved the images: the comparison is not the base model's against itself
    assert error <= 2 / 255


def test_torchrun_two_processes_train_the_lora_as_one_does(tmp_path, sd, images):
    """The adapter runs the frozen U-Net in its forward, so DistributedDataParallel reduces its gradients."""
    from test_train import ROOT, write_toml

    single = lora_config(tmp_path / "single", sd[1], images, lora_table={"text_encoder": True}, steps=2)
    single["optim"]["lr"] = 1e-3  # AdamW's first steps are about lr * sign(gradient): a large lr magnifies rounding
    double = write_toml(tmp_path / "ddp.toml", dict(single, out_dir=str(tmp_path / "ddp")))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "-m", "unnoise.cli", "train", str(double)]
    ddp = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train(config_from_dict(single), log=lambda s: None)
    a, b = (load_checkpoint(list_checkpoints(tmp_path / name)[-1])[0] for name in ("single", "ddp"))
    assert any("lora_te_" in key for key in a)
    for key in (k for k in a if k.startswith(("net.", "ema."))):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


# -- the benchmarks ------------------------------------------------------------------------------------------------


def test_the_fine_tune_comparison_trains_the_same_model_on_the_same_data(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder is not installed
    from benchmarks import lora as bench
    from benchmarks.training import with_section
    from unnoise.models.io import read_json
    from unnoise.models.unet import UNetConfig
    from unnoise.pipeline.loading import DEFAULT_MODEL

    configs = bench.fine_tune_configs(batch=16, threads=1, out_dir=str(tmp_path))
    full, shipped, attention = configs["full"], configs["lora"], configs["lora-attention"]
    stored = {k: v for k, v in read_json(DEFAULT_MODEL / "unet" / "config.json").items() if k != "_type"}
    assert full.lora is None and full.network_config() == UNetConfig.from_dict(stored)
    assert full.data == shipped.data == attention.data and full.optim == shipped.optim and full.ema == shipped.ema
    assert attention.lora.targets == lora.ATTENTION_TARGETS and not attention.lora.convs
    side = {"s_per_step": 1.0, "cpu_s_per_step": 1.0, "rss_before": 1 << 20, "rss_peak": 3 << 20, "trainable": 5}
    measured = {"sides": dict.fromkeys(bench.FINE_TUNE_SIDES, side), "batch": 16, "steps": 1, "threads": 1}
    section = bench.fine_tune_section(measured | {"rounds": 1}, "python benchmarks/training.py --lora")
    text = with_section("# T\n\nbody\n\n" + bench.FINE_TUNE_HEADING + "\n\nold\n\n## After\n", section)
    assert "old" not in text and text.endswith("\n\n## After\n") and "| 3 | 2 | 1.00x | 1.00x |" in text
