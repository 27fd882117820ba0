"""KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3) in diffusers' ``AutoencoderKL`` layout.

State-dict keys are those of diffusers' ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0.conv1.weight``, ...),
so Stable Diffusion 1.x/2.x ``vae/`` folders load through ``unnoise.models.io.load_diffusers`` unchanged.
Memory options: ``enable_slicing`` (one image at a time), ``enable_tiling`` (overlapping tiles blended with
linear ramps), ``layers.set_attention_mode(vae, "chunked")``, ``vae.to(torch.bfloat16)`` (GroupNorm statistics
stay float32), ``vae.to(memory_format=torch.channels_last)``, ``layers.set_upsample_fusion(vae, False)`` (the
decoder's upsamplers run as one convolution on the low-resolution map by default) and the CPU's oneDNN weight
packing (``packing``: ``packing.prepare_for_inference(vae)`` packs the conv weights in place, the default for a model
that only generates). These settings are measured against diffusers' decode in docs/benchmarks/models.md.
``decode_activation_bytes`` and ``resident_bytes`` give the memory the serving VRAM planner budgets (``memory``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.core.noise import Generator, randn_like
from unnoise.models import memory
from unnoise.models.config import ModelConfig
from unnoise.models.layers import (
    Downsample2D,
    GroupNorm32,
    ResnetBlock2D,
    SpatialAttention,
    Upsample2D,
    memory_format_of,
)
from unnoise.models.packing import Conv2d


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderKLConfig(ModelConfig):
    """Autoencoder shape and latent scaling; defaults are Stable Diffusion 1.x's ``vae/config.json``."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512  # pixels; also the default tile size
    scaling_factor: float = 0.18215  # SD 1.x/2.x; SDXL 0.13025
    shift_factor: float | None = None  # SD3/Flux-style latent mean, subtracted before scaling
    force_upcast: bool = True  # advice to pipelines: run this VAE in float32 even when the U-Net runs in fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            _require(self, name, _count(getattr(self, name)), "an int >= 1")
        channels, groups = self.block_out_channels, self.norm_num_groups
        ok = isinstance(channels, tuple) and len(channels) > 0 and all(_count(c) and c % groups == 0 for c in channels)
        _require(self, "block_out_channels", ok, f"a non-empty tuple of multiples of norm_num_groups={groups}")
        factor = self.downsampling_factor
        ok = _count(self.sample_size) and self.sample_size % factor == 0
        _require(self, "sample_size", ok, f"a positive multiple of the downsampling factor {factor}")
        _require(
            self, "scaling_factor", _finite(self.scaling_factor) and self.scaling_factor > 0, "a finite number > 0"
        )
        _require(self, "shift_factor", self.shift_factor is None or _finite(self.shift_factor), "None or a number")
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            _require(self, name, isinstance(getattr(self, name), bool), "True or False")

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each axis: one halving per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> AutoencoderKLConfig:
        """Translate diffusers' ``AutoencoderKL`` ``config.json``; options we cannot honour are errors naming them."""
        cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
        blocks = len(cfg["block_out_channels"])
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(cfg.pop(key))
            if types != [block] * blocks:
                raise ValueError(f"diffusers config {key}={types} is not supported; allowed: {blocks} x {block!r}")
        act_fn = cfg.pop("act_fn")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"diffusers config act_fn={act_fn!r} is not supported; allowed: 'silu' (alias 'swish')")
        for key in ("latents_mean", "latents_std"):
            value = cfg.pop(key)
            if value is not None:
                raise ValueError(
                    f"diffusers config {key}={value!r} (per-channel latent statistics) is not supported; allowed: null"
                )
        if isinstance(cfg["sample_size"], list | tuple):
            raise ValueError(f"diffusers config sample_size={cfg['sample_size']!r} is not supported; allowed: one int")
        return cls.from_dict(cfg)


# diffusers' own defaults, used for keys an older config.json leaves out (they differ from SD's values above).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    **dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[64], layers_per_block=1),
    **dict(down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], act_fn="silu"),
    **dict(norm_num_groups=32, sample_size=32, scaling_factor=0.18215, shift_factor=None, force_upcast=True),
    **dict(latents_mean=None, latents_std=None, use_quant_conv=True, use_post_quant_conv=True),
    **dict(mid_block_add_attention=True),
}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(config: AutoencoderKLConfig, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"AutoencoderKLConfig.{name}={getattr(config, name)!r} is not allowed; expected {allowed}")


def _resnets(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.ModuleList:
    """``layers`` resnet blocks without time conditioning; the first one changes the channel count."""
    return nn.ModuleList(
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups)
        for i in range(layers)
    )


class DownEncoderBlock(nn.Module):
    """Encoder stage: ``resnets`` at one resolution, then an optional strided-conv ``downsamplers.0``."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock(nn.Module):
    """Decoder stage: ``resnets`` at one resolution, then an optional nearest-upsample-and-conv ``upsamplers.0``."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class MidBlock(nn.Module):
    """Lowest resolution: resnet, optional single-head self-attention over all pixels, resnet."""

    def __init__(self, channels: int, *, groups: int, attention: bool):
        super().__init__()
        self.resnets = _resnets(channels, channels, 2, groups)
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups=groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image to the moments (mean and log-variance, ``2 * latent_channels``) of the posterior."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(
                channels[max(i - 1, 0)],
                channels[i],
                layers=config.layers_per_block,
                groups=groups,
                downsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups=groups, attention=config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm32(groups, channels[-1], eps=1e-6)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    """Latent to image; the up path walks ``block_out_channels`` in reverse with one extra resnet per stage."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups=groups, attention=config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(
                channels[max(i - 1, 0)],
                channels[i],
                layers=config.layers_per_block + 1,
                groups=groups,
                upsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = GroupNorm32(groups, channels[-1], eps=1e-6)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=not torch.is_grad_enabled()))


class DiagonalGaussian:
    """Posterior ``q(z | x) = N(mean, diag(exp(logvar)))`` from the encoder's moments (Kingma & Welling 2014)."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped to [-30, 20] as in the original LDM code (CompVis ldm/modules/distributions/distributions.py,
        # copied by diffusers), so that exp() neither underflows to a zero std nor overflows.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> Tensor:
        """``mean + std * eps``; eps is drawn in float32 like ``torch.randn(shape)``, per image for a generator list."""
        return self.mean + self.std * randn_like(self.mean, generator)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I))`` per sample, shape (B,), summed over latent elements, in float32."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder, ``quant_conv``, posterior, ``post_quant_conv``, decoder; ``to_latent`` scales for the U-Net."""

    # Upsampling on the CPU under ``packing.prepare_for_inference``: fused. With the weights packed in place, SD-1.5's
    # decoder shape at half width decoding 32x32 latents measured 0.83x diffusers' latency and 0.91x its memory fused
    # against 0.90x and 0.86x unfused (docs/benchmarks/models.md).
    cpu_upsample_fusion = True

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        self.use_slicing = False
        self.tile_size: int | None = None  # pixels; None: tiling off
        self.tile_overlap = 0  # pixels

    # -- memory options -------------------------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one image at a time: peak activation memory of batch size 1, same result."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_size: int | None = None, overlap: int | None = None) -> None:
        """Encode/decode images larger than ``tile_size`` pixels as overlapping tiles blended with linear ramps.

        ``tile_size`` defaults to ``config.sample_size`` and ``overlap`` (pixels shared by neighbouring tiles) to a
        quarter of it; both must be multiples of the downsampling factor, and ``overlap <= tile_size // 2``.
        """
        factor = self.config.downsampling_factor
        tile_size = self.config.sample_size if tile_size is None else tile_size
        if not isinstance(tile_size, int) or tile_size < factor or tile_size % factor:
            raise ValueError(f"tile_size={tile_size!r} must be a positive multiple of the downsampling factor {factor}")
        overlap = tile_size // 4 // factor * factor if overlap is None else overlap
        if not isinstance(overlap, int) or not 0 <= overlap <= tile_size // 2 or overlap % factor:
            raise ValueError(
                f"overlap={overlap!r} must be a multiple of the downsampling factor {factor} "
                f"between 0 and tile_size // 2 = {tile_size // 2}"
            )
        self.tile_size, self.tile_overlap = tile_size, overlap

    def disable_tiling(self) -> None:
        self.tile_size = None

    def decode_activation_bytes(self, batch: int, height: int, width: int) -> int:
        """Peak bytes ``decode`` of ``batch`` latents of ``height`` x ``width`` allocates beyond the weights, as the
        network is set and placed now (slicing, attention, dtype, convolution kernels; tiling is not modelled)."""
        return memory.decode_activation_bytes(self, batch, height, width)

    def resident_bytes(self) -> int:
        """Bytes held between inference calls: weights, buffers and the kernels kept from them (``memory``)."""
        return memory.resident_bytes(self)

    # -- encode / decode ------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images (B, in_channels, H, W), H and W multiples of the downsampling factor, to the latent posterior."""
        c, factor = self.config.in_channels, self.config.downsampling_factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (batch, {c}, height, width) with height and width "
                f"multiples of the downsampling factor {factor}"
            )
        x = x.to(self.dtype)
        parts = x.split(1) if self.use_slicing else (x,)
        moments = torch.cat([self._encode(part) for part in parts])
        return DiagonalGaussian(moments.contiguous(memory_format=memory_format_of(x)))  # packed convs: channels-last

    def decode(self, z: Tensor) -> Tensor:
        """Raw (unscaled) latents (B, latent_channels, h, w) to images (B, out_channels, h * factor, w * factor)."""
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"z has shape {tuple(z.shape)}; expected (batch, {c}, height, width)")
        z = z.to(self.dtype)
        parts = z.split(1) if self.use_slicing else (z,)
        images = torch.cat([self._decode(part) for part in parts])
        return images.contiguous(memory_format=memory_format_of(z))  # packed convs answer channels-last

    def _moments(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _image(self, z: Tensor) -> Tensor:
        z = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        return self.decoder(z)

    def _encode(self, x: Tensor) -> Tensor:
        factor = self.config.downsampling_factor
        if self.tile_size is None or max(x.shape[-2:]) <= self.tile_size:
            return self._moments(x)
        return _tiled(self._moments, x, self.tile_size // factor, self.tile_overlap // factor, scale_in=factor)

    def _decode(self, z: Tensor) -> Tensor:
        factor = self.config.downsampling_factor
        if self.tile_size is None or max(z.shape[-2:]) * factor <= self.tile_size:
            return self._image(z)
        return _tiled(self._image, z, self.tile_size // factor, self.tile_overlap // factor, scale_out=factor)

    # -- latent scaling -------------------------------------------------------------------------------------------

    def to_latent(self, z: Tensor) -> Tensor:
        """Raw latent to the diffusion model's (roughly unit-variance) latent: ``(z - shift) * scaling_factor``."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def from_latent(self, z: Tensor) -> Tensor:
        """Inverse of ``to_latent``: ``z / scaling_factor + shift``."""
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)


def _tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, *, scale_in: int = 1, scale_out: int = 1
) -> Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` and blend the results with linear ramps over the overlaps.

    ``tile`` and ``overlap`` count latent cells; a cell is ``scale_in`` input and ``scale_out`` output pixels.
    Each output pixel is the weighted mean of the tiles covering it (as MultiDiffusion averages windows, Bar-Tal et
    al. 2023), weighted by ramps that fall linearly to ~0 across the ``overlap`` at every tile edge with a
    neighbour, so no tile edge shows as a seam (diffusers' tiled VAE blends the same ramps by cropping instead).
    """
    cells_h, cells_w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    rows, cols = _tile_starts(cells_h, tile, overlap), _tile_starts(cells_w, tile, overlap)
    out = weight = None
    for i in rows:
        for j in cols:
            piece = fn(x[..., i * scale_in : (i + tile) * scale_in, j * scale_in : (j + tile) * scale_in]).float()
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], cells_h * scale_out, cells_w * scale_out)
                weight = piece.new_zeros(out.shape[-2:])
            h, w = piece.shape[-2:]
            wy = _ramp(h, overlap * scale_out, lead=i > rows[0], trail=i < rows[-1], device=piece.device)
            wx = _ramp(w, overlap * scale_out, lead=j > cols[0], trail=j < cols[-1], device=piece.device)
            region = (..., slice(i * scale_out, i * scale_out + h), slice(j * scale_out, j * scale_out + w))
            out[region] += piece * (wy[:, None] * wx)
            weight[region] += wy[:, None] * wx
    return (out / weight).to(x.dtype)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the fewest ``tile``-sized windows that cover ``length`` with at least ``overlap`` shared cells."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(k * (length - tile) / (count - 1)) for k in range(count)]


def _ramp(size: int, width: int, *, lead: bool, trail: bool, device: torch.device) -> Tensor:
    """Per-pixel blend weight along one tile axis: linear ramps of ``width`` at the edges that have neighbours."""
    w = torch.ones(size, device=device)
    up = (torch.arange(width, device=device) + 0.5) / width
    if lead and width:
        w[:width] = up
    if trail and width:
        w[size - width :] = up.flip(0)
    return w
