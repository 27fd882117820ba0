"""The trainer: config validation, LR and EMA schedules, checkpoints, exact resume after SIGKILL, torchrun DDP."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port
from safetensors.torch import load_file

from unnoise.train import config_from_dict, load_config, train
from unnoise.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_optimizer,
    optimizer_parts,
    save_checkpoint,
    unprefixed,
)
from unnoise.train.data import DataOrder
from unnoise.train.ema import EMA, ema_decay
from unnoise.train.loop import learning_rate

ROOT = Path(__file__).resolve().parents[1]

# A pixel-space, class-conditioned U-Net small enough to train a step in well under a second.
TINY_UNET = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=[8, 16],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=4,
    attention_head_dim=8,
    num_class_embeds=11,
)


def tiny_config(out_dir: Path, **train: object) -> dict:
    return {
        "task": "diffusion",
        "out_dir": str(out_dir),
        "seed": 3,
        "model": dict(TINY_UNET),
        "diffusion": {"conditioning": "class", "cond_dropout": 0.2, "sampling": {"sampler": "euler", "steps": 3}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "ema": {"decay": 0.9},
        "train": {"steps": 4, "batch_size": 8, "threads": 1, "log_every": 2, "sample_steps": 2, **train},
    }


def write_toml(path: Path, data: dict) -> Path:
    """A minimal TOML writer for the nested dicts of these tests."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for k, v in data.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml(v)}")
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return repr(v)


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(list_checkpoints(out_dir)[-1])
    return tensors


# -- configuration ---------------------------------------------------------------------------------------------


def test_config_round_trip_and_toml(tmp_path):
    data = tiny_config(tmp_path / "run")
    cfg = config_from_dict(data)
    assert config_from_dict(cfg.to_dict()) == cfg
    loaded = load_config(write_toml(tmp_path / "c.toml", data), {"train.steps": 9})
    assert loaded.train.steps == 9 and loaded.model == cfg.model and loaded.diffusion == cfg.diffusion


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, r"unknown keys \['bogus'\]"),
        ({"train": {"stepz": 3}}, r"unknown keys \['train.stepz'\]"),
        ({"train": {"steps": 0}}, r"train.steps=0 is not allowed"),
        ({"train": {"steps": "10"}}, r"train.steps='10' is not allowed; allowed: an integer"),
        ({"train": {"batch_size": 10, "accumulate": 4}}, r"train.batch_size=10 .* multiple of train.accumulate=4"),
        ({"optim": {"lr": -1.0}}, r"optim.lr=-1.0 is not allowed"),
        ({"optim": {"decay": "linear"}}, r"optim.decay"),
        ({"diffusion": {"prediction": "x"}}, r"diffusion.prediction"),
        ({"diffusion": {"schedule": {"beta_schedule": "cubic"}}}, r"schedule.beta_schedule"),
        ({"model": {"block_out_channels": [8, 16], "bogus": 2}}, r"\[model\] for task='diffusion'.*bogus"),
        ({"ema": {"decay": 1.0}}, r"ema.decay=1.0"),
        ({"data": {"dataset": "cifar"}}, r"data.dataset"),
        ({"data": {"dataset": "folder"}}, r"data.path is required"),
        ({"train": {"autocast": "fp8"}}, r"train.autocast"),
    ],
)
def test_config_errors_name_the_field(tmp_path, change, message):
    data = tiny_config(tmp_path)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "model":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("task = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


# -- schedules -------------------------------------------------------------------------------------------------


def test_learning_rate_warmup_then_cosine():
    cfg = config_from_dict({"optim": {"lr": 1.0, "warmup_steps": 10, "min_lr": 0.1}, "train": {"steps": 110}})
    assert learning_rate(5, cfg) == pytest.approx(0.5)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    constant = config_from_dict({"optim": {"lr": 0.3, "decay": "constant"}, "train": {"steps": 50}})
    assert learning_rate(40, constant) == 0.3


def test_ema_matches_closed_form():
    assert ema_decay(0, 0.999, 2 / 3) == 0.0
    assert ema_decay(3, 0.999, 2 / 3) == pytest.approx(1 - 4 ** (-2 / 3))
    assert ema_decay(10**6, 0.999, 2 / 3) == 0.999
    assert ema_decay(5, 0.9, 1.0, start_step=5) == 0.0
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5, warmup_power=1.0)
    start = model.weight.detach().clone()
    values = [start]
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)
        d = ema.update(model, step)
        assert d == pytest.approx(min(0.5, 1 - 1 / (1 + step)))
        values.append(d * values[-1] + (1 - d) * model.weight.detach())
    assert torch.allclose(ema.state_dict()["weight"], values[-1])


def test_data_order_is_epoch_permutations_and_resumable():
    order = DataOrder(5, seed=1)
    taken = np.concatenate([order.take(3) for _ in range(4)])
    expected = np.concatenate([np.random.default_rng([1, e]).permutation(5) for e in range(3)])[:12]
    assert np.array_equal(taken, expected)
    again = DataOrder(5, seed=1)
    again.load(order.state())
    assert np.array_equal(again.take(4), order.take(4))


# -- checkpoints -----------------------------------------------------------------------------------------------


def test_checkpoint_keeps_last_k_and_ignores_partial_writes(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2)
    (tmp_path / "checkpoints" / ".step_00000005.tmp").mkdir()  # a write killed before its rename
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # no state.json: not complete
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000003", "step_00000004"]
    tensors, state = load_checkpoint(found[-1])
    assert state == {"step": 4} and torch.equal(tensors["w"], torch.full((2,), 4.0))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000009")


def test_optimizer_state_round_trips_without_pickle():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    tensors, meta = optimizer_parts(opt)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_optimizer(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))


# -- training runs -----------------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unnoise.cli", "train", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    steps = dict(steps=30, checkpoint_every=4, keep=10)
    whole = write_toml(tmp_path / "whole.toml", tiny_config(tmp_path / "whole", **steps))
    cut = write_toml(tmp_path / "cut.toml", tiny_config(tmp_path / "cut", **steps))
    reference = run_cli(str(whole))
    victim = run_cli(str(cut))
    deadline = time.monotonic() + 120
    while not (tmp_path / "cut" / "checkpoints" / "step_00000008").exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = int(list_checkpoints(tmp_path / "cut")[-1].name.split("_")[1])
    assert 8 <= killed_at < 30
    resumed = run_cli(str(cut), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1]
    assert reference.wait(timeout=300) == 0, reference.communicate()[1]
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        if not key.startswith("rng."):
            assert torch.equal(a[key], b[key]), key
    exported = load_file(str(tmp_path / "cut" / "model" / "unet" / "model.safetensors"))
    assert torch.equal(exported["conv_in.weight"], unprefixed("ema", b)["conv_in.weight"])
    rows = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(2, 31, 2))  # no step logged twice


def test_resume_refuses_a_different_config_and_a_fresh_start_refuses_old_checkpoints(tmp_path):
    train(config_from_dict(tiny_config(tmp_path / "run", steps=2, checkpoint_every=2)), log=lambda s: None)
    changed = tiny_config(tmp_path / "run", steps=4)
    changed["optim"]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"optim: .*'lr': 0.001.* -> .*'lr': 0.5"):
        train(config_from_dict(changed), resume=True, log=lambda s: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config_from_dict(tiny_config(tmp_path / "run", steps=4)), log=lambda s: None)
    train(config_from_dict(tiny_config(tmp_path / "run", steps=4)), resume=True, log=lambda s: None)
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step_00000004"


def test_accumulation_equals_one_big_batch(tmp_path):
    one = train(config_from_dict(tiny_config(tmp_path / "a", steps=2)), log=lambda s: None)
    two = train(config_from_dict(tiny_config(tmp_path / "b", steps=2, accumulate=2)), log=lambda s: None)
    a, b = final_weights(one.parent), final_weights(two.parent)
    for key in (k for k in a if k.startswith("net.")):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_torchrun_two_processes_equal_one_process(tmp_path):
    single = write_toml(tmp_path / "single.toml", tiny_config(tmp_path / "single", steps=3))
    double = write_toml(tmp_path / "ddp.toml", tiny_config(tmp_path / "ddp", steps=3))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "-m", "unnoise.cli", "train", str(double)]
    ddp = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_cli(str(single))
    assert one.wait(timeout=300) == 0, one.communicate()[1]
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert load_checkpoint(list_checkpoints(tmp_path / "ddp")[-1])[1]["world_size"] == 2
    for key in (k for k in a if k.startswith(("net.", "ema."))):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


# -- the other tasks and data sets -------------------------------------------------------------------------------

TINY_VAE = dict(
    in_channels=1,
    out_channels=1,
    latent_channels=4,
    block_out_channels=[8, 8, 8],
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)


def test_autoencoder_with_discriminator_then_latent_text_diffusion_exports_a_pipeline(tmp_path):
    from unnoise.models.io import load_model
    from unnoise.pipeline import Pipeline

    vae_cfg = {
        "task": "autoencoder",
        "out_dir": str(tmp_path / "vae"),
        "model": TINY_VAE,
        "autoencoder": {"disc_weight": 0.1, "disc_start": 1, "disc_channels": 8, "disc_layers": 2, "scale_images": 64},
        "train": {"steps": 3, "batch_size": 4, "threads": 1, "log_every": 1},
    }
    folder = train(config_from_dict(vae_cfg), log=lambda s: None)
    vae = load_model(folder)
    rows = (tmp_path / "vae" / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[3:6] == ["loss", "kl", "disc_loss"] and rows[1].split(",")[5] == ""  # disc from step 2
    assert rows[3].split(",")[5] != ""
    # the exported scaling factor is 1 / std of posterior samples of the first scale_images training images
    from unnoise.data.mnist import MNIST
    from unnoise.models.vae import DiagonalGaussian

    x = MNIST("train", size=32).batch(np.arange(64), np.random.default_rng(0)).images
    with torch.no_grad():
        z = DiagonalGaussian(vae._moments(x)).sample(torch.Generator().manual_seed(0))
    assert vae.config.scaling_factor == pytest.approx(float(1 / z.std()), rel=1e-5)

    unet = dict(TINY_UNET, sample_size=8, in_channels=4, out_channels=4, num_class_embeds=None)
    unet |= {
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }
    unet |= {"mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": 384}
    ldm_cfg = {
        "out_dir": str(tmp_path / "ldm"),
        "model": unet,
        "diffusion": {
            "conditioning": "text",
            "autoencoder": str(tmp_path / "vae"),
            "text_encoder": {"max_length": 16},
            "sampling": {"sampler": "euler", "steps": 2, "guidance_scale": 2.0},
        },
        "train": {"steps": 2, "batch_size": 4, "threads": 1, "sample_steps": 2},
    }
    pipe = Pipeline.from_pretrained(train(config_from_dict(ldm_cfg), log=lambda s: None))
    image = pipe("a handwritten digit 3", steps=2, seed=1)[0]
    assert image.size == (32, 32) and image.mode == "L"
    assert (tmp_path / "ldm" / "samples" / "step_00000002.png").exists()


def test_the_discriminator_has_its_own_learning_rate_and_the_loop_names_no_task(tmp_path):
    cfg = {
        "task": "autoencoder",
        "out_dir": str(tmp_path / "vae"),
        "model": TINY_VAE,
        "autoencoder": {"disc_weight": 0.1, "disc_channels": 8, "disc_layers": 2, "disc_lr": 3e-4, "scale_images": 8},
        "optim": {"lr": 1e-3, "decay": "constant"},
        "train": {"steps": 2, "batch_size": 2, "threads": 1},
    }
    train(config_from_dict(cfg), log=lambda s: None)
    _, state = load_checkpoint(list_checkpoints(tmp_path / "vae")[-1])
    lrs = {name: meta["param_groups"][0]["lr"] for name, meta in state["optimizers"].items()}
    assert lrs == pytest.approx({"model": 1e-3, "disc": 3e-4}, rel=1e-12)
    # the generic loop reads no task's settings: those live in the task (unnoise/train/tasks.py)
    assert not re.search(r"autoencoder|disc", (ROOT / "unnoise" / "train" / "loop.py").read_text())


def test_folder_data_unconditional_pixel_diffusion(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    unet = dict(TINY_UNET, in_channels=3, out_channels=3, num_class_embeds=None)
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "folder", "path": str(images), "size": 32, "flip": True},
        "model": unet,
        "diffusion": {"conditioning": "none", "prediction": "v_prediction", "weighting": "min_snr"},
        "train": {"steps": 2, "batch_size": 4, "threads": 1, "sample_steps": 2},
    }
    folder = train(config_from_dict(cfg), log=lambda s: None)
    assert (folder / "unet" / "model.safetensors").exists()
    assert Image.open(tmp_path / "run" / "samples" / "step_00000002.png").size == (96, 96)  # 8 images, 3 x 3
