"""U-Net noise-prediction network (Ronneberger et al. 2015; Ho et al. 2020; Rombach et al. 2022).

Submodule names follow diffusers' ``UNet2DModel`` and ``UNet2DConditionModel``, so their state dicts load with the
identity key map (``io.load_diffusers``); ``UNetConfig.from_diffusers`` translates their ``config.json``.
Upsamplers run nearest 2x + 3x3 conv as one convolution on the low-resolution map (``layers.Upsample2D``; 4 instead
of 9 multiply-adds per output pixel, equal up to float rounding); ``layers.set_upsample_fusion(unet, False)``
restores the two steps. CPU inference runs through oneDNN on weights reordered once (``packing``);
``packing.prepare_for_inference(unet)`` sets the defaults for a model that only generates. ``activation_bytes`` and
``resident_bytes`` give the memory the serving VRAM planner budgets (``memory``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from unnoise.models import memory
from unnoise.models.config import ModelConfig
from unnoise.models.feature_cache import FeatureCache
from unnoise.models.layers import (
    Downsample2D,
    GroupNorm32,
    ResnetBlock2D,
    SpatialAttention,
    TimestepEmbedding,
    Transformer2D,
    Upsample2D,
    memory_format_of,
    set_attention_mode,
    timestep_embedding,
)
from unnoise.models.lora import LoRAHost
from unnoise.models.packing import Conv2d, unpack_in_place
from unnoise.models.unet_diffusers import unet_config_fields

# Block type name -> the attention after each residual block: None, "self" (SpatialAttention) or "cross"
# (Transformer2D with cross-attention to encoder_hidden_states).
DOWN_BLOCKS: dict[str, str | None] = {"DownBlock2D": None, "AttnDownBlock2D": "self", "CrossAttnDownBlock2D": "cross"}
UP_BLOCKS: dict[str, str | None] = {"UpBlock2D": None, "AttnUpBlock2D": "self", "CrossAttnUpBlock2D": "cross"}
MID_BLOCKS: dict[str, str] = {"UNetMidBlock2D": "self", "UNetMidBlock2DCrossAttn": "cross"}
TIME_CONDITIONING = ("default", "scale_shift")
# Embeddings added to the time embedding: "text_time" (SDXL): the pooled text embedding and the embedded time ids.
ADDITION_EMBEDDINGS = (None, "text_time")


def _error(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"UNetConfig.{field}={value!r}: {allowed}")


def _tuples(value: Any) -> Any:
    """Lists, also nested ones (per-layer depths), as tuples: what JSON and Python callers give becomes hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig(ModelConfig):
    """U-Net shape. Per-block fields take one int for all blocks or a tuple with one entry per down block.

    Attention shape per block: ``num_attention_heads`` and/or ``attention_head_dim``; the missing one is
    ``channels // given``; with neither, one head spans all channels. Transformer depth per block: one int for every
    layer of the block or a tuple with one per layer; the up blocks (lowest resolution first) mirror the down blocks'
    depths unless ``reverse_transformer_layers_per_block`` gives theirs, and the mid block takes the last down
    block's (its first layer's), as diffusers does. ``addition_embed_type="text_time"`` adds SDXL's conditioning on
    the pooled text embedding and the size/crop (and aesthetic score) time ids to the time embedding.
    """

    sample_size: tuple[int, int] | int | None = None
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: tuple[int, ...] | int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    mid_block_scale_factor: float = 1.0
    num_attention_heads: tuple[int, ...] | int | None = None
    attention_head_dim: tuple[int, ...] | int | None = None
    mid_attention_norm: bool = True  # False: no GroupNorm in the mid self-attention (diffusers, scale_shift)
    attn_norm_num_groups: int | None = None  # groups of that GroupNorm; None: norm_num_groups
    cross_attention_dim: int | None = None
    use_linear_projection: bool = False
    transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | int = 1  # per down block
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None  # per up block
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    resnet_time_scale_shift: str = "default"  # "default": added to features; "scale_shift": FiLM after norm2
    num_class_embeds: int | None = None
    addition_embed_type: str | None = None  # None or "text_time"
    addition_time_embed_dim: int | None = None  # sinusoidal width of each time id
    projection_class_embeddings_input_dim: int | None = None  # text embedding width + time ids * that width
    time_cond_proj_dim: int | None = None  # width of a guidance-scale embedding added to the time embedding (LCM)
    downsample_padding: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # lists (from Python callers and JSON) become tuples
            object.__setattr__(self, field.name, _tuples(getattr(self, field.name)))
        self._check_blocks()
        self._check_depths()
        self._check_channels()
        self._check_attention()
        self._check_addition()

    def _check_blocks(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise _error("block_out_channels", self.block_out_channels, "needs at least one block")
        for name, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            types = getattr(self, name)
            if len(types) != n:
                raise _error(name, types, f"needs {n} entries, one per block_out_channels entry")
            for t in types:
                if t not in table:
                    raise _error(name, types, f"{t!r} is not one of {sorted(table)}")
        if self.mid_block_type is not None and self.mid_block_type not in MID_BLOCKS:
            raise _error("mid_block_type", self.mid_block_type, f"allowed: {sorted(MID_BLOCKS)} or None")
        if any(not isinstance(v, int) or v < 1 for v in self.per_block("layers_per_block")):
            raise _error("layers_per_block", self.layers_per_block, f"needs positive ints, one or {n}")
        if self.resnet_time_scale_shift not in TIME_CONDITIONING:
            raise _error("resnet_time_scale_shift", self.resnet_time_scale_shift, f"allowed: {TIME_CONDITIONING}")
        if self.downsample_padding not in (0, 1):
            raise _error("downsample_padding", self.downsample_padding, "allowed: 0 (pad right/bottom) or 1")
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            raise _error("num_class_embeds", self.num_class_embeds, "must be None or >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise _error("dropout", self.dropout, "must be in [0, 1)")
        width = self.time_cond_proj_dim
        if width is not None and (type(width) is not int or width < 1):
            raise _error("time_cond_proj_dim", self.time_cond_proj_dim, "must be None or an int >= 1")

    def _check_depths(self) -> None:
        n, layers = len(self.block_out_channels), self.per_block("layers_per_block")
        down, reverse = self.per_block("transformer_layers_per_block"), self.reverse_transformer_layers_per_block
        if reverse is not None and (not isinstance(reverse, tuple) or len(reverse) != n):
            raise _error(
                "reverse_transformer_layers_per_block", reverse, f"needs None or {n} entries, one per up block"
            )
        up_layers = [layers[n - 1 - i] + 1 for i in range(n)]
        for name, values, counts in (
            ("transformer_layers_per_block", down, layers),
            ("reverse_transformer_layers_per_block", reverse or (), up_layers),
        ):
            for value, count in zip(values, counts):
                depths = value if isinstance(value, tuple) else (value,) * count
                if len(depths) != count or any(type(d) is not int or d < 0 for d in depths):
                    raise _error(
                        name,
                        getattr(self, name),
                        f"needs per block a depth >= 0 or a tuple of one per layer (layers: {tuple(counts)})",
                    )
        if reverse is None and any(isinstance(v, tuple) for v in down):
            raise _error(
                "reverse_transformer_layers_per_block",
                None,
                "needed: transformer_layers_per_block gives per-layer depths and up blocks have one layer more",
            )

    def _check_channels(self) -> None:
        for name in ("in_channels", "out_channels", "norm_num_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise _error(name, getattr(self, name), "must be >= 1")
        for ch in self.block_out_channels:
            if ch < 1 or ch % self.norm_num_groups:
                raise _error(
                    "block_out_channels",
                    self.block_out_channels,
                    f"each must be a positive multiple of norm_num_groups={self.norm_num_groups}",
                )
        if self.time_embedding_dim is not None and self.time_embedding_dim < 1:
            raise _error("time_embedding_dim", self.time_embedding_dim, "must be None or >= 1")
        groups = self.attn_norm_num_groups
        if groups is not None and (groups < 1 or self.block_out_channels[-1] % groups):
            raise _error("attn_norm_num_groups", groups, f"must divide {self.block_out_channels[-1]}")

    def _check_attention(self) -> None:
        n = len(self.block_out_channels)
        for name in ("num_attention_heads", "attention_head_dim"):
            value = getattr(self, name)
            if value is not None and any(not isinstance(v, int) or v < 1 for v in self.per_block(name)):
                raise _error(name, value, f"needs None or positive ints, one or {n}")
        for level in self.attention_levels():
            heads, dim = self.attention_shape(level)
            if heads < 1 or dim < 1:
                raise _error(
                    "num_attention_heads/attention_head_dim",
                    (self.num_attention_heads, self.attention_head_dim),
                    f"give {heads} heads of dim {dim} for {self.block_out_channels[level]} channels; both must be >= 1",
                )
        if self.uses_cross_attention and self.cross_attention_dim is None:
            raise _error("cross_attention_dim", None, "cross-attention blocks need the context width")
        if not self.uses_cross_attention and self.cross_attention_dim is not None:
            raise _error("cross_attention_dim", self.cross_attention_dim, "must be None: no block cross-attends")

    def _check_addition(self) -> None:
        kind = self.addition_embed_type
        if kind not in ADDITION_EMBEDDINGS:
            raise _error("addition_embed_type", kind, f"allowed: {ADDITION_EMBEDDINGS}")
        for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            value = getattr(self, name)
            if kind is None and value is not None:
                raise _error(name, value, "must be None without an addition_embed_type")
            if kind is not None and (type(value) is not int or value < 1):
                raise _error(name, value, f"addition_embed_type={kind!r} needs it, an int >= 1")

    def per_block(self, name: str) -> tuple[Any, ...]:
        """A per-block field as a tuple with one entry per down block (level)."""
        value = getattr(self, name)
        n = len(self.block_out_channels)
        values = (value,) * n if isinstance(value, int) else tuple(value)
        if len(values) != n:
            raise _error(name, value, f"needs one int or {n} entries, one per block")
        return values

    def attention_shape(self, level: int) -> tuple[int, int]:
        """(heads, head_dim) of the attention at ``level`` (the mid block uses the last level)."""
        ch = self.block_out_channels[level]
        heads = self.per_block("num_attention_heads")[level] if self.num_attention_heads is not None else None
        dim = self.per_block("attention_head_dim")[level] if self.attention_head_dim is not None else None
        if heads is None and dim is None:
            return 1, ch
        return (heads or ch // dim, dim or ch // heads)

    def transformer_depths(self, part: Literal["down", "mid", "up"], index: int = 0) -> tuple[int, ...]:
        """Depth of the transformer after each layer of down block ``index`` ("down"), up block ``index`` ("up",
        lowest resolution first) or the mid block ("mid": one entry, the last down block's first layer's)."""
        n, layers = len(self.block_out_channels), self.per_block("layers_per_block")
        if part == "up" and self.reverse_transformer_layers_per_block is not None:
            value, count = self.reverse_transformer_layers_per_block[index], layers[n - 1 - index] + 1
        else:
            level = {"down": index, "mid": n - 1, "up": n - 1 - index}[part]
            value = self.per_block("transformer_layers_per_block")[level]
            count = {"down": layers[level], "mid": 1, "up": layers[level] + 1}[part]
        depths = value if isinstance(value, tuple) else (value,) * count
        return depths[:count]

    def block_kinds(self) -> tuple[tuple[str | None, ...], str | None, tuple[str | None, ...]]:
        """The attention in each down block, the mid block and each up block: None, "self" or "cross"."""
        mid = MID_BLOCKS[self.mid_block_type] if self.mid_block_type is not None else None
        down = tuple(DOWN_BLOCKS[t] for t in self.down_block_types)
        return down, mid, tuple(UP_BLOCKS[t] for t in self.up_block_types)

    def attention_levels(self) -> list[int]:
        n = len(self.block_out_channels)
        down, mid, up = self.block_kinds()
        levels = {i for i, kind in enumerate(down) if kind} | {n - 1 - i for i, kind in enumerate(up) if kind}
        return sorted(levels | ({n - 1} if mid else set()))

    @property
    def uses_cross_attention(self) -> bool:
        down, mid, up = self.block_kinds()
        return "cross" in (*down, mid, *up)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> UNetConfig:
        """Translate a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` config.json; unsupported options raise."""
        return cls.from_dict(unet_config_fields(cfg))


def _check_conditioning(name: str, value: Tensor | None, expected: tuple | None, why_none: str) -> None:
    """``value`` must be None where ``expected`` is None, else have the shape ``expected`` (str entries: any size)."""
    shape = None if value is None else tuple(value.shape)
    if expected is None:
        if shape is not None:
            raise ValueError(f"{name} has shape {shape}; expected None: {why_none}")
        return
    if shape is None or len(shape) != len(expected) or any(e != s for e, s in zip(expected, shape) if type(e) is int):
        raise ValueError(
            f"{name} has shape {shape}; expected ({', '.join(map(str, expected))}{',' * (len(expected) == 1)})"
        )


def _added_conditions(
    text_embeds: Tensor | None, time_ids: Tensor | None, added_cond_kwargs: dict[str, Tensor] | None
) -> tuple[Tensor | None, Tensor | None]:
    """(text_embeds, time_ids) from the keyword arguments or diffusers' ``added_cond_kwargs`` dict, not both."""
    if added_cond_kwargs is None:
        return text_embeds, time_ids
    unknown = sorted(set(added_cond_kwargs) - {"text_embeds", "time_ids"})
    if unknown:
        raise ValueError(f"added_cond_kwargs has keys {unknown}; allowed: 'text_embeds', 'time_ids'")
    if text_embeds is not None or time_ids is not None:
        raise ValueError("give text_embeds and time_ids either as keyword arguments or in added_cond_kwargs, not both")
    return added_cond_kwargs.get("text_embeds"), added_cond_kwargs.get("time_ids")


def guidance_scale_embedding(w: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding (B, dim) of guidance weights ``w`` (B,) scaled by 1000, sines first: the ``timestep_cond``
    of a U-Net with ``time_cond_proj_dim`` (Meng et al. 2023; the LCM pipelines pass ``w = guidance_scale - 1``).

    Written in the operation order of diffusers' ``get_guidance_scale_embedding``: the phases reach ``1000 w``, so a
    frequency one float32 ulp off would move them by about 1e-3."""
    if w.ndim != 1:
        raise ValueError(f"w has shape {tuple(w.shape)}; expected one guidance weight per sample, shape (batch,)")
    w = w * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=dtype) * -step)
    phases = w.to(dtype)[:, None] * frequencies[None, :].to(w.device)
    emb = torch.cat([phases.sin(), phases.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _Layers(nn.Module):
    """Residual blocks, each optionally followed by attention: the body of the down and up blocks."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None

    def layer(self, i: int, x: Tensor, temb: Tensor, context: Tensor | None) -> Tensor:
        x = self.resnets[i](x, temb)
        return self.attentions[i](x, context) if self.attentions is not None else x


class DownBlock(_Layers):
    """Residual (+ attention) layers, then optional 2x downsampling; every layer's output is a skip."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None, downsampler: nn.Module | None):
        super().__init__(resnets, attentions)
        self.downsamplers = nn.ModuleList([downsampler]) if downsampler is not None else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(_Layers):
    """Residual (+ attention) layers on [x, skip] concatenations, last skip first, then optional 2x upsampling."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None, upsampler: nn.Module | None):
        super().__init__(resnets, attentions)
        self.upsamplers = nn.ModuleList([upsampler]) if upsampler is not None else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor | None = None) -> Tensor:
        for i in range(len(self.resnets)):
            x = self.layer(i, torch.cat([x, skips[-1 - i]], dim=1), temb, context)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, resnets: list[nn.Module], attention: nn.Module):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNet(LoRAHost, nn.Module):
    """Noise-prediction U-Net ``eps(x, t, context, class)``: down path, mid block, up path with skip concatenation.

    LoRA adapters load onto it with ``load_lora`` (``unnoise.models.lora.LoRAHost``)."""

    # Upsampling on the CPU under ``packing.prepare_for_inference``: unfused. With the weights packed in place, the
    # fused upsamplers keep their packed phase kernels (16/9 of the upsamplers' conv weights) for no gain here:
    # SD-1.5's shape at reduced width, CFG batch 2 at 32x32, measured 0.91x diffusers' latency and 1.06x its memory
    # fused against 0.87x and 1.00x unfused (docs/benchmarks/models.md).
    cpu_upsample_fusion = False

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.feature_cache: FeatureCache | None = None  # set by ``caching``
        ch = config.block_out_channels
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim)
        if config.time_cond_proj_dim is not None:  # diffusers' TimestepEmbedding.cond_proj: w embedding -> time input
            self.time_embedding.cond_proj = nn.Linear(config.time_cond_proj_dim, ch[0], bias=False)
        n_class = config.num_class_embeds
        self.class_embedding = nn.Embedding(n_class, config.time_embed_dim) if n_class else None
        added = config.projection_class_embeddings_input_dim  # SDXL: [text_embeds, embedded time_ids] -> time
        self.add_embedding = TimestepEmbedding(added, config.time_embed_dim) if config.addition_embed_type else None
        skip_channels = [ch[0]]  # channel count of every skip, pushed by the down path, popped by the up path
        self.down_blocks = nn.ModuleList(self._down_block(level, skip_channels) for level in range(len(ch)))
        self.mid_block = self._mid_block() if config.mid_block_type else None
        self.up_blocks = nn.ModuleList(self._up_block(i, skip_channels) for i in range(len(ch)))
        self.conv_norm_out = GroupNorm32(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = Conv2d(ch[0], config.out_channels, 3, padding=1)

    def _resnet(self, in_ch: int, out_ch: int, scale: float = 1.0) -> ResnetBlock2D:
        c = self.config
        return ResnetBlock2D(
            in_ch,
            out_ch,
            temb_channels=c.time_embed_dim,
            groups=c.norm_num_groups,
            eps=c.norm_eps,
            dropout=c.dropout,
            time_embedding_norm=c.resnet_time_scale_shift,  # type: ignore[arg-type]
            output_scale_factor=scale,
        )

    def _attention(
        self, kind: str, level: int, *, depth: int = 1, scale: float = 1.0, groups: int | None = None
    ) -> nn.Module:
        c = self.config
        ch = c.block_out_channels[level]
        heads, dim = c.attention_shape(level)
        if kind == "cross":
            return Transformer2D(
                ch,
                heads,
                dim,
                depth=depth,
                context_dim=c.cross_attention_dim,
                groups=c.norm_num_groups,
                use_linear_projection=c.use_linear_projection,
            )
        return SpatialAttention(
            ch,
            heads=heads,
            dim_head=dim,
            groups=groups or c.norm_num_groups,
            eps=c.norm_eps,
            rescale_output_factor=scale,
        )

    def _down_block(self, level: int, skip_channels: list[int]) -> DownBlock:
        c = self.config
        ch, kind = c.block_out_channels, DOWN_BLOCKS[c.down_block_types[level]]
        layers, last = c.per_block("layers_per_block")[level], level == len(ch) - 1
        resnets = [self._resnet(ch[max(level - 1, 0)] if i == 0 else ch[level], ch[level]) for i in range(layers)]
        depths = c.transformer_depths("down", level)
        attentions = [self._attention(kind, level, depth=depth) for depth in depths] if kind else None
        downsampler = None if last else Downsample2D(ch[level], padding=c.downsample_padding)
        skip_channels += [ch[level]] * (layers if last else layers + 1)
        return DownBlock(resnets, attentions, downsampler)

    def _mid_block(self) -> MidBlock:
        c = self.config
        ch, kind, scale = c.block_out_channels[-1], MID_BLOCKS[c.mid_block_type], c.mid_block_scale_factor
        level, (depth,) = len(c.block_out_channels) - 1, c.transformer_depths("mid")
        attention = self._attention(kind, level, depth=depth, scale=scale, groups=c.attn_norm_num_groups)
        if kind == "self" and not c.mid_attention_norm:
            attention.group_norm = nn.Identity()  # diffusers' UNet2DModel with scale_shift: attention without norm
        return MidBlock([self._resnet(ch, ch, scale), self._resnet(ch, ch, scale)], attention)

    def _up_block(self, index: int, skip_channels: list[int]) -> UpBlock:
        c = self.config
        ch, kind = c.block_out_channels, UP_BLOCKS[c.up_block_types[index]]
        level = len(ch) - 1 - index  # up block i mirrors down block n-1-i
        layers = c.per_block("layers_per_block")[level] + 1
        in_ch, resnets = ch[min(level + 1, len(ch) - 1)], []
        for _ in range(layers):
            resnets.append(self._resnet(in_ch + skip_channels.pop(), ch[level]))
            in_ch = ch[level]
        depths = c.transformer_depths("up", index)
        attentions = [self._attention(kind, level, depth=depth) for depth in depths] if kind else None
        return UpBlock(resnets, attentions, Upsample2D(ch[level]) if level > 0 else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        encoder_hidden_states: Tensor | None = None,
        class_labels: Tensor | None = None,
        *,
        text_embeds: Tensor | None = None,
        time_ids: Tensor | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        timestep_cond: Tensor | None = None,
    ) -> Tensor:
        """Output for noisy ``x`` at timesteps ``t`` (scalar or (B,)), computed in the weights' dtype, in x's dtype.

        ``text_embeds`` (B, width) and ``time_ids`` (B, ids): SDXL's pooled text embedding and its size and crop
        conditioning (original h, w, crop top, left, target h, w; the refiner: original h, w, crop top, left,
        aesthetic score), for ``addition_embed_type="text_time"``; ``added_cond_kwargs``: the same as diffusers'
        dict. ``timestep_cond`` (B, time_cond_proj_dim): a guidance-scale embedding (``guidance_scale_embedding``)
        for a U-Net with ``time_cond_proj_dim``; without it such a U-Net runs as if the projection were zero."""
        text_embeds, time_ids = _added_conditions(text_embeds, time_ids, added_cond_kwargs)
        self._check_inputs(x, encoder_hidden_states, class_labels)
        self._check_added(x.shape[0], text_embeds, time_ids)
        dim = self.config.time_cond_proj_dim
        why = "this model has no guidance embedding (time_cond_proj_dim=None)"
        if timestep_cond is not None or dim is None:  # optional where the model has the projection
            _check_conditioning("timestep_cond", timestep_cond, (x.shape[0], dim) if dim else None, why)
        temb = self._embed(t, x, class_labels, timestep_cond)
        if self.add_embedding is not None:
            temb = temb + self._added_embedding(text_embeds, time_ids)
        context = encoder_hidden_states.to(self.dtype) if encoder_hidden_states is not None else None
        h = self.conv_in(x.to(self.dtype))
        skips = [h]
        cache = self.feature_cache
        reused = cache is not None and cache.reuse(t, x)
        if reused:  # only the outer levels run; the inner ones' output is cached
            last = self.down_blocks[cache.depth - 1]
            for block in self.down_blocks[: cache.depth - 1]:
                h, block_skips = self._run(block, h, temb, context)
                skips += block_skips
            for i in range(len(last.resnets)):  # without its downsampler: that feeds the cached levels only
                h = last.layer(i, h, temb, context)
                skips.append(h)
            h, up_blocks = cache.features, self.up_blocks[-cache.depth :]
        else:
            for block in self.down_blocks:
                h, block_skips = self._run(block, h, temb, context)
                skips += block_skips
            if self.mid_block is not None:
                h = self._run(self.mid_block, h, temb, context)
            up_blocks = self.up_blocks
        for i, block in enumerate(up_blocks):
            if cache is not None and not reused and len(up_blocks) - i == cache.depth:
                cache.store(h)  # the input of the outer up blocks
            n = len(block.resnets)
            h = self._run(block, h, skips[-n:], temb, context)
            del skips[-n:]
        out = self.conv_out(F.silu(self.conv_norm_out(h), inplace=not torch.is_grad_enabled()))
        return out.to(x.dtype).contiguous(memory_format=memory_format_of(x))  # packed convs answer channels-last

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _embed(
        self, t: Tensor | float, x: Tensor, class_labels: Tensor | None, timestep_cond: Tensor | None = None
    ) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        batch = x.shape[0]
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or shape ({batch},)")
        c = self.config
        emb = timestep_embedding(
            t.reshape(-1).expand(batch),
            c.block_out_channels[0],
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
        )
        emb = emb.to(self.dtype)
        if timestep_cond is not None:  # added before the time MLP, as diffusers' TimestepEmbedding(condition)
            emb = emb + self.time_embedding.cond_proj(timestep_cond.to(self.dtype))
        temb = self.time_embedding(emb)
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)
        return temb

    def _added_embedding(self, text_embeds: Tensor, time_ids: Tensor) -> Tensor:
        """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): each time id embedded like a timestep, after the
        pooled text embedding, through ``add_embedding``."""
        c = self.config
        ids = timestep_embedding(
            time_ids.reshape(-1), c.addition_time_embed_dim, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        ).reshape(time_ids.shape[0], -1)
        return self.add_embedding(torch.cat([text_embeds.to(self.dtype), ids.to(self.dtype)], dim=-1))

    def _check_added(self, batch: int, text_embeds: Tensor | None, time_ids: Tensor | None) -> None:
        c = self.config
        if c.addition_embed_type is None:
            why = "this model has no added text/time embedding (addition_embed_type=None)"
            _check_conditioning("text_embeds", text_embeds, None, why)
            _check_conditioning("time_ids", time_ids, None, why)
            return
        _check_conditioning("text_embeds", text_embeds, (batch, "width"), "")
        width, per_id = c.projection_class_embeddings_input_dim, c.addition_time_embed_dim
        ids, rest = divmod(width - text_embeds.shape[1], per_id)
        if ids < 1 or rest:
            raise ValueError(
                f"text_embeds has shape {tuple(text_embeds.shape)}; its width plus {per_id} "
                f"(addition_time_embed_dim) per time id must make projection_class_embeddings_input_dim={width}"
            )
        _check_conditioning("time_ids", time_ids, (batch, ids), "")

    def _check_inputs(self, x: Tensor, context: Tensor | None, class_labels: Tensor | None) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, {c.in_channels}, height, width)")
        factor = 2 ** (len(c.block_out_channels) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x has spatial size {tuple(x.shape[2:])}; height and width must be multiples of "
                f"{factor} (2 ** number of downsamplings)"
            )
        batch, cross, n_class = x.shape[0], c.uses_cross_attention, c.num_class_embeds
        context_shape = (batch, "tokens", c.cross_attention_dim) if cross else None
        _check_conditioning("encoder_hidden_states", context, context_shape, "this model has no cross-attention")
        labels_shape = (batch,) if n_class else None
        _check_conditioning("class_labels", class_labels, labels_shape, "this model has no class embedding")
        if class_labels is not None and class_labels.is_floating_point():
            raise ValueError(f"class_labels has dtype {class_labels.dtype}; expected integer labels in [0, {n_class})")

    @contextlib.contextmanager
    def caching(
        self, interval: int, *, t_range: tuple[float, float] | None = None, depth: int = 1
    ) -> Iterator[FeatureCache]:
        """Reuse the inner levels' features between calls while the context is open (``feature_cache``): every
        ``interval``-th call is full, and the others run the outer ``depth`` levels only; calls with timesteps
        outside ``t_range`` are full. Yields the cache (it counts full and reused calls)."""
        cache = FeatureCache(interval, t_range=t_range, depth=depth)
        self._check_cache_depth(depth)
        if self.feature_cache is not None:
            raise RuntimeError("this U-Net already has a feature cache open; close it before opening another")
        self.feature_cache = cache
        try:
            yield cache
        finally:
            self.feature_cache = None

    def _check_cache_depth(self, depth: int) -> None:
        # The outer ``depth`` down levels (without the last one's downsampler) push exactly the skips the last
        # ``depth`` up blocks pop: the up path mirrors the down path (``_up_block``), so any depth up to the
        # number of levels can be cached.
        levels = len(self.down_blocks)
        if depth > levels:
            raise ValueError(f"cache depth={depth} is not allowed; this U-Net has {levels} levels")

    def set_attention_mode(self, mode: str = "sdpa", chunk_size: int = 1024) -> UNet:
        """Fused SDPA or query-chunked attention (bounded peak memory) in every attention layer; returns self."""
        set_attention_mode(self, mode, chunk_size)
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> UNet:
        """Recompute each block's activations in the backward pass instead of storing them; returns self."""
        self.gradient_checkpointing = enabled
        return self

    def compile(self, *args: Any, **kwargs: Any) -> UNet:
        """Compile ``forward`` in place with ``torch.compile`` (arguments go to it); returns self. Weights packed in
        place (``packing.set_weight_packing(..., in_place=True)``) are unpacked first: compiled code fuses its
        convolutions itself and never runs the packed path."""
        unpack_in_place(self)
        super().compile(*args, **kwargs)
        return self

    def activation_bytes(self, batch: int, height: int, width: int, context_tokens: int) -> int:
        """Peak bytes a forward on ``batch`` latents of ``height`` x ``width`` with ``context_tokens`` tokens of
        conditioning allocates beyond the weights, as the network is set and placed now (``memory``)."""
        return memory.unet_activation_bytes(self, batch, height, width, context_tokens)

    def resident_bytes(self) -> int:
        """Bytes held between inference calls: weights, buffers and the kernels kept from them (``memory``)."""
        return memory.resident_bytes(self)
