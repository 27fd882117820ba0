"""Distilling a text-to-image U-Net: guidance distillation and latent consistency distillation (``[distill]``).

Both tasks start the student from the teacher's weights (``distill.teacher``, any pipeline ``Pipeline.from_pretrained``
reads) with a guidance embedding added (``time_cond_proj_dim``; the projection starts at zero, so the student starts
as the teacher's conditional model) and train it on the training data's noised latents:

- ``guidance_distillation`` (Meng et al. 2023, stage one): one batch-1 evaluation with the embedding of ``s - 1``
  matches the teacher's classifier-free guidance ``uncond + s (cond - uncond)`` at a scale ``s`` drawn from
  ``[guidance_min, guidance_max]``, under the diffusion loss's weighting of the x0 error.
- ``consistency_distillation`` (Luo et al. 2023, Alg. 1): at ``t_{n+k}`` on the solver grid (k = T / solver_steps),
  the teacher's guided DDIM step gives ``x_{t_n}``; the online student's consistency output at ``t_{n+k}`` is pulled
  towards the target network's (an EMA of the student, ``target_decay``) at ``t_n``. A teacher that has a guidance
  embedding itself (a guidance-distilled one) runs once per step instead of twice.

The exported folder is a pipeline (``Pipeline.from_pretrained``); a consistency student's default sampler is ``lcm``.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from unnoise.core.denoisers import VPDenoiser
from unnoise.core.noise import randn_like
from unnoise.core.samplers import consistency_scalings, sample
from unnoise.data.base import ImageDataset
from unnoise.models.unet import UNet, guidance_scale_embedding
from unnoise.pipeline.loading import load_components, resolve_model
from unnoise.pipeline.pipeline import grid_for
from unnoise.pipeline.png import make_grid, to_pil
from unnoise.train.config import TrainConfig
from unnoise.train.data import batch_of, sample_rngs
from unnoise.train.distributed import World
from unnoise.train.lora import weights_file
from unnoise.train.tasks import DiffusionTask, autocast, step_generator


def student_of(teacher: UNet, time_cond_proj_dim: int) -> UNet:
    """A copy of ``teacher`` that takes a guidance embedding: the teacher's own, or a new zero projection of
    ``time_cond_proj_dim`` (so that it computes the teacher's output whatever the embedding)."""
    # a fresh module, not a copy: the teacher may hold weights packed for inference (``packing``)
    own = teacher.config.time_cond_proj_dim
    student = UNet(dataclasses.replace(teacher.config, time_cond_proj_dim=own or time_cond_proj_dim))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if missing != ([] if own else ["time_embedding.cond_proj.weight"]) or unexpected:
        raise RuntimeError(f"the student does not fit the teacher: missing {missing}, unexpected {unexpected}")
    if not own:
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher.dtype)


class GuidedTeacher:
    """The teacher's guided denoised estimate at per-sample guidance scales ``s``: ``uncond + s (cond - uncond)``
    from one batched call (CFG), or one call with the embedding of ``s - 1`` for a teacher that has one."""

    def __init__(self, unet: UNet, denoiser: VPDenoiser, uncond: Tensor):
        self.unet, self.denoiser, self.uncond = unet, denoiser, uncond

    @torch.no_grad()
    def __call__(self, x: Tensor, sigma: Tensor, scale: Tensor, context: Tensor) -> Tensor:
        dim = self.unet.config.time_cond_proj_dim
        if dim is not None:
            w = guidance_scale_embedding(scale - 1, dim).to(x.device)
            return self.denoiser(x, sigma, encoder_hidden_states=context, timestep_cond=w)
        uncond = self.uncond.expand(len(x), *self.uncond.shape[1:]).to(context.dtype)
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), encoder_hidden_states=torch.cat([context, uncond])
        )
        d_cond, d_uncond = both.float().chunk(2)
        s = scale.to(d_cond.dtype).reshape(-1, *[1] * (x.ndim - 1)).to(x.device)
        return d_uncond + s * (d_cond - d_uncond)


def consistency_output(x: Tensor, sigma: Tensor, t: Tensor, denoised: Tensor) -> Tensor:
    """LCM's consistency function ``c_skip(t) x_vp + c_out(t) x0_hat`` with ``x_vp = x / sqrt(1 + sigma^2)``."""
    c_skip, c_out = consistency_scalings(t)
    shape = (-1, *[1] * (x.ndim - 1))
    c_skip, c_out = c_skip.reshape(shape).to(x.device), c_out.reshape(shape).to(x.device)
    x_vp = x / (1 + sigma.reshape(shape).to(x.device) ** 2).sqrt()
    return (c_skip * x_vp + c_out * denoised).float()


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample mean of ``sqrt((a - b)^2 + c^2) - c`` (Song & Dhariwal 2023), a robust distance near L1."""
    return ((a - b).square() + c**2).sqrt().sub(c).flatten(1).mean(1)


class DistillTask(DiffusionTask):
    """Guidance distillation or latent consistency distillation of ``distill.teacher``'s U-Net (module docstring)."""

    def __init__(self, cfg: TrainConfig, dataset: ImageDataset, world: World):
        settings = cfg.distill
        parts = load_components(settings.teacher)
        folder = resolve_model(settings.teacher)
        if parts.text_encoder is None or parts.vae is None:
            raise ValueError(f"distill.teacher={settings.teacher!r} is not a text-to-image latent diffusion pipeline")
        teacher = parts.unet.eval().requires_grad_(False).to(world.device)
        self.teacher_dim = teacher.config.time_cond_proj_dim
        student = student_of(teacher, settings.time_cond_proj_dim).requires_grad_(True)
        vae_weights = folder if folder.is_file() else weights_file(folder / "vae")
        sampling = settings.sampling or parts.config.sampling
        if settings.sampling is None and cfg.task == "consistency_distillation":
            sampling = dataclasses.replace(sampling, sampler="lcm", steps=4)
        pipeline = dataclasses.replace(parts.config, sampling=sampling)
        if cfg.data.size % (parts.vae.config.downsampling_factor * 2 ** (len(teacher.config.block_out_channels) - 1)):
            raise ValueError(f"data.size={cfg.data.size} does not fit distill.teacher={settings.teacher!r}'s U-Net")
        self.setup(cfg, dataset, world, student, parts.vae, vae_weights, parts.text_encoder, pipeline, "text")
        self.teacher_unet = teacher.set_attention_mode(cfg.train.attention, chunk_size=4096)
        teacher_denoiser = VPDenoiser(self.teacher_unet, self.schedule, pipeline.prediction)
        self.teacher = GuidedTeacher(self.teacher_unet, teacher_denoiser, self.encode([""]))
        self.modules = {"model": self.unet}
        self.consistency = cfg.task == "consistency_distillation"
        if self.consistency:
            # the target network: an EMA of the online student, a module so that checkpoints hold it
            self.modules["target"] = copy.deepcopy(self.unet).requires_grad_(False)
            self.target_step = 0
            self.log_keys = ("loss", "target_distance")

    @property
    def student_dim(self) -> int:
        return self.unet.config.time_cond_proj_dim

    def guidance_embedding(self, scale: Tensor) -> Tensor:
        """The student's ``timestep_cond`` for guidance scales ``scale`` (B,): the embedding of ``scale - 1``."""
        return guidance_scale_embedding(scale.float() - 1, self.student_dim).to(self.world.device)

    def draws(self, step: int, count: int) -> dict[str, Tensor]:
        """The step's random draws for the global batch, in a fixed order (so a test can repeat them)."""
        g, d = step_generator(self.cfg.seed, step), self.cfg.distill
        shape = (count, self.unet.config.in_channels, *self._sample_shape())
        out = {}
        if self.consistency:
            out["index"] = torch.randint(0, d.solver_steps, (count,), generator=g)
        else:
            out["sigma"] = self.objective.sigmas(count, generator=g)
        out["noise"] = torch.randn(shape, generator=g)
        out["drop"] = torch.rand(count, generator=g, dtype=torch.float64) < self.cfg.diffusion.cond_dropout
        out["latent_noise"] = torch.randn(shape, generator=g)
        out["scale"] = d.guidance_min + (d.guidance_max - d.guidance_min) * torch.rand(
            count, generator=g, dtype=torch.float64
        )
        return out

    def solver_timesteps(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_{n+k}, t_n)`` of solver-grid indices: ``t_{n+k} = (index + 1) k - 1``, ``t_n = max(t_{n+k} - k, 0)``."""
        k = self.schedule.num_train_timesteps // self.cfg.distill.solver_steps
        start = (index + 1) * k - 1
        return start, (start - k).clamp(min=0)

    def loss(self, nets: dict[str, nn.Module], indices: np.ndarray, part: slice, step: int) -> dict:
        r = {k: v[part] for k, v in self.draws(step, len(indices)).items()}
        local, device = indices[part], self.world.device
        batch = batch_of(self.dataset, local, sample_rngs(self.cfg.seed, step, len(indices))[part])
        x0 = self.vae.to_latent(self.latents.sample(local, r["latent_noise"])).to(device)
        context = self._condition(batch.captions, None, r["drop"])["encoder_hidden_states"]
        student = VPDenoiser(self.network(nets), self.schedule, self.pipeline.prediction)
        w = self.guidance_embedding(r["scale"])
        if not self.consistency:
            sigma = r["sigma"].to(device)
            x = x0 + sigma.reshape(-1, 1, 1, 1).to(x0.dtype) * r["noise"].to(device)
            with autocast(self.cfg.train.autocast, device):
                target = self.teacher(x, sigma, r["scale"], context)
                denoised = student(x, sigma, encoder_hidden_states=context, timestep_cond=w)
            mse = (denoised.float() - target.float()).square().flatten(1).mean(1)
            return {"loss": (self.objective.x0_weight(sigma).float() * mse).sum()}
        self._update_target(nets, step)
        t_start, t_prev = self.solver_timesteps(r["index"])
        sigmas = self.schedule.sigmas
        sigma, sigma_prev = sigmas[t_start].to(device), sigmas[t_prev].to(device)
        x = x0 + sigma.reshape(-1, 1, 1, 1).to(x0.dtype) * r["noise"].to(device)
        with autocast(self.cfg.train.autocast, device):
            online = consistency_output(
                x, sigma, t_start, student(x, sigma, encoder_hidden_states=context, timestep_cond=w)
            )
            with torch.no_grad():
                guided = self.teacher(x, sigma, r["scale"], context).float()
                # DDIM from t_{n+k} to t_n with the guided estimate: x0 + sigma_n * eps, eps = (x - x0) / sigma
                s, s_prev = sigma.reshape(-1, 1, 1, 1), sigma_prev.reshape(-1, 1, 1, 1)
                x_prev = (guided + s_prev / s * (x - guided)).to(x.dtype)
                target_net = VPDenoiser(nets["target"], self.schedule, self.pipeline.prediction)
                d_target = target_net(x_prev, sigma_prev, encoder_hidden_states=context, timestep_cond=w)
                target = consistency_output(x_prev, sigma_prev, t_prev, d_target)
        if self.cfg.distill.loss == "huber":
            per_sample = pseudo_huber(online, target, self.cfg.distill.huber_c)
        else:
            per_sample = (online - target).square().flatten(1).mean(1)
        distance = (online.detach() - target).square().flatten(1).mean(1)
        return {"loss": per_sample.sum(), "target_distance": distance.sum()}

    @torch.no_grad()
    def _update_target(self, nets: dict[str, nn.Module], step: int) -> None:
        """Move the target network towards the online student once per optimizer step, before its losses: the
        weights it sees are those after step - 1, as an update right after each optimizer step would."""
        if step <= self.target_step:
            return
        decay = self.cfg.distill.target_decay
        online = dict(self.unet.named_parameters())
        for name, p in self.modules["target"].named_parameters():
            p.lerp_(online[name].detach(), 1 - decay)
        self.target_step = step

    @torch.no_grad()
    def samples(self, model: nn.Module) -> Image.Image:
        """One image per sample prompt with the exported sampling settings, one network call per step."""
        d, device, sampling = self.cfg.diffusion, self.world.device, self.pipeline.sampling
        schedule, sigmas = grid_for(self.pipeline, sampling.sampler, self.cfg.train.sample_steps, sampling.spacing)
        denoiser = VPDenoiser(model, schedule, self.pipeline.prediction)
        prompts = list(d.sample_prompts) or self._default_prompts()
        n = len(prompts)
        scale = torch.full((n,), float(sampling.guidance_scale), dtype=torch.float64)
        cond = {"encoder_hidden_states": self.encode(prompts), "timestep_cond": self.guidance_embedding(scale)}
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        shape = (n, self.unet.config.in_channels, *self._sample_shape())
        x = randn_like(torch.empty(shape), generators).to(device) * denoiser.prior_std(sigmas[0].item())
        x = sample(denoiser, x, sigmas.to(device), sampling.sampler, generator=generators, **cond)
        return make_grid(to_pil(self.vae.decode(self.vae.from_latent(x))))
