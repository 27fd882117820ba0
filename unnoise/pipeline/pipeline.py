"""Text-to-image, image-to-image (SDEdit) and inpainting with a latent diffusion model: text encoder, U-Net, VAE.

``Pipeline.generate`` is the one way into generation (the library, ``unnoise generate``, the evaluation and every
HTTP endpoint call it): it resolves each request once (``inputs``), encodes the distinct prompts once, wraps the
U-Net as ``VPDenoiser`` -> ``CFGDenoiser`` (-> ``KnownRegion`` when inpainting with a model not trained for it),
draws each image's noise from its own generator seeded ``seed + i`` (AUTOMATIC1111's convention, so image i is the
same whatever the batch), runs one sampler pass over the grid of the model's scheduler config (and a second, upscaled
img2img pass for a hires fix), decodes the latents, pastes inpainted images back into their originals, records each
image's parameters and applies the safety stage. Loading is in ``loading``, the config in ``config``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
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
from unnoise.core.samplers import lcm_timesteps, sample
from unnoise.core.schedules import VPSchedule
from unnoise.files import file_sha256
from unnoise.models import lora
from unnoise.models.graphs import DEFAULT_MAX_GRAPHS, GraphedUNet
from unnoise.models.packing import prepare_for_inference
from unnoise.models.text import MiniLMEncoder, TextEncoder
from unnoise.models.unet import guidance_scale_embedding
from unnoise.pipeline.config import PipelineConfig, sampling_grid
from unnoise.pipeline.hires import UPSCALERS, upscale_image, upscale_latents
from unnoise.pipeline.images import paste_back, to_tensor
from unnoise.pipeline.inputs import (
    AESTHETIC_SCORE,
    BATCH_KEY_FIELDS,
    NEGATIVE_AESTHETIC_SCORE,
    Request,
    ResolvedRequest,
    resolve_request,
)
from unnoise.pipeline.loading import (
    Components,
    SingleFileInfo,
    load_components,
    load_single_file,
    resolve_model,
    save_components,
    vae_dtype,
)
from unnoise.pipeline.png import add_provenance, format_parameters, to_pil
from unnoise.pipeline.prompts import StepConditioned, encode_prompts, extract_loras, prompt_schedule, text_at_step
from unnoise.safety import PROVENANCE_INFO, SafetyChecker, SafetyConfig

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


class UNetDenoiserModel(nn.Module):
    """The U-Net as a ``VPDenoiser`` model; an inpainting U-Net gets ``[mask, masked-image latents]`` appended, an
    SDXL U-Net its pooled text embedding and time ids."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, inpaint: Tensor | None = None, **added: Tensor
    ) -> Tensor:
        if inpaint is not None:
            x = torch.cat([x, inpaint.to(x.dtype)], dim=1)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **added)  # SDXL: text_embeds, time_ids


@dataclasses.dataclass
class _Start:
    """One request's part of a sampler pass: its generators, initial state and inpainting inputs."""

    generators: list[torch.Generator]
    x: Tensor
    inpaint: Tensor | None = None  # mask and masked-image latents, appended to an inpainting U-Net's input
    known: tuple[Tensor, Tensor] | None = None  # (latent mask, z0) for KnownRegion


def _image_parameters(req: ResolvedRequest) -> dict[str, Any]:
    """The img2img, inpainting and hires settings for the PNG parameters: AUTOMATIC1111's where it writes them
    (mask blur also at 0, so that a default of 4 does not replace it when read back), ours for the rest."""
    out: dict[str, Any] = {}
    if req.image is not None and req.resize_mode != "resize":
        out["resize_mode"] = req.resize_mode
    if req.mask is not None:
        out["mask_blur"] = req.mask_blur
        out["mask_invert"] = req.mask_invert or None
        out["inpainting_fill"] = req.inpainting_fill if req.inpainting_fill != "original" else None
        out["inpaint_full_res"] = True if req.inpaint_full_res_padding is not None else None
        out["inpaint_full_res_padding"] = req.inpaint_full_res_padding
        out["paste_back"] = None if req.overlay is not None and req.overlay.blend else False
    if req.hires is not None:
        hires = req.hires.hires
        if hires.width or hires.height:
            out["hires_resize"] = (hires.width or 0, hires.height or 0)
        else:
            out["hires_scale"] = hires.scale
        out["hires_steps"] = hires.steps or None
        out["hires_upscaler"] = hires.upscaler
    return out


def _shifted(callback: StepCallback, done: int, total: int) -> StepCallback:
    """``callback`` told of step ``done + i`` of ``total`` when a pass reports step i."""
    return lambda i, _, sigma, preview: callback(done + i, total, sigma, preview)


_STEPS = "prompt_steps"  # the key of ``cond`` under which ``_conditioning`` hands ``_sample`` a prompt schedule


@dataclasses.dataclass
class _StepConditioning:
    """Conditioning that changes with the step: ``segments[segment_of_step[i]]`` = (cond, uncond) at step i. The
    guidance holds ``uncond`` (a dict it reads at every call): ``use_uncond`` puts a segment's entries into it."""

    segment_of_step: list[int]
    segments: list[tuple[dict[str, Any], dict[str, Any]]]
    uncond: dict[str, Any]

    def use_uncond(self, k: int) -> None:
        self.uncond.update(self.segments[k][1])


def _schedule(req: ResolvedRequest, text: str, steps: int, *, tags: bool = False) -> list[tuple[int, str, bool]]:
    """(last step, text to encode, prompt language on) over ``steps``: the prompt without its LoRA tags and with its
    edits and alternations resolved, or the text as written when the request turns the language off."""
    if not req.prompt_syntax:
        return [(steps, text, False)]
    if tags:
        text = extract_loras(text)[0]
    return [(last, at, True) for last, at in prompt_schedule(text, steps)]


def _text_at(schedule: list[tuple[int, str, bool]], step: int) -> tuple[str, bool]:
    syntax = schedule[0][2]
    return text_at_step([(last, text) for last, text, _ in schedule], step), syntax


def _tags(req: ResolvedRequest) -> set[str]:
    """The LoRAs a request's prompt tags (``<lora:name:w>``), which its parameters keep in the prompt as written."""
    return set(extract_loras(req.prompt)[1]) if req.prompt_syntax else set()


def grid_for(config: PipelineConfig, sampler: str, steps: int, spacing: str | None = None) -> tuple[VPSchedule, Tensor]:
    """The schedule and sigma grid of a sampler pass: the config's grid at ``spacing``, except that the ``lcm`` sampler
    walks LCM's timestep grid (``samplers.lcm_timesteps``), as diffusers' ``LCMScheduler`` has its own."""
    schedule, sigmas = sampling_grid(config.schedule, config.sampling, steps, spacing)
    if sampler == "lcm":
        t = lcm_timesteps(steps, schedule.num_train_timesteps)
        sigmas = torch.cat([schedule.t_to_sigma(t), sigmas.new_zeros(1)])
    return schedule, sigmas


def _check_compatible(reqs: list[ResolvedRequest]) -> None:
    """One sampler pass needs one batch key: name the first setting where a request differs from the first."""
    for i, req in enumerate(reqs[1:], start=1):
        for name, mine, theirs in zip(BATCH_KEY_FIELDS, req.batch_key, reqs[0].batch_key, strict=True):
            if mine != theirs:
                raise ValueError(
                    f"requests[{i}].{name}={mine!r} is not allowed; requests generated together share "
                    f"{', '.join(BATCH_KEY_FIELDS)} (requests[0].{name}={theirs!r})"
                )


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
        prompt_syntax: bool = True,
    ):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder
        # AUTOMATIC1111's prompt language (unnoise.pipeline.prompts) for requests that leave ``prompt_syntax`` None
        self.prompt_syntax = prompt_syntax
        self._prepare_networks()
        self.config = config or PipelineConfig()
        self.name = name
        self._unet_weights = Path(unet_weights) if unet_weights is not None else None
        # Prompt filter before generation, image filter + watermark + provenance after (unnoise.safety), all in
        # ``generate``; the CLI and the server turn it on (``enable_safety``), the library leaves it to the caller.
        self.safety: SafetyChecker | None = None
        self._hash: str | None = None
        self.single_file: SingleFileInfo | None = None  # what a single-file checkpoint was detected to be
        self._loras: dict[str, lora.LoadedLoRA] = {}  # adapters by name, in loading order
        self._lora_scales: dict[str, float] = {}
        self.graphed_unet: GraphedUNet | None = None  # enable_cuda_graphs
        self._grids: dict[tuple, tuple[VPSchedule, Tensor]] = {}  # _grid's, by (sampler, steps, spacing)
        self._grids_config: PipelineConfig | None = None  # the config they are of
        self.lora_dir: Path | None = None  # LoRA files a request may name without loading them first
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
        if c.addition_embed_type == "text_time":
            pooled = getattr(text_encoder, "pooled_dim", text_encoder.dim)
            ids, rest = divmod(c.projection_class_embeddings_input_dim - pooled, c.addition_time_embed_dim)
            if rest or ids not in (5, 6):
                raise ValueError(
                    f"U-Net projection_class_embeddings_input_dim={c.projection_class_embeddings_input_dim} does not "
                    f"fit the text encoder's pooled width {pooled} plus 5 or 6 time ids of {c.addition_time_embed_dim}"
                )

    # -- loading, saving, placement ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Pipeline:
        """Load our folder (``pipeline.json``), a diffusers Stable Diffusion folder (``model_index.json``), or
        an embedded model by name: ``"default"``, the MNIST text-to-image model, or ``"lcm"``, its 1-step student."""
        found = resolve_model(path)
        if found.is_file():
            return cls.from_single_file(found, device=device, dtype=dtype)
        return cls._of(load_components(found), found.name, device, dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        *,
        prediction: str | None = None,
        config: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        ema: bool = False,
    ) -> Pipeline:
        """Load a single-file Stable Diffusion 1.x/2.x or SDXL (base, refiner; or inpainting) checkpoint in the
        original layout (``loading.load_single_file``: the family from its keys, configs shipped per family or from
        ``config=``, a diffusers or unnoise folder). ``prediction`` overrides the detected prediction type; what was
        detected and why is logged, kept in ``pipe.single_file`` and written into each image's parameters. ``.ckpt``
        pickles load only with ``allow_pickle=True``; ``ema=True`` takes the file's EMA U-Net weights."""
        parts = load_single_file(
            path, prediction=prediction, config=config, dtype=dtype, allow_pickle=allow_pickle, ema=ema
        )
        pipe = cls._of(parts, Path(path).stem, device, None)
        pipe.single_file = parts.single_file
        return pipe

    @classmethod
    def _of(
        cls, parts: Components, name: str, device: str | torch.device | None, dtype: torch.dtype | None
    ) -> Pipeline:
        pipe = cls(parts.unet, parts.vae, parts.text_encoder, parts.config, name=name, unet_weights=parts.unet_weights)
        return pipe.to(device, dtype) if device is not None or dtype is not None else pipe

    def save_pretrained(self, path: str | Path) -> None:
        """Write our format: ``pipeline.json``, ``unet/``, ``vae/`` (and CLIP's ``text_encoder/``, ``tokenizer/``)."""
        save_components(path, Components(self.unet, self.vae, self.text_encoder, self.config, None))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the networks; ``dtype`` applies to the U-Net, and to the VAE as ``loading.vae_dtype`` says (SDXL's VAE
        with ``force_upcast`` stays float32)."""
        self.unet.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=None if dtype is None else vae_dtype(self.unet.config, self.vae.config, dtype))
        self.text_encoder.to(device=device)
        self._prepare_networks()
        return self

    def enable_cuda_graphs(self, enabled: bool = True, *, max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        """Run the U-Net through CUDA graphs, one captured per input signature (batch, size, conditioning) up to
        ``max_graphs`` and replayed (``unnoise.models.graphs``); ``enabled=False`` goes back to plain calls. Needs the
        U-Net on a CUDA device (a ValueError otherwise); LoRA changes and moves recapture by themselves."""
        if not enabled:
            self.graphed_unet = None
            return
        if self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the U-Net on a CUDA device; it is on {self.device.type}")
        self.graphed_unet = GraphedUNet(self.unet, max_graphs=max_graphs)

    def _prepare_networks(self) -> None:
        """The inference defaults of the U-Net and the VAE on their device: on the CPU conv weights packed in place
        for oneDNN (no copy beside them) and upsampling fused as measured best (docs/benchmarks/models.md)."""
        prepare_for_inference(self.unet)
        prepare_for_inference(self.vae)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def guidance_embedded(self) -> bool:
        """Whether the U-Net takes the guidance scale as an input (``time_cond_proj_dim``: guidance-distilled and
        latent consistency models): one batch-1 call per step with the embedding of ``guidance_scale - 1``."""
        return getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsampling_factor

    @property
    def num_train_timesteps(self) -> int:
        schedule = self.config.schedule
        return len(schedule.trained_betas) if schedule.trained_betas is not None else schedule.num_train_timesteps

    @property
    def time_id_count(self) -> int | None:
        """SDXL's time ids per image: 6 (sizes and crop: base), 5 (sizes, crop, aesthetic score: refiner), None for
        a U-Net without size conditioning."""
        c = self.unet.config
        if c.addition_embed_type != "text_time":
            return None
        pooled = getattr(self.text_encoder, "pooled_dim", self.text_encoder.dim)
        return (c.projection_class_embeddings_input_dim - pooled) // c.addition_time_embed_dim

    @property
    def latent_factor(self) -> int:
        """Pixels per side that height and width must be multiples of: VAE factor x 2**(U-Net downsamplings)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) when a call gives none: the first size the config declares, else the U-Net's sample size
        in pixels, else the VAE's."""
        if self.config.sizes is not None:
            return self.config.sizes[0]
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

    def enable_safety(self, config: SafetyConfig | None = None) -> SafetyChecker:
        """Turn on the safety stage that ``config`` describes (prompt filter, image filter with a CLIP folder,
        watermark), sharing this pipeline's MiniLM encoder with the prompt filter; returns it (``self.safety``)."""
        encoder = self.text_encoder if isinstance(self.text_encoder, MiniLMEncoder) else None
        self.safety = SafetyChecker.from_config(config, encoder=encoder)
        return self.safety

    # -- LoRA -----------------------------------------------------------------------------------------------------

    def _lora_networks(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, **self.text_encoder.lora_networks()}

    def load_lora(
        self,
        path: str | Path,
        scale: float = 1.0,
        name: str | None = None,
        *,
        strict: bool = True,
        allow_pickle: bool = False,
    ) -> str:
        """Load a LoRA file (kohya/AUTOMATIC1111 or diffusers/PEFT format, detected from its keys) onto the U-Net and
        the text encoder, un-fused, at ``scale``; returns its adapter name (``name``, else the file's stem).

        Every key must update a layer of this model with a matching shape: otherwise a ValueError names the first
        keys and their count (``strict=False`` loads the rest, with one ``LoRAWarning`` naming what was left out).
        ``lora_info[name].layers`` says how many layers of each network received it. Pickled files (``.ckpt``,
        ``.pt``) load only with ``allow_pickle=True``."""
        name = lora.adapter_name(path, name, self._loras)
        file = lora.read_lora(path, allow_pickle=allow_pickle)
        adapter = lora.adapter_from_file(file, self._lora_networks(), strict=strict, source=str(path))
        self.add_lora(adapter, name, scale, path=Path(path), format=file.format)
        return name

    def add_lora(
        self, adapter: lora.LoRAAdapter, name: str, scale: float = 1.0, *, path: Path | None = None,
        format: str = "kohya",
    ) -> str:  # fmt: skip
        """Attach an adapter built in memory (``LoRAAdapter``; a trainer's) under ``name`` at ``scale``."""
        lora.adapter_name(name, name, self._loras)
        if self.lora_fused:
            raise ValueError(f"cannot add LoRA {name!r} while LoRAs are fused; call unfuse_lora() first")
        networks = self._lora_networks()
        for net in adapter.counts():
            if net not in networks:
                raise ValueError(f"LoRA {name!r} has layers for {net}, which this pipeline does not have")
        attached = []
        try:
            for net in adapter.counts():
                lora.attach(networks[net], adapter, name=name, net=net, scale=scale)
                attached.append(networks[net])
        except Exception:
            for network in attached:  # all networks or none
                lora.detach(network, name)
            raise
        digest = lora.lora_hash(path) if path is not None else None
        self._loras[name] = lora.LoadedLoRA(name, path, format, digest, adapter.counts())
        self._lora_scales[name] = float(scale)
        return name

    @property
    def loras(self) -> dict[str, float]:
        """The loaded adapters and their scales, in loading order."""
        return dict(self._lora_scales)

    @property
    def lora_info(self) -> dict[str, lora.LoadedLoRA]:
        """What each loaded adapter is: file, format, AUTOMATIC1111 hash, layers per network."""
        return dict(self._loras)

    @property
    def lora_fused(self) -> bool:
        return any(lora.is_fused(network) for network in self._lora_networks().values())

    def available_loras(self) -> dict[str, Path | None]:
        """Adapter names a request may use: those loaded, and the ``.safetensors`` files of ``lora_dir`` by stem."""
        found: dict[str, Path | None] = {}
        if self.lora_dir is not None:
            found |= {p.stem: p for p in sorted(Path(self.lora_dir).glob("*.safetensors")) if p.is_file()}
        loaded = dict(self._loras)  # a snapshot: the server's worker may be loading one meanwhile
        return found | {name: info.path for name, info in loaded.items()}

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Set the scales of the named adapters (0 switches one off); the others keep theirs."""
        for name in scales:
            if name not in self._loras:
                raise ValueError(f"LoRA name={name!r} is not loaded; loaded: {sorted(self._loras) or 'none'}")
        for network in self._lora_networks().values():
            mine = {n: s for n, s in scales.items() if n in lora.loaded(network)}
            if mine:
                lora.set_scales(network, mine)
        self._lora_scales.update({n: float(s) for n, s in scales.items()})

    def unload_lora(self, name: str | None = None) -> list[str]:
        """Remove adapter ``name`` (all with None), unfusing first; the base model is back bit for bit."""
        if name is not None and name not in self._loras:
            raise ValueError(f"LoRA name={name!r} is not loaded; loaded: {sorted(self._loras) or 'none'}")
        names = [name] if name is not None else list(self._loras)
        self.unfuse_lora()
        for network in self._lora_networks().values():
            for n in names:
                if n in lora.loaded(network):
                    lora.detach(network, n)
        for n in names:
            del self._loras[n], self._lora_scales[n]
        return names

    def fuse_lora(self) -> int:
        """Add every adapter's update at its scale into the base weights: generation costs what the base model
        costs; ``unfuse_lora`` restores the base weights bit for bit. Returns the number of layers changed."""
        return sum(lora.fuse(network) for network in self._lora_networks().values())

    def unfuse_lora(self) -> int:
        return sum(lora.unfuse(network) for network in self._lora_networks().values())

    @contextlib.contextmanager
    def _adapters(self, wanted: tuple[tuple[str, float], ...]) -> Iterator[None]:
        """Run the block with exactly the adapters ``wanted`` at their scales (loading those of ``lora_dir`` on
        first use, at scale 0 outside requests that name them)."""
        available = self.available_loras()
        for name, _ in wanted:
            if name not in self._loras:
                if available.get(name) is None:
                    raise ValueError(f"loras: {name!r} is not a known LoRA; available: {sorted(available)}")
                self.load_lora(available[name], 0.0, name)
        scales = dict(wanted)
        if self.lora_fused:
            active = {n: s for n, s in self._lora_scales.items() if s != 0}
            if active != scales:
                raise ValueError(f"loras={scales} differ from the fused adapters {active}; call unfuse_lora() first")
            yield
            return
        with contextlib.ExitStack() as stack:
            for network in self._lora_networks().values():
                here = lora.loaded(network)
                # adapters loaded on a network directly (unet.load_lora) are the caller's: they keep their scales
                mine = {n: s for n, s in here.items() if n not in self._loras} | {
                    n: s for n, s in scales.items() if n in here
                }
                if here:
                    stack.enter_context(lora.scales_applied(network, mine))
            yield

    # -- generation -----------------------------------------------------------------------------------------------

    def __call__(self, prompt: str, *, callback: StepCallback | None = None, **settings: Any) -> list[Image.Image]:
        """Generate the images of one request: ``settings`` are the fields of ``Request`` (num_images, steps,
        sampler, guidance_scale, seed, width, height, image, strength, mask, latents, ...). ``callback(step, total,
        sigma, preview)`` returning True raises ``GenerationCancelled``. Each image's ``info["parameters"]`` holds its
        AUTOMATIC1111-format settings (``unnoise.pipeline.png``)."""
        allowed = [name for name in Request.field_names() if name != "prompt"]
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise TypeError(f"Pipeline() got unknown settings {unknown}; allowed: {', '.join(allowed)}")
        return self.generate([Request(prompt, **settings)], callback=callback)[0]

    @torch.no_grad()
    def generate(
        self, requests: Sequence[Request | ResolvedRequest], callback: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        """The images of each request (a list per request, in order) from one sampler pass over all of them.

        The requests must share their ``batch_key`` (size, steps, sampler, spacing, guidance; image, mask and
        strength for img2img); each keeps its own prompt, negative prompt, seeds and PNG parameters, and its images
        equal those it gets alone up to float rounding (at most 1/255). Distinct texts are encoded in one call.
        With ``self.safety`` set, every prompt is checked first (``PromptBlocked``) and every image is filtered,
        watermarked and given its provenance afterwards: this is the one place where safety applies.
        """
        reqs = [r if isinstance(r, ResolvedRequest) else resolve_request(self, r) for r in requests]
        if not reqs:
            raise ValueError("requests=[] is not allowed; expected one or more requests")
        _check_compatible(reqs)
        if self.safety is not None:
            for req in reqs:
                self.safety.require_allowed(req.prompt)  # PromptBlocked (a ValueError naming the category)
        plan = reqs[0].hires
        first_steps, hires_steps = len(self._grid(reqs[0])[1]) - 1, plan.steps if plan else 0
        x = self._pass(reqs, callback, 0, first_steps + hires_steps)
        if plan is not None:  # hires fix: img2img of the upscaled first pass, each image its own request
            x = self._pass(self._hires_requests(reqs, x), callback, first_steps, first_steps + hires_steps)
        images = self.decode(x)
        out, begin = [], 0
        for req in reqs:
            mine = [self._paste_back(req, image) for image in images[begin : begin + req.num_images]]
            for i, image in enumerate(mine):
                image.info["parameters"] = self._parameters(req, i)
            out.append(self._finish(mine))
            begin += req.num_images
        return out

    def _pass(self, reqs: list[ResolvedRequest], callback: StepCallback | None, done: int, total: int) -> Tensor:
        """One sampler pass over compatible requests: the final latents. ``callback`` sees steps ``done + i`` of
        ``total`` (a hires fix runs two passes)."""
        callback = _shifted(callback, done, total) if callback is not None else None
        try:
            return self._one_pass(reqs, callback)
        except GenerationCancelled as cancelled:
            raise GenerationCancelled(done + cancelled.step, total) from None

    def _one_pass(self, reqs: list[ResolvedRequest], callback: StepCallback | None) -> Tensor:
        first = reqs[0]
        schedule, sigmas = self._grid(first)
        quantize = self.config.sampling.quantize and first.spacing == "karras"
        model = UNetDenoiserModel(self.unet if self.graphed_unet is None else self.graphed_unet)
        vp = VPDenoiser(model, schedule, self.config.prediction, quantize=quantize)
        starts = [self._start(req, sigmas, vp.prior_std(sigmas[0].item())) for req in reqs]
        x = torch.cat([start.x for start in starts])
        generators = [g for start in starts for g in start.generators]
        with self._adapters(first.loras), self._caching(first, schedule):
            cond, uncond = self._conditioning(reqs, starts)
            space = "v" if self.config.prediction == "v_prediction" else "epsilon"
            guidance = (first.guidance_scale, uncond, first.guidance_rescale, first.guidance_interval)
            denoiser: Callable[..., Tensor] = vp  # a guidance embedding in ``cond`` guides it
            if not self.guidance_embedded:
                denoiser = CFGDenoiser(vp, *guidance, rescale_space=space)
            if starts[0].known is not None:
                mask, z0 = (torch.cat(parts) for parts in zip(*(start.known for start in starts), strict=True))
                denoiser = KnownRegion(denoiser, mask, z0)
            x = self._sample(denoiser, x, sigmas, first.sampler, generators, callback, cond)
        return x

    def _caching(self, req: ResolvedRequest, schedule: VPSchedule) -> contextlib.AbstractContextManager:
        """The U-Net's feature cache for one pass (``UNet.caching``), its sigma range as the U-Net's timesteps."""
        if req.cache_interval == 1:
            return contextlib.nullcontext()
        t_range = None
        if req.cache_range is not None:
            lo, hi = req.cache_range
            if lo > schedule.sigma_max or hi < schedule.sigma_min:  # the network is never called in the range
                return contextlib.nullcontext()
            # the U-Net sees timesteps; the network is only called at sigmas of the schedule's range
            lo, hi = max(lo, schedule.sigma_min), min(hi, schedule.sigma_max)
            t_range = (float(schedule.sigma_to_t(lo)), float(schedule.sigma_to_t(hi)))
        return self.unet.caching(req.cache_interval, t_range=t_range)

    def _hires_requests(self, reqs: list[ResolvedRequest], latents: Tensor) -> list[ResolvedRequest]:
        """The hires fix's second pass: one img2img request per image (seed ``seed + i``) at the upscaled size, from
        its latents interpolated (latent upscalers) or from its image decoded and resized (the others)."""
        plan = reqs[0].hires
        latent = UPSCALERS[plan.hires.upscaler].mode is not None
        if latent:
            upscaled = [None] * len(latents)
            inits = list(upscale_latents(latents, plan, self.vae_factor).split(1))
        else:
            upscaled = [to_tensor(upscale_image(image, plan)) for image in self.decode(latents)]
            inits = [None] * len(latents)
        out, begin = [], 0
        for req in reqs:
            for i in range(req.num_images):
                out.append(dataclasses.replace(
                    req, num_images=1, seed=req.seed + i, width=plan.size[0], height=plan.size[1],
                    steps=plan.grid_steps, strength=plan.hires.strength, run_steps=plan.steps,
                    image=upscaled[begin + i], init_latents=inits[begin + i], latents=None, hires=None,
                ))  # fmt: skip
            begin += req.num_images
        return out

    @staticmethod
    def _paste_back(req: ResolvedRequest, image: Image.Image) -> Image.Image:
        """Inpainting: the generated image put back into the original (``images.paste_back``)."""
        o = req.overlay
        return image if o is None else paste_back(image, o.original, o.mask, o.box, blend=o.blend)

    def _finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """The safety stage's image filter, watermark and provenance, written into each image's parameters."""
        if self.safety is None:
            return images
        finished = self.safety.finish(images)
        for image in finished:
            add_provenance(image, image.info.pop(PROVENANCE_INFO))
        return finished

    def _grid(self, req: ResolvedRequest) -> tuple[VPSchedule, Tensor]:
        """The schedule and grid of the scheduler config; img2img keeps the tail that ``strength`` selects.
        Grids are kept per config (``grid_for`` rebuilds the 1000-step schedule, a millisecond per call)."""
        key = (req.sampler, req.steps, req.spacing)
        if self._grids_config is not self.config or len(self._grids) >= 64:
            self._grids, self._grids_config = {}, self.config
        if key not in self._grids:
            self._grids[key] = grid_for(self.config, req.sampler, req.steps, req.spacing)
        schedule, sigmas = self._grids[key]
        sigmas = sigmas.clone()  # the caller's own
        if req.image is not None or req.init_latents is not None:  # diffusers' img2img: start at steps - int(...)
            run = int(req.steps * req.strength) if req.run_steps is None else req.run_steps
            sigmas = sigmas[req.steps - run :]
        return schedule, sigmas

    def _conditioning(self, reqs: list[ResolvedRequest], starts: list[_Start]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Prompt and negative-prompt embeddings of every image (the cached empty prompt where a request has no
        negative prompt or guidance is off), each distinct text encoded once, and the inpainting channels.

        Prompts in AUTOMATIC1111's language (``prompts``; per request, ``prompt_syntax``) lose their LoRA tags, are
        encoded with their emphasis in windows, every text padded to the same number of windows with empty-prompt
        windows, and follow their editing schedule over the request's steps. When some text changes with the step,
        ``cond`` holds the step-0 conditioning and, under ``_STEPS``, every step's; ``_sample`` applies them."""
        steps = reqs[0].steps
        embedded = self.guidance_embedded
        negatives = [None if r.guidance_scale == 1.0 or embedded else r.negative_prompt for r in reqs]
        pos = [_schedule(r, r.prompt, steps, tags=True) for r in reqs]
        neg = [None if n is None else _schedule(r, n, steps) for r, n in zip(reqs, negatives, strict=True)]
        encoded = self._encode_texts({(text, syntax) for s in pos + neg if s for _, text, syntax in s})
        windows = next(iter(encoded.values()))[0].shape[0] // self.text_encoder.max_length
        if self.config.text_encoder.force_zeros_for_empty_prompt:  # SDXL base: zeros, not the empty prompt's states
            first = next(iter(encoded.values()))
            empty = (torch.zeros_like(first[0]), torch.zeros_like(first[1]))
        else:
            blank = self.text_encoder.empty()
            empty = (blank.hidden_states[0].to(self.device).repeat(windows, 1), blank.pooled[0].to(self.device))
        counts = [r.num_images for r in reqs]

        def images(parts: list[Tensor]) -> Tensor:  # each request's tensor once per image
            return torch.cat([t.expand(n, *t.shape) for t, n in zip(parts, counts, strict=True)])

        def at_step(step: int) -> tuple[dict[str, Any], dict[str, Any]]:
            p = [encoded[_text_at(s, step)] for s in pos]
            n = [empty if s is None else encoded[_text_at(s, step)] for s in neg]
            cond = {"encoder_hidden_states": images([e[0] for e in p])}
            uncond = {"encoder_hidden_states": images([e[0] for e in n])}
            if self.time_id_count is not None:
                cond["text_embeds"], uncond["text_embeds"] = images([e[1] for e in p]), images([e[1] for e in n])
                cond["time_ids"] = images([torch.tensor(r.time_ids, device=self.device) for r in reqs])
                uncond["time_ids"] = images([torch.tensor(r.negative_time_ids, device=self.device) for r in reqs])
            if starts[0].inpaint is not None:
                cond["inpaint"] = uncond["inpaint"] = torch.cat([start.inpaint for start in starts])
            if embedded:  # the requests share their guidance scale (batch key)
                w = torch.full((sum(counts),), reqs[0].guidance_scale - 1.0)
                cond["timestep_cond"] = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim).to(
                    self.device, self.unet.dtype
                )
            return cond, uncond

        keys = [tuple(None if s is None else _text_at(s, i) for s in pos + neg) for i in range(steps)]
        segments = list(dict.fromkeys(keys))  # the distinct conditionings, in order of first use
        cond, uncond = at_step(0)
        if len(segments) > 1:
            conditionings = [at_step(keys.index(key)) for key in segments]
            cond[_STEPS] = _StepConditioning([segments.index(key) for key in keys], conditionings, uncond)
        return cond, uncond

    def _encode_texts(self, texts: set[tuple[str, bool]]) -> dict[tuple[str, bool], tuple[Tensor, Tensor]]:
        """(hidden states, pooled) of each (text, prompt language on) on the pipeline's device: those in the prompt
        language in one call (``prompts.encode_prompts``), the others as plain text in one call, every text padded
        with empty-prompt windows to the longest."""
        out: dict[tuple[str, bool], tuple[Tensor, Tensor]] = {}
        for syntax in (True, False):
            group = sorted(text for text, on in texts if on == syntax)
            if group:
                e = encode_prompts(self.text_encoder, group) if syntax else self.text_encoder.encode(group)
                hidden, pooled = e.hidden_states.to(self.device), e.pooled.to(self.device)
                out |= {(text, syntax): (h, p) for text, h, p in zip(group, hidden, pooled, strict=True)}
        longest = max(h.shape[0] for h, _ in out.values())
        if all(h.shape[0] == longest for h, _ in out.values()):
            return out
        blank = self.text_encoder.empty().hidden_states[0].to(self.device)
        pad = {key: blank.repeat((longest - len(h)) // len(blank), 1) for key, (h, _) in out.items()}
        return {key: (torch.cat([h, pad[key]]), p) for key, (h, p) in out.items()}

    def _start(self, req: ResolvedRequest, sigmas: Tensor, prior_std: float) -> _Start:
        """One request's generators, initial state, inpainting U-Net channels and (latent mask, z0) for
        ``KnownRegion``.

        Image i's generator is seeded ``seed + i`` and draws, in order: its posterior sample of the image (unless an
        inpainting U-Net starts from pure noise), its initial noise, its posterior sample of the masked image
        (inpainting U-Nets); the sampler's noise follows. This is diffusers' order. A hires pass's ``init_latents``
        take the place of the image's posterior sample (no draw), as AUTOMATIC1111's fresh noise of the same seed.
        """
        generators = [torch.Generator().manual_seed(req.seed + i) for i in range(req.num_images)]
        n, c, f = req.num_images, self.vae.config.latent_channels, self.vae_factor
        shape = (n, c, req.height // f, req.width // f)
        inpainting_model = self.unet.config.in_channels != c
        img2img = req.image is not None or req.init_latents is not None
        pure_noise = not img2img or (req.mask is not None and req.strength == 1.0)  # as diffusers' inpainting
        # an inpainting U-Net starting from pure noise never uses the image's latents: diffusers draws none for them
        z0 = None if not img2img or (pure_noise and inpainting_model) else self._init_latents(req, generators, shape)
        noise = req.latents if req.latents is not None else randn_like(torch.empty(shape), generators)
        noise = noise.to(self.device, torch.float32)
        mask = req.mask if req.mask is not None else torch.ones(1, 1, req.height, req.width)
        m = F.interpolate(mask.to(self.device), size=shape[-2:], mode="nearest").expand(n, -1, -1, -1)
        start = z0
        if req.mask is not None and req.inpainting_fill in ("latent_noise", "latent_nothing") and not pure_noise:
            # AUTOMATIC1111's masked content: the seed's noise (the initial noise itself) or zeros under the mask
            start = z0 * (1 - m) + (noise * m if req.inpainting_fill == "latent_noise" else 0)
        x = noise * prior_std if pure_noise else start + sigmas[0].item() * noise
        if req.mask is None and not inpainting_model:
            return _Start(generators, x)
        if not inpainting_model:
            return _Start(generators, x, known=(m, z0))
        # SD inpainting U-Nets (and AUTOMATIC1111 without a mask): a gray image, everything repainted
        channels = self.vae.config.in_channels
        image = req.image if req.mask is not None else torch.zeros(1, channels, req.height, req.width)
        masked = self._encode(image * (mask < 0.5), generators)
        return _Start(generators, x, inpaint=torch.cat([m, masked], dim=1))

    def _init_latents(self, req: ResolvedRequest, generators: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
        """The latents img2img starts from: the image's (a posterior sample per generator), or a hires pass's."""
        if req.init_latents is not None:
            return req.init_latents.to(self.device, torch.float32)
        z0 = self._encode(req.image, generators)
        if z0.shape[-2:] != shape[-2:]:  # resize_mode "latent": AUTOMATIC1111 interpolates the image's latents
            z0 = F.interpolate(z0, size=shape[-2:], mode="bilinear")
        return z0

    def _encode(self, image: Tensor, generators: list[torch.Generator]) -> Tensor:
        """Model latents of one image for each generator: a posterior sample each, scaled by ``vae.to_latent``."""
        posterior = self.vae.encode(image.to(self.device))
        n = len(generators)
        moments = torch.cat([posterior.mean, posterior.logvar], dim=1).expand(n, -1, -1, -1)
        z = type(posterior)(moments).sample(generators)
        return self.vae.to_latent(z).float()

    @staticmethod
    def _sample(
        denoiser: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor,
        method: str,
        generators: list[torch.Generator],
        callback: StepCallback | None,
        cond: dict[str, Any],
    ) -> Tensor:
        """Run the sampler, reporting each step to ``callback``; raise ``GenerationCancelled`` if it says so. A
        conditioning that changes with the step (``cond[_STEPS]``) wraps the denoiser in ``StepConditioned``."""
        total = len(sigmas) - 1
        stopped: list[int] = []
        if _STEPS in cond:
            steps: _StepConditioning = cond[_STEPS]
            cond = {key: value for key, value in cond.items() if key != _STEPS}
            conds = [c for c, _ in steps.segments]
            denoiser = StepConditioned(denoiser, sigmas, steps.segment_of_step, conds, steps.use_uncond)

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

    def _extra(self, req: ResolvedRequest) -> dict[str, str] | None:
        """Parameters beyond AUTOMATIC1111's: given noise, and a single file's detected prediction type."""
        extra = {"Initial noise": "given latents"} if req.latents is not None else {}
        if self.single_file is not None:
            extra["Prediction"] = f"{self.single_file.prediction} ({self.single_file.prediction_source})"
        return extra or None

    def _micro_conditioning(self, req: ResolvedRequest) -> dict[str, Any]:
        """SDXL's size, crop and aesthetic conditioning where it differs from the defaults, for the PNG parameters."""
        if req.time_ids is None:
            return {}
        ids, size = [int(v) for v in req.time_ids[:4]], (req.height, req.width)
        out: dict[str, Any] = {}
        if tuple(ids[:2]) != size:
            out["original_size"] = tuple(ids[:2])
        if tuple(ids[2:4]) != (0, 0):
            out["crops_coords_top_left"] = tuple(ids[2:4])
        if len(req.time_ids) == 6 and tuple(int(v) for v in req.time_ids[4:]) != size:
            out["target_size"] = tuple(int(v) for v in req.time_ids[4:])
        if len(req.time_ids) == 5:
            scores = (req.time_ids[4], req.negative_time_ids[4])
            if scores != (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE):
                out["aesthetic_score"], out["negative_aesthetic_score"] = scores
        return out

    def _parameters(self, req: ResolvedRequest, i: int) -> str:
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
            strength=req.strength if req.image is not None else req.hires.hires.strength if req.hires else None,
            guidance_rescale=req.guidance_rescale or None,
            guidance_interval=req.guidance_interval,
            cache_interval=req.cache_interval if req.cache_interval != 1 else None,
            cache_range=req.cache_range,
            prompt_syntax=False if not req.prompt_syntax else None,  # written when off: prompts are plain text
            spacing=req.spacing,
            batch_size=req.num_images if req.num_images > 1 else None,
            batch_pos=i if req.num_images > 1 else None,
            extra=self._extra(req),
            loras={n: s for n, s in req.loras if n not in _tags(req)},  # tagged ones are in the prompt already
            **self._micro_conditioning(req),
            **_image_parameters(req),
            lora_hashes={n: self._loras[n].hash for n, _ in req.loras if self._loras[n].hash is not None},
        )
        return format_parameters(params)
