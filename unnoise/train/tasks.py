"""What is trained: a diffusion U-Net (pixels or cached latents) or a KL autoencoder, each as a ``Task``.

A task owns its networks and turns a slice of one step's global batch (a micro-batch's share for this process)
into the summed loss of that slice. Every random draw is made for the whole global batch from a generator seeded
by ``(seed, step)`` and then sliced, so the loss of sample ``i`` does not depend on how many processes share the
batch or how many micro-batches accumulate it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from unnoise.core.denoisers import VPDenoiser
from unnoise.core.guidance import CFGDenoiser
from unnoise.core.losses import vp_loss
from unnoise.core.noise import randn_like
from unnoise.core.samplers import sample
from unnoise.data.base import ImageDataset
from unnoise.data.captions import caption
from unnoise.models.io import load_model, save_model
from unnoise.models.text import MiniLMEncoder, TextEncoder
from unnoise.models.unet import UNet
from unnoise.models.vae import AutoencoderKL, DiagonalGaussian
from unnoise.pipeline.config import PipelineConfig, sampling_grid
from unnoise.pipeline.loading import Components, save_components
from unnoise.pipeline.png import make_grid, to_pil
from unnoise.train.config import TrainConfig
from unnoise.train.data import LatentCache, TextCache, batch_of, cache_key, sample_rngs
from unnoise.train.distributed import World


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch generator of one optimizer step's global batch: the same on every process."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class Task:
    """Networks to train (``modules``; ``"model"`` is exported, each gets its own AdamW) and their losses."""

    modules: dict[str, nn.Module]
    log_keys: tuple[str, ...] = ("loss",)
    # the entries of ``loss()`` that the loop backpropagates (it logs them all); one a step lacks is skipped
    backward_keys: tuple[str, ...] = ("loss",)

    def loss(self, nets: dict[str, nn.Module], indices: np.ndarray, part: slice, step: int) -> dict:
        """Summed losses of samples ``part`` of the step's global batch ``indices`` (data-set indices)."""
        raise NotImplementedError

    def lr_scale(self, name: str) -> float:
        """Module ``name``'s learning rate relative to the schedule's (``optim.lr`` at its peak)."""
        return 1.0

    def samples(self, model: nn.Module) -> Image.Image:
        raise NotImplementedError

    def export_path(self, out_dir: Path) -> Path:
        """Where ``export`` writes the trained network: ``out_dir/model`` (a folder) unless the task says otherwise."""
        return out_dir / "model"

    def export(self, model: nn.Module, path: Path) -> None:
        """Write ``model`` (the averaged weights) to ``path`` (``export_path``)."""
        raise NotImplementedError


def autoencoder_folder(path: str | Path) -> Path:
    """A trained autoencoder's folder: the run folder's ``model/`` or the model folder itself."""
    path = Path(path)
    for folder in (path / "model", path):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"diffusion.autoencoder={str(path)!r} holds no config.json (nor model/config.json)")


class DiffusionTask(Task):
    """DDPM-style training of a U-Net, text-, class- or unconditioned, with condition dropout for guidance.

    The networks around the trained one (autoencoder, text encoder) and what the exported pipeline declares
    (``self.pipeline``: text encoder, prediction, schedule, sampling) come from ``[diffusion]`` here and from the
    base pipeline for a LoRA (``unnoise.train.lora.LoRATask``), which shares everything else."""

    def __init__(self, cfg: TrainConfig, dataset: ImageDataset, world: World):
        d = cfg.diffusion
        unet = UNet(cfg.network_config())  # first: its initial weights are the first draws after the seed
        vae, weights = None, None
        if d.autoencoder is not None:
            folder = autoencoder_folder(d.autoencoder)
            vae, weights = load_model(folder), folder / "model.safetensors"
        encoder = MiniLMEncoder.from_package(max_length=d.text_encoder.max_length) if d.conditioning == "text" else None
        side = cfg.data.size  # the size it was trained at: the server serves only that by default
        pipeline = PipelineConfig(
            text_encoder=d.text_encoder,
            prediction=d.prediction,
            schedule=d.schedule,
            sampling=d.sampling,
            sizes=((side, side),),
        )
        self.setup(cfg, dataset, world, unet, vae, weights, encoder, pipeline, d.conditioning)
        self.modules = {"model": self.unet}

    def setup(
        self,
        cfg: TrainConfig,
        dataset: ImageDataset,
        world: World,
        unet: UNet,
        vae: AutoencoderKL | None,
        vae_weights: Path | None,
        encoder: TextEncoder | None,
        pipeline: PipelineConfig,
        conditioning: str,
    ) -> None:
        """Check that the networks fit the data and each other, and cache what stays fixed (latents, text)."""
        self.cfg, self.dataset, self.world = cfg, dataset, world
        self.pipeline, self.conditioning = pipeline, conditioning
        self.unet = unet.set_attention_mode(cfg.train.attention, chunk_size=4096)
        self.vae, self.latents = vae, None
        channels = dataset.channels
        if vae is not None:
            self.vae = vae.to(world.device).eval().requires_grad_(False)
            if vae.config.in_channels != dataset.channels:
                raise ValueError(
                    f"the autoencoder reads {vae.config.in_channels}-channel images; the data set has "
                    f"{dataset.channels} (data.channels for a folder)"
                )
            if cfg.data.flip:
                raise ValueError("data.flip = true with an autoencoder: cached latents hold one orientation")
            self.latents = LatentCache.build(self.vae, vae_weights, dataset, cache_key(cfg.data))
            channels = vae.config.latent_channels
        c = self.unet.config
        if c.in_channels != channels or c.out_channels != channels:
            raise ValueError(f"model.in_channels/out_channels = {c.in_channels}/{c.out_channels}; need {channels}")
        self.encoder, self.text = encoder, None
        if conditioning == "text":
            self.encoder = encoder.to(world.device)
            if c.cross_attention_dim != encoder.dim:
                raise ValueError(
                    f"model.cross_attention_dim={c.cross_attention_dim}; the text encoder needs {encoder.dim}"
                )
            self.text = TextCache(encoder)
        elif conditioning == "class":
            classes = dataset.num_classes
            if classes is None or c.num_class_embeds != classes + 1:
                raise ValueError(
                    f"model.num_class_embeds={c.num_class_embeds}; class conditioning needs the data set's "
                    f"{classes} classes + 1 (the unconditional label)"
                )
        d = cfg.diffusion
        self.schedule, _ = sampling_grid(pipeline.schedule, pipeline.sampling, 1)
        self.objective = vp_loss(self.schedule, pipeline.prediction, weighting=d.weighting, gamma=d.gamma)

    def encode(self, texts: list[str]) -> Tensor:
        """Text-encoder states (B, T, D) of ``texts`` on the training device ("" is the unconditional prompt)."""
        return self.text(texts).to(self.world.device)

    def network(self, nets: dict[str, nn.Module]) -> Callable[..., Tensor]:
        """The network ``VPDenoiser`` calls in a training step: ``model(x, t, **cond)``."""
        return nets["model"]

    def _condition(self, captions: list[str] | None, labels: Tensor | None, drop: Tensor) -> dict[str, Tensor]:
        if self.conditioning == "text":
            texts = ["" if dropped else text for text, dropped in zip(captions, drop.tolist(), strict=True)]
            return {"encoder_hidden_states": self.encode(texts)}
        if self.conditioning == "class":
            null = torch.full_like(labels, self.dataset.num_classes)
            return {"class_labels": torch.where(drop, null, labels).to(self.world.device)}
        return {}

    def loss(self, nets: dict[str, nn.Module], indices: np.ndarray, part: slice, step: int) -> dict:
        g, count = step_generator(self.cfg.seed, step), len(indices)
        sigma = self.objective.sigmas(count, generator=g)
        shape = (count, self.unet.config.in_channels, *self._sample_shape())
        noise = torch.randn(shape, generator=g)
        drop = torch.rand(count, generator=g, dtype=torch.float64) < self.cfg.diffusion.cond_dropout
        latent_noise = torch.randn(shape, generator=g) if self.latents is not None else None
        local = indices[part]
        batch = batch_of(self.dataset, local, sample_rngs(self.cfg.seed, step, count)[part])
        if self.latents is not None:
            x0 = self.vae.to_latent(self.latents.sample(local, latent_noise[part]))
        else:
            x0 = batch.images
        device = self.world.device
        cond = self._condition(batch.captions, batch.labels, drop[part])  # the text encoder runs in its own dtype
        denoiser = VPDenoiser(self.network(nets), self.schedule, self.pipeline.prediction)
        with autocast(self.cfg.train.autocast, device):
            per_sample = self.objective(denoiser, x0.to(device), cond, noise=noise[part].to(device), sigma=sigma[part])
        return {"loss": per_sample.float().sum()}

    def _sample_shape(self) -> tuple[int, int]:
        side = self.cfg.data.size // (self.vae.config.downsampling_factor if self.vae is not None else 1)
        return side, side

    @torch.no_grad()
    def samples(self, model: nn.Module) -> Image.Image:
        """A grid from fixed seeds: one image per sample prompt (text), per class (class) or eight (none)."""
        return self.sample_grid(model)

    def sample_grid(self, model: Callable[..., Tensor]) -> Image.Image:
        """The sample grid of ``samples`` with the U-Net ``model``."""
        d, device, sampling = self.cfg.diffusion, self.world.device, self.pipeline.sampling
        schedule, sigmas = sampling_grid(self.pipeline.schedule, sampling, self.cfg.train.sample_steps)
        denoiser = VPDenoiser(model, schedule, self.pipeline.prediction)
        if self.conditioning == "text":
            prompts = list(d.sample_prompts) or self._default_prompts()
            n = len(prompts)
            cond = {"encoder_hidden_states": self.encode(prompts)}
            guided = CFGDenoiser(denoiser, sampling.guidance_scale, {"encoder_hidden_states": self.encode([""])})
        elif self.conditioning == "class":
            n = min(self.dataset.num_classes, 16)
            cond = {"class_labels": torch.arange(n, device=device)}
            null = {"class_labels": torch.full((1,), self.dataset.num_classes, device=device)}
            guided = CFGDenoiser(denoiser, sampling.guidance_scale, null)
        else:
            n, cond, guided = 8, {}, denoiser
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        shape = (n, self.unet.config.in_channels, *self._sample_shape())
        x = randn_like(torch.empty(shape), generators).to(device) * denoiser.prior_std(sigmas[0].item())
        x = sample(guided, x, sigmas.to(device), sampling.sampler, generator=generators, **cond)
        pixels = self.vae.decode(self.vae.from_latent(x)) if self.vae is not None else x
        return make_grid(to_pil(pixels))

    def _default_prompts(self) -> list[str]:
        if self.cfg.data.dataset == "mnist":
            return [caption(d, 0) for d in range(10)]
        batch = self.dataset.batch(np.arange(min(len(self.dataset), 8)), np.random.default_rng(0))
        return batch.captions

    def export(self, model: nn.Module, path: Path) -> None:
        """A text-to-image pipeline folder (text + latents), else the U-Net alone in ``path/unet``."""
        if self.conditioning == "text" and self.vae is not None:
            save_components(path, Components(model, self.vae, self.encoder, self.pipeline, None))
        else:
            save_model(model, path / "unet")


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017) as in LDM's autoencoder training: one logit per patch."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            out = channels * min(2**i, 8)
            blocks += [nn.Conv2d(width, out, 4, 2, 1, bias=False), nn.GroupNorm(min(32, out // 4), out)]
            blocks += [nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Reconstruct(nn.Module):
    """The autoencoder's training forward: posterior moments and the decoding of ``mean + std * noise``."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(z), posterior.kl()


class AutoencoderTask(Task):
    """KL-autoencoder training (Rombach et al. 2022): pixel loss + ``kl_weight`` KL, optional patch GAN."""

    def __init__(self, cfg: TrainConfig, dataset: ImageDataset, world: World):
        self.cfg, self.dataset, self.world = cfg, dataset, world
        self.vae = AutoencoderKL(cfg.network_config())
        if self.vae.config.in_channels != dataset.channels or self.vae.config.out_channels != dataset.channels:
            raise ValueError(f"model.in_channels/out_channels must equal the data set's {dataset.channels} channels")
        self.modules = {"model": _Reconstruct(self.vae)}
        a = cfg.autoencoder
        if a.disc_weight > 0:
            self.modules["disc"] = PatchDiscriminator(dataset.channels, a.disc_channels, a.disc_layers)
        self.log_keys = ("loss", "kl", *(("disc_loss",) if a.disc_weight > 0 else ()))
        self.backward_keys = ("loss", "disc_loss")  # disc_loss from step disc_start + 1 on

    def lr_scale(self, name: str) -> float:
        """The discriminator runs at ``autoencoder.disc_lr`` (default ``optim.lr``), on the same schedule."""
        lr = self.cfg.optim.lr
        return (self.cfg.autoencoder.disc_lr or lr) / lr if name == "disc" else 1.0

    def loss(self, nets: dict[str, nn.Module], indices: np.ndarray, part: slice, step: int) -> dict:
        a, device = self.cfg.autoencoder, self.world.device
        g, count = step_generator(self.cfg.seed, step), len(indices)
        side = self.cfg.data.size // self.vae.config.downsampling_factor
        noise = torch.randn((count, self.vae.config.latent_channels, side, side), generator=g)[part]
        rngs = sample_rngs(self.cfg.seed, step, count)[part]
        x = batch_of(self.dataset, indices[part], rngs).images.to(device)
        with autocast(self.cfg.train.autocast, device):
            recon, kl = nets["model"](x, noise.to(device))
        recon = recon.float()
        error = (recon - x).abs() if a.reconstruction == "l1" else (recon - x).square()
        pixels = x[0].numel()
        per_sample = error.flatten(1).mean(1) + a.kl_weight * kl / pixels
        out = {"loss": per_sample.sum(), "kl": kl.detach().sum()}
        if "disc" in nets and step > a.disc_start:
            disc = nets["disc"]
            for p in disc.parameters():  # the generator's loss must not move the discriminator
                p.requires_grad_(False)
            out["loss"] = out["loss"] - a.disc_weight * _unwrapped(disc)(recon).flatten(1).mean(1).sum()
            for p in disc.parameters():
                p.requires_grad_(True)
            real, fake = disc(x), disc(recon.detach())  # hinge loss, Lim & Ye 2017
            hinge = F.relu(1 - real).flatten(1).mean(1) + F.relu(1 + fake).flatten(1).mean(1)
            out["disc_loss"] = 0.5 * hinge.sum()
        return out

    @torch.no_grad()
    def samples(self, model: nn.Module) -> Image.Image:
        """Originals (top row) and their reconstructions from the posterior mean (bottom row)."""
        spread = np.unique(np.linspace(0, len(self.dataset) - 1, 8).round().astype(np.int64))  # across the classes
        x = self.dataset.batch(spread, np.random.default_rng(0)).images
        vae = model.vae
        recon = vae.decode(vae.encode(x.to(self.world.device)).mean)
        images = to_pil(torch.cat([x, recon.float().cpu()]))
        grid = Image.new(images[0].mode, (images[0].width * len(x), images[0].height * 2))
        for i, image in enumerate(images):
            grid.paste(image, ((i % len(x)) * image.width, (i // len(x)) * image.height))
        return grid

    @torch.no_grad()
    def export(self, model: nn.Module, path: Path) -> None:
        """The autoencoder with ``scaling_factor = 1 / std`` of its latents (as Rombach et al. 2022 set 0.18215)."""
        vae = model.vae
        count = min(self.cfg.autoencoder.scale_images, len(self.dataset))
        x = self.dataset.batch(np.arange(count), np.random.default_rng(0)).images.to(self.world.device)
        generators = torch.Generator().manual_seed(self.cfg.seed)
        z = torch.cat([DiagonalGaussian(vae._moments(part)).sample(generators) for part in x.split(256)])
        config = dataclasses.replace(vae.config, scaling_factor=float(1 / z.float().std()))
        scaled = AutoencoderKL(config)
        scaled.load_state_dict(vae.state_dict())
        save_model(scaled, path)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def autocast(kind: str, device: torch.device) -> Any:
    """``torch.autocast`` for "bf16"/"fp16", a no-op context for "none"."""
    if kind == "none":
        return torch.autocast(device.type, enabled=False)
    if kind == "fp16" and device.type != "cuda":
        raise ValueError("train.autocast = 'fp16' needs CUDA; allowed on CPU: 'none' or 'bf16'")
    return torch.autocast(device.type, dtype=torch.bfloat16 if kind == "bf16" else torch.float16)


TASKS = {"diffusion": DiffusionTask, "autoencoder": AutoencoderTask}


def make_task(cfg: TrainConfig, dataset: ImageDataset, world: World) -> Task:
    """The task of ``cfg``: ``TASKS[cfg.task]``, or a LoRA on a pipeline with a ``[lora]`` table."""
    if cfg.lora is not None:
        from unnoise.train.lora import LoRATask  # it extends DiffusionTask

        return LoRATask(cfg, dataset, world)
    if cfg.distill is not None:
        from unnoise.train.distill import DistillTask  # it extends DiffusionTask

        return DistillTask(cfg, dataset, world)
    return TASKS[cfg.task](cfg, dataset, world)
