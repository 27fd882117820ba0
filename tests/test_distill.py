"""Distillation tasks (``[distill]``): config validation, the student's start, the guidance and consistency losses
against plain references written here in diffusers' VP terms, the target network's EMA, exact resume, and the
export loading through ``Pipeline.from_pretrained`` (the consistency student with the lcm sampler)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from helpers import SD_SCHEDULE, SD_SCHEDULER, SIZE, captioned_images, randomize, tiny_components

from unnoise import Pipeline
from unnoise.core.samplers import consistency_scalings
from unnoise.models.unet import UNet, guidance_scale_embedding
from unnoise.train import config_from_dict, load_config, train
from unnoise.train.checkpoint import list_checkpoints, load_checkpoint
from unnoise.train.data import build_dataset
from unnoise.train.distill import student_of
from unnoise.train.distributed import World
from unnoise.train.tasks import make_task

CAPTIONS = ("a red cat", "a blue dog", "a green bird", "a red dog")
GAMMA = 5.0


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """{"cfg": a tiny SD folder (DDIM), "embedded": a tiny LCM folder whose U-Net has time_cond_proj_dim}."""
    components = tiny_components(tmp_path_factory.mktemp("tokenizer"))
    sd = diffusers.StableDiffusionPipeline(
        **components, scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    folders = {"cfg": tmp_path_factory.mktemp("sd"), "embedded": tmp_path_factory.mktemp("lcm")}
    sd.save_pretrained(folders["cfg"])
    unet = diffusers.UNet2DConditionModel(**{**dict(components["unet"].config), "time_cond_proj_dim": 8}).eval()
    randomize(unet, seed=12)
    lcm = diffusers.LatentConsistencyModelPipeline(
        **{**components, "unet": unet}, scheduler=diffusers.LCMScheduler(**SD_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    lcm.save_pretrained(folders["embedded"])
    return folders


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return captioned_images(tmp_path_factory.mktemp("images"), CAPTIONS)


def distill_config(out_dir, teacher, images, task="consistency_distillation", distill=None, **train) -> dict:
    return {
        "task": task,
        "out_dir": str(out_dir),
        "seed": 1,
        "data": {"dataset": "folder", "path": str(images), "size": SIZE},
        "distill": {
            "teacher": str(teacher),
            "guidance_min": 1.5,
            "guidance_max": 6.0,
            "time_cond_proj_dim": 16,
            **(distill or {}),
        },  # fmt: skip
        "diffusion": {"cond_dropout": 0.25, "weighting": "min_snr", "gamma": GAMMA, "sample_prompts": ["a red cat"]},
        "optim": {"lr": 1e-3, "decay": "constant", "warmup_steps": 0},
        "ema": {"decay": 0.0},
        "train": {"steps": 2, "batch_size": 4, "threads": 1, "log_every": 1, "sample_steps": 2, **train},
    }


def task_of(data):
    cfg = config_from_dict(data)
    return make_task(cfg, build_dataset(cfg.data), World(0, 1, torch.device("cpu")))


# -- configuration ---------------------------------------------------------------------------------------------


def test_the_shipped_configs_load():
    guidance, lcm = load_config("configs/mnist-ldm-guidance.toml"), load_config("configs/mnist-lcm.toml")
    assert guidance.task == "guidance_distillation" and guidance.distill.teacher == "default"
    assert lcm.task == "consistency_distillation" and lcm.distill.loss == "huber"
    plain = lcm.to_dict()
    assert "model" not in plain and "schedule" not in plain["diffusion"] and plain["distill"]["solver_steps"] == 50
    assert config_from_dict(plain) == lcm


@pytest.mark.parametrize(
    "change, message",
    [
        ({"distill": None}, "needs a \\[distill\\] table"),
        ({"task": "diffusion"}, "task='diffusion' is not allowed; allowed: one of .*with a \\[distill\\] table"),
        ({"model": {"in_channels": 4}}, "model.in_channels.* conflict with task='consistency_distillation'"),
        ({"diffusion": {"prediction": "v_prediction"}}, "diffusion.prediction.* conflict"),
        ({"task": "guidance_distillation", "distill": {"teacher": "default", "loss": "l2"}}, "distill.loss.* conflict"),
        ({"distill": {"teacher": ""}}, "distill.teacher=''"),
        ({"distill": {"teacher": "default", "guidance_min": 3.0, "guidance_max": 2.0}}, "distill.guidance_max=2.0"),
        ({"distill": {"teacher": "default", "loss": "l1"}}, "distill.loss='l1'"),
        ({"distill": {"teacher": "default", "target_decay": 1.0}}, "distill.target_decay=1.0"),
    ],
)
def test_config_errors_name_the_field(tmp_path, change, message):
    data = {"task": "consistency_distillation", "out_dir": str(tmp_path), "distill": {"teacher": "default"}}
    data = {k: v for k, v in {**data, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


# -- the student ---------------------------------------------------------------------------------------------------


def test_a_zero_projection_student_is_the_teachers_conditional_model(teachers):
    loaded = Pipeline.from_pretrained(teachers["cfg"]).unet
    teacher = UNet(loaded.config).eval()  # the same weights, not packed for inference: the same kernels as the student
    teacher.load_state_dict(loaded.state_dict())
    student = student_of(loaded, 16).eval()
    assert student.config.time_cond_proj_dim == 16 and teacher.config.time_cond_proj_dim is None
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 32, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    w = guidance_scale_embedding(torch.tensor([0.0, 2.0, 6.0]), 16)
    with torch.no_grad():
        assert torch.equal(student(x, t, context, timestep_cond=w), teacher(x, t, context))
    embedded = Pipeline.from_pretrained(teachers["embedded"]).unet
    assert student_of(embedded, 16).config.time_cond_proj_dim == 8  # a teacher with an embedding keeps its own


# -- the losses against plain references ----------------------------------------------------------------------------


def reference_inputs(task, step, count):
    """The step's draws, latents and text states, as the task draws them (``draws`` is its only source of chance)."""
    r = task.draws(step, count)
    x0 = task.vae.to_latent(task.latents.sample(np.arange(count), r["latent_noise"]))
    texts = ["" if d else CAPTIONS[i] for i, d in enumerate(r["drop"].tolist())]
    return r, x0.float(), task.text(texts), task.text([""]).expand(count, -1, -1)


def predicted_x0(ac, x_vp, eps):
    return (x_vp - (1 - ac).sqrt() * eps) / ac.sqrt()


def test_guidance_loss_is_the_weighted_error_to_the_teachers_cfg_output(tmp_path, teachers, images):
    task = task_of(distill_config(tmp_path, teachers["cfg"], images, task="guidance_distillation"))
    count = len(CAPTIONS)
    loss = task.loss(task.modules, np.arange(count), slice(0, count), step=1)["loss"]
    r, x0, cond, uncond = reference_inputs(task, 1, count)
    ac = task.schedule.alphas_cumprod
    sigma = r["sigma"]
    t = ((1 - ac) / ac).sqrt().sub(sigma[:, None]).abs().argmin(1)  # the integer timesteps the sigmas came from
    a = ac[t].reshape(-1, 1, 1, 1).float()
    x_vp = a.sqrt() * x0 + (1 - a).sqrt() * r["noise"]
    with torch.no_grad():
        eps_c, eps_u = task.teacher_unet(x_vp, t, cond), task.teacher_unet(x_vp, t, uncond)
        s = r["scale"].reshape(-1, 1, 1, 1).float()
        target = predicted_x0(a, x_vp, eps_u + s * (eps_c - eps_u))
        w = guidance_scale_embedding(r["scale"].float() - 1, 16)
        student = predicted_x0(a, x_vp, task.unet(x_vp, t, cond, timestep_cond=w))
    weight = (1 / sigma**2).clamp(max=GAMMA).float()  # min-SNR on the epsilon loss = min(SNR, gamma) on the x0 error
    expected = (weight * (student - target).square().flatten(1).mean(1)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() > 0  # the teacher's scales > 1 differ from its conditional model, which the student starts as


@pytest.mark.parametrize("kind, loss_kind", [("cfg", "huber"), ("embedded", "l2")])
def test_consistency_loss_is_lcm_distillation_by_hand(tmp_path, teachers, images, kind, loss_kind):
    data = distill_config(tmp_path, teachers[kind], images, distill={"loss": loss_kind, "huber_c": 0.01})
    task = task_of(data)
    count, k = len(CAPTIONS), 1000 // 50
    with torch.no_grad():  # the online student moves away from the target (equal at the start)
        for p in task.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = task.loss(task.modules, np.arange(count), slice(0, count), step=1)
    r, x0, cond, uncond = reference_inputs(task, 1, count)
    ac = task.schedule.alphas_cumprod.float()
    t_start = r["index"] * k + k - 1
    t_prev = (t_start - k).clamp(min=0)
    a, a_prev = ac[t_start].reshape(-1, 1, 1, 1), ac[t_prev].reshape(-1, 1, 1, 1)
    s = r["scale"].reshape(-1, 1, 1, 1).float()
    x_vp = a.sqrt() * x0 + (1 - a).sqrt() * r["noise"]
    with torch.no_grad():
        w = guidance_scale_embedding(r["scale"].float() - 1, task.unet.config.time_cond_proj_dim)
        if kind == "embedded":  # the teacher takes the scale as an input: one call
            eps = task.teacher_unet(x_vp, t_start, cond, timestep_cond=w)
        else:
            eps_c, eps_u = task.teacher_unet(x_vp, t_start, cond), task.teacher_unet(x_vp, t_start, uncond)
            eps = eps_u + s * (eps_c - eps_u)
        x_prev = a_prev.sqrt() * predicted_x0(a, x_vp, eps) + (1 - a_prev).sqrt() * eps  # DDIM to t_n
        skip, c_out = (c.float().reshape(-1, 1, 1, 1) for c in consistency_scalings(t_start))
        online = skip * x_vp + c_out * predicted_x0(a, x_vp, task.unet(x_vp, t_start, cond, timestep_cond=w))
        skip, c_out = (c.float().reshape(-1, 1, 1, 1) for c in consistency_scalings(t_prev))
        target_net = task.modules["target"]
        target = skip * x_prev + c_out * predicted_x0(a_prev, x_prev, target_net(x_prev, t_prev, cond, timestep_cond=w))
    d = online - target
    per_sample = (d.square() + 0.01**2).sqrt() - 0.01 if loss_kind == "huber" else d.square()
    assert out["loss"].item() == pytest.approx(per_sample.flatten(1).mean(1).sum().item(), rel=1e-4)
    assert out["target_distance"].item() == pytest.approx(d.square().flatten(1).mean(1).sum().item(), rel=1e-4)
    assert out["loss"].item() > 0


def test_the_target_network_is_an_ema_of_the_student_updated_once_per_step(tmp_path, teachers, images):
    task = task_of(distill_config(tmp_path, teachers["cfg"], images, distill={"target_decay": 0.9}))
    target = task.modules["target"]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        for p in task.unet.parameters():
            p.add_(1.0)
    online = {k: v.clone() for k, v in task.unet.state_dict().items()}
    indices = np.arange(len(CAPTIONS))
    for _ in range(2):  # two micro-batches of step 2: one update
        task.loss(task.modules, indices, slice(0, 2), step=2)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * online[name], rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in target.parameters())


# -- training runs ------------------------------------------------------------------------------------------------


def test_resumed_consistency_run_equals_an_uninterrupted_one(tmp_path, teachers, images):
    whole = distill_config(tmp_path / "whole", teachers["cfg"], images, steps=4, checkpoint_every=2)
    train(config_from_dict(whole), log=lambda line: None)
    part = distill_config(tmp_path / "part", teachers["cfg"], images, steps=2, checkpoint_every=2)
    train(config_from_dict(part), log=lambda line: None)
    train(config_from_dict({**part, "train": whole["train"]}), resume=True, log=lambda line: None)
    a, _ = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])
    b, _ = load_checkpoint(list_checkpoints(tmp_path / "part")[-1])
    assert any(k.startswith("net.target.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng"))


@pytest.mark.parametrize("task", ["guidance_distillation", "consistency_distillation"])
def test_the_export_loads_through_the_pipeline_and_samples_with_one_call_per_step(tmp_path, teachers, images, task):
    data = distill_config(tmp_path, teachers["cfg"], images, task=task)
    folder = train(config_from_dict(data), log=lambda line: None)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.guidance_embedded and pipe.unet.config.time_cond_proj_dim == 16
    teacher = Pipeline.from_pretrained(teachers["cfg"])
    expected = ("lcm", 4) if task == "consistency_distillation" else ("ddim", teacher.config.sampling.steps)
    assert (pipe.config.sampling.sampler, pipe.config.sampling.steps) == expected
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k)
    image = pipe("a red cat", seed=0, steps=3, guidance_scale=4.0)[0]
    assert calls == [1, 1, 1] and image.size == (SIZE, SIZE)
    assert (tmp_path / "samples").is_dir()
