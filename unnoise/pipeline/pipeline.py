"""Text-to-image, image-to-image (SDEdit) and inpainting with a latent diffusion model: text encoder, U-Net, VAE.

A call encodes the prompt, wraps the U-Net as ``VPDenoiser`` -> ``CFGDenoiser`` (-> ``KnownRegion`` when inpainting
with a model not trained for it), draws each image's noise from its own generator seeded ``seed + i``
(AUTOMATIC1111's convention, so image i is the same whatever the batch), runs a sampler over the grid of the
model's scheduler config and decodes the latents. Loading and the config format are in ``pipeline_io``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from unnoise.core.denoisers import VPDenoiser
from unnoise.core.guidance import CFGDenoiser
from unnoise.core.noise import randn_like
from unnoise.core.samplers import sample
from unnoise.core.schedules import VPSchedule
from unnoise.files import file_sha256
from unnoise.models.text import TextEncoder
from unnoise.pipeline.config import PipelineConfig, sampling_grid
from unnoise.pipeline.inputs import ImageInput, Request, resolve_request
from unnoise.pipeline.loading import Components, load_components, resolve_model, save_components
from unnoise.pipeline.png import add_provenance, format_parameters, to_pil
from unnoise.safety import PROVENANCE_INFO, SafetyChecker

# callback(step, total, sigma, latents_preview) -> True to cancel; step counts from 0, the preview is D(x, sigma).
StepCallback = Callable[[int, int, float, Tensor], bool | None]


class GenerationCancelled(Exception):
    """The step callback returned True: generation stopped after ``step`` (0-based) of ``total`` steps."""

    def __init__(self, step: int, total: int):
        super().__init__(f"generation cancelled by the callback at step {step} of {total}")
        self.step, self.total = step, total


class KnownRegion(nn.Module):
    """Inpainting with any model: ``D'(x, sigma) = m * D(x, sigma) + (1 - m) * z0``, m = 1 where to repaint.

    Every sampler's update is affine in ``D`` with weights that map ``z0 + sigma * noise`` to ``z0 + sigma_next *
    noise``, so the known region follows the forward process of the original latents exactly and ends at ``z0``
    (at sigma 0), while the repainted region sees the known one at every step. This replaces diffusers'
    re-noise-and-paste after each step (RePaint-style, Lugmayr et al. 2022) by a denoiser that works unchanged
    with single-step, multistep and stochastic samplers.
    """

    def __init__(self, denoiser: Callable[..., Tensor], mask: Tensor, z0: Tensor):
        super().__init__()
        self.denoiser, self.mask, self.z0 = denoiser, mask, z0

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        return self.mask * self.denoiser(x, sigma, **cond) + (1 - self.mask) * self.z0


class _UNetModel(nn.Module):
    """The U-Net as a ``VPDenoiser`` model; an inpainting U-Net gets ``[mask, masked-image latents]`` appended."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, inpaint: Tensor | None = None) -> Tensor:
        if inpaint is not None:
            x = torch.cat([x, inpaint.to(x.dtype)], dim=1)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


class Pipeline:
    """A latent text-to-image model: ``pipe(prompt, ...) -> list[PIL.Image]``; see ``__call__``."""

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: TextEncoder,
        config: PipelineConfig | None = None,
        *,
        name: str | None = None,
        unet_weights: str | Path | None = None,
    ):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder
        self.config = config or PipelineConfig()
        self.name = name
        self._unet_weights = Path(unet_weights) if unet_weights is not None else None
        # Prompt filter before generation, image filter + watermark + provenance after (unnoise.safety); the CLI
        # and the server turn it on, the library leaves it to the caller.
        self.safety: SafetyChecker | None = None
        self._hash: str | None = None
        latent, c = vae.config.latent_channels, unet.config
        if c.in_channels not in (latent, 2 * latent + 1) or c.out_channels != latent:
            raise ValueError(
                f"U-Net in_channels={c.in_channels}, out_channels={c.out_channels} do not fit the VAE's "
                f"{latent} latent channels; allowed: in {latent} (or {2 * latent + 1} for inpainting), out {latent}"
            )
        if c.cross_attention_dim != text_encoder.dim:
            raise ValueError(
                f"U-Net cross_attention_dim={c.cross_attention_dim} differs from the text encoder's width "
                f"{text_encoder.dim}"
            )

    # -- loading, saving, placement ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Pipeline:
        """Load our folder (``pipeline.json``), a diffusers Stable Diffusion folder (``model_index.json``), or
        ``"default"``: the embedded MNIST text-to-image model."""
        parts = load_components(path)
        pipe = cls(
            parts.unet,
            parts.vae,
            parts.text_encoder,
            parts.config,
            name=resolve_model(path).name,
            unet_weights=parts.unet_weights,
        )
        return pipe.to(device, dtype) if device is not None or dtype is not None else pipe

    def save_pretrained(self, path: str | Path) -> None:
        """Write our format: ``pipeline.json``, ``unet/``, ``vae/`` (and CLIP's ``text_encoder/``, ``tokenizer/``)."""
        save_components(path, Components(self.unet, self.vae, self.text_encoder, self.config, None))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the networks; ``dtype`` applies to the U-Net and to a VAE without ``force_upcast``."""
        self.unet.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=None if self.vae.config.force_upcast else dtype)
        self.text_encoder.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsampling_factor

    @property
    def num_train_timesteps(self) -> int:
        schedule = self.config.schedule
        return len(schedule.trained_betas) if schedule.trained_betas is not None else schedule.num_train_timesteps

    @property
    def latent_factor(self) -> int:
        """Pixels per side that height and width must be multiples of: VAE factor x 2**(U-Net downsamplings)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) when a call gives none: the U-Net's sample size in pixels, else the VAE's."""
        size, factor = self.unet.config.sample_size, self.vae_factor
        if isinstance(size, int):
            return size * factor, size * factor
        if isinstance(size, tuple):
            return size[1] * factor, size[0] * factor
        return self.vae.config.sample_size, self.vae.config.sample_size

    @property
    def model_hash(self) -> str:
        """First 10 hex digits of the sha256 of the U-Net weights file (as AUTOMATIC1111 hashes checkpoints)."""
        if self._hash is None:
            if self._unet_weights is not None:
                self._hash = file_sha256(self._unet_weights)[:10]
            else:  # not from a file: the bytes that save_pretrained would write
                state = {k: v.contiguous() for k, v in self.unet.state_dict().items()}
                self._hash = hashlib.sha256(safetensors_bytes(state)).hexdigest()[:10]
        return self._hash

    # -- generation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_images: int = 1,
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: Tensor | None = None,
        image: ImageInput | None = None,
        strength: float = 0.8,
        mask: ImageInput | None = None,
        spacing: str | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Generate ``num_images`` images; with ``image``, img2img from it (``strength`` of the grid); with ``mask``
        too, repaint where the mask is white. ``latents`` is unit initial noise (num_images, C, h, w), as diffusers'
        argument. ``callback(step, total, sigma, preview)`` returning True raises ``GenerationCancelled``.
        Each image's ``info["parameters"]`` holds its AUTOMATIC1111-format settings (``unnoise.pipeline.png``)."""
        args = dict(locals())  # the call's arguments, by name
        del args["self"], args["callback"]
        req = resolve_request(self, args)
        if self.safety is not None:
            self.safety.require_allowed(req.prompt)  # PromptBlocked (a ValueError naming the category)
        schedule, sigmas = self._grid(req)
        quantize = self.config.sampling.quantize and req.spacing == "karras"
        vp = VPDenoiser(_UNetModel(self.unet), schedule, self.config.prediction, quantize=quantize)
        generators = [torch.Generator().manual_seed(req.seed + i) for i in range(req.num_images)]
        x, inpaint, known = self._start(req, sigmas, generators, vp.prior_std(sigmas[0].item()))
        cond, uncond = self._conditioning(req, inpaint)
        space = "v" if self.config.prediction == "v_prediction" else "epsilon"
        denoiser: Callable[..., Tensor] = CFGDenoiser(
            vp, req.guidance_scale, uncond, req.guidance_rescale, req.guidance_interval, rescale_space=space
        )
        if known is not None:
            denoiser = KnownRegion(denoiser, *known)
        x = self._sample(denoiser, x, sigmas, req.sampler, generators, callback, cond)
        images = self.decode(x)
        for i, img in enumerate(images):
            img.info["parameters"] = self._parameters(req, i)
        if self.safety is None:
            return images
        images = self.safety.finish(images)
        for img in images:
            add_provenance(img, img.info.pop(PROVENANCE_INFO))
        return images

    def _grid(self, req: Request) -> tuple[VPSchedule, Tensor]:
        """The schedule and grid of the scheduler config; img2img keeps the tail that ``strength`` selects."""
        schedule, sigmas = sampling_grid(self.config.schedule, self.config.sampling, req.steps, req.spacing)
        if req.image is not None:  # as diffusers' img2img: start at index steps - int(steps * strength)
            sigmas = sigmas[req.steps - int(req.steps * req.strength) :]
        return schedule, sigmas

    def _conditioning(self, req: Request, inpaint: Tensor | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Prompt and negative-prompt embeddings (the cached empty prompt if none) and the inpainting channels."""
        hidden = self.text_encoder.encode([req.prompt]).hidden_states
        skip_negative = req.guidance_scale == 1.0 or req.negative_prompt is None
        negative = self.text_encoder.empty() if skip_negative else self.text_encoder.encode([req.negative_prompt])
        cond = {"encoder_hidden_states": hidden.to(self.device).expand(req.num_images, -1, -1)}
        uncond = {"encoder_hidden_states": negative.hidden_states.to(self.device)}
        if inpaint is not None:
            cond["inpaint"] = uncond["inpaint"] = inpaint
        return cond, uncond

    def _start(
        self, req: Request, sigmas: Tensor, generators: list[torch.Generator], prior_std: float
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """(initial state, inpainting U-Net channels, (latent mask, z0) for ``KnownRegion``).

        Each image's generator draws, in order: its posterior sample of the image, its initial noise, its
        posterior sample of the masked image (inpainting U-Nets); the sampler's noise follows.
        """
        n, c, f = req.num_images, self.vae.config.latent_channels, self.vae_factor
        shape = (n, c, req.height // f, req.width // f)
        z0 = self._encode(req.image, generators) if req.image is not None else None
        noise = req.latents if req.latents is not None else randn_like(torch.empty(shape), generators)
        noise = noise.to(self.device, torch.float32)
        pure_noise = z0 is None or (req.mask is not None and req.strength == 1.0)  # as diffusers' inpainting
        x = noise * prior_std if pure_noise else z0 + sigmas[0].item() * noise
        inpainting_model = self.unet.config.in_channels != c
        if req.mask is None and not inpainting_model:
            return x, None, None
        mask = req.mask if req.mask is not None else torch.ones(1, 1, req.height, req.width)
        m = F.interpolate(mask.to(self.device), size=shape[-2:], mode="nearest")
        if not inpainting_model:
            return x, None, (m, z0)
        # SD inpainting U-Nets (and AUTOMATIC1111 without an image or mask): a gray image, everything repainted
        image = req.image if req.image is not None else torch.zeros(1, 3, req.height, req.width)
        masked = self._encode(image * (mask < 0.5), generators)
        return x, torch.cat([m.expand(n, -1, -1, -1), masked], dim=1), None

    def _encode(self, image: Tensor, generators: list[torch.Generator]) -> Tensor:
        """Model latents of one image for each generator: a posterior sample each, scaled by ``vae.to_latent``."""
        posterior = self.vae.encode(image.to(self.device))
        n = len(generators)
        moments = torch.cat([posterior.mean, posterior.logvar], dim=1).expand(n, -1, -1, -1)
        z = type(posterior)(moments).sample(generators)
        return self.vae.to_latent(z).float()

    def _sample(
        self,
        denoiser: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor,
        method: str,
        generators: list[torch.Generator],
        callback: StepCallback | None,
        cond: dict[str, Any],
    ) -> Tensor:
        """Run the sampler, reporting each step to ``callback``; raise ``GenerationCancelled`` if it says so."""
        total = len(sigmas) - 1
        stopped: list[int] = []

        def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool:
            if callback is not None and callback(i, total, sigma, denoised) is True:
                stopped.append(i)
                return True
            return False

        x = sample(denoiser, x, sigmas, method, generator=generators, callback=on_step, **cond)
        if stopped:
            raise GenerationCancelled(stopped[0], total)
        return x

    def decode(self, latents: Tensor) -> list[Image.Image]:
        """Model latents (B, C, h, w) to RGB images, rounded to 8 bits as diffusers does."""
        pixels = self.vae.decode(self.vae.from_latent(latents.to(self.device, self.vae.dtype))).float()
        return to_pil(pixels)

    def _parameters(self, req: Request, i: int) -> str:
        params: dict[str, Any] = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            sampler=req.sampler,
            guidance_scale=req.guidance_scale,
            seed=req.seed + i,
            width=req.width,
            height=req.height,
            model_hash=self.model_hash,
            model=self.name,
            strength=req.strength if req.image is not None else None,
            guidance_rescale=req.guidance_rescale or None,
            guidance_interval=req.guidance_interval,
            spacing=req.spacing,
            batch_size=req.num_images if req.num_images > 1 else None,
            batch_pos=i if req.num_images > 1 else None,
            extra={"Initial noise": "given latents"} if req.latents is not None else None,
        )
        return format_parameters(params)
