"""Building blocks shared by the U-Net and the autoencoder.

Submodule names follow the diffusers layout (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ``to_out.0``,
``proj_in``, ``transformer_blocks``, ...), so Stable Diffusion weights load with an almost empty key map. The
convolutions and linear layers are ``packing``'s drop-ins for ``nn.Conv2d`` / ``nn.Linear``, which run CPU inference
through oneDNN on weights reordered once; the blocks here need not know how.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.models.lora import has_lora
from unnoise.models.packing import (
    Conv2d,
    Linear,
    PackedHolder,
    TokenConv2d,
    maybe_packed_conv2d,
    packed_conv2d,
)

ATTENTION_MODES = ("sdpa", "chunked", "auto")
# "auto": plain matrix products up to this many query x key pairs, fused SDPA above. On CPU the plain path's backward
# is several times faster for short sequences (8 x 8 latents) and 2x slower at 256 tokens
# (docs/benchmarks/training.md measures both in the same run).
AUTO_CHUNKED_MAX_PAIRS = 64 * 64


# Backends whose half-precision GroupNorm and nearest-upsampling kernels exist and accumulate in float32.
NATIVE_HALF_DEVICES = ("cpu", "cuda")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are float32 whatever the weights' dtype: fp16/bf16 sums over large maps overflow.

    PyTorch's CPU and CUDA kernels already accumulate fp16/bf16 in float32 (same results as upcasting, to one
    rounding of the output), so there the native kernel runs without float32 copies of the map; other backends
    get an explicit float32 pass.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and x.device.type not in NATIVE_HALF_DEVICES:
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        return super().forward(x)


def timestep_embedding(
    t: Tensor, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: float = 1.0, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps, Vaswani et al. 2017 / Ho et al. 2020, in float32."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (one per sample), got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * exponent.exp()[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: ``linear_2(silu(linear_1(emb)))``."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block with additive or scale-shift time conditioning (Dhariwal & Nichol 2021)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        time_embedding_norm: Literal["default", "scale_shift"] = "default",
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            proj_out = out_channels * 2 if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = Linear(temb_channels, proj_out)
        else:
            self.time_emb_proj = None
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        # Without autograd the block's own temporaries are updated in place: the same arithmetic with fewer fresh
        # feature maps, each of which costs the CPU an allocation and page faults at high resolution.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        scale_shift = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]
            if self.time_embedding_norm == "scale_shift":
                scale_shift = t.chunk(2, dim=1)
            else:
                h = _add(h, t, inplace)
        h = self.norm2(h)
        if scale_shift is not None:
            h = h * (1 + scale_shift[0]) + scale_shift[1]
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = _add(h, shortcut, inplace)
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _add(h: Tensor, other: Tensor, inplace: bool) -> Tensor:
    """``h + other``, into ``h`` when allowed and the result keeps ``h``'s dtype and shape anyway."""
    if inplace and other.dtype == h.dtype and _broadcasts_into(other.shape, h.shape):
        return h.add_(other)
    return h + other


def _broadcasts_into(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (``torch.broadcast_shapes(target, shape) == target``,
    without its symbolic-shape machinery, which costs more than the addition on small feature maps)."""
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


class Downsample2D(nn.Module):
    """Halve the resolution with a strided 3x3 conv (``padding=0`` pads right/bottom only, as the KL autoencoder)."""

    def __init__(self, channels: int, *, use_conv: bool = True, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.conv, nn.Conv2d) and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


# Devices where the fused upsampler runs as four 2x2 phase convolutions plus an interleaving copy: faster than the
# transposed convolution on the CPU (oneDNN), slower on CUDA where the copy dominates (docs/benchmarks/gpu.md).
PHASE_CONV_DEVICES = ("cpu",)


class Upsample2D(PackedHolder):
    """Double the resolution: nearest-neighbour interpolation, then a 3x3 conv.

    With ``fused`` (the default) the two run as one convolution on the low-resolution map. Every output pixel
    (2i+a, 2j+b) of conv3x3(nearest2x(x)) sees a 2x2 window of ``x`` whose taps are sums of the 3x3 kernel's taps:
    4 multiply-adds per output pixel instead of 9 and no 4x-larger upsampled map, equal to the two-step path up to
    float rounding (the taps are summed before the multiplication). On CUDA (and other non-CPU devices) that is a
    stride-2 transposed convolution with a 4x4 kernel, which writes the interleaved output itself; on the CPU one
    2x2 convolution with the four phases as output channels, then a copy that interleaves them (faster there).
    Without gradients the fused kernel is kept between calls (16/9 of the conv weight; ``fused_weight_bytes``) and
    rebuilt when the weight changes. With the conv packed in place (``packing.Conv2d.pack_in_place``) on the CPU only
    the kernel reordered for oneDNN is kept, built straight from the conv weight.
    """

    def __init__(self, channels: int, *, use_conv: bool = True, fused: bool = True):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1) if use_conv else None
        self.fused = fused
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None and self.fused and not has_lora(self.conv):  # a LoRA hooks the conv's own forward
            self.conv.unpack_in_place()  # it may have run unfused with ``pack_in_place`` before
            if x.device.type in PHASE_CONV_DEVICES:
                return self._phase_forward(x)
            kernel = self._fused_weight("transposed").to(x.dtype)
            return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)
        dtype = x.dtype
        if dtype == torch.bfloat16 and x.device.type not in NATIVE_HALF_DEVICES:  # no bf16 kernel on some backends
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype)
        return self.conv(x) if self.conv is not None else x

    def fused_weight_bytes(self) -> int:
        """Bytes of the plain fused kernel kept between calls without gradients (0 when not fused, or where only
        its packed copy is kept: ``packing.packed_weight_bytes`` counts that one)."""
        if self.conv is None or not self.fused or self._keeps_packed_phase_only():
            return 0
        return self.phase_kernel_bytes()

    def phase_kernel_bytes(self) -> int:
        """Bytes of the fused kernel: 16 taps per (output, input) channel pair."""
        w = self.conv.weight
        return 16 * w.shape[0] * w.shape[1] * w.element_size()

    def planned_packed_bytes(self) -> int:
        """Bytes of reordered weights kept after CPU inference (``packing.packed_weight_bytes``): the conv's when
        unfused, the packed phase kernel when fused (the transposed convolution off the CPU keeps none)."""
        if self.conv is None:
            return 0
        if not self.fused:
            return self.conv.planned_packed_bytes()
        if self.conv.weight.device.type not in PHASE_CONV_DEVICES:
            return 0
        return self.conv.planned_packed_bytes(derived_bytes=self.phase_kernel_bytes())

    def _keeps_packed_phase_only(self) -> bool:
        return self.conv.weight.device.type in PHASE_CONV_DEVICES and self.conv.packs_derived_in_place()

    def _fused_weight(self, kind: str) -> Tensor:
        w = self.conv.weight
        build = upsample_conv_weight if kind == "transposed" else upsample_phase_weight
        if (torch.is_grad_enabled() and w.requires_grad) or w.is_inference():  # inference tensors have no version
            self._cache = None
            return build(w)
        key = (kind, w.data_ptr(), w._version, w.dtype, w.device)
        if self._cache is None or self._cache[0] != key or self._cache[1] is not w:
            with torch.no_grad():  # the entry holds w: its storage cannot be reused by another tensor under this key
                self._cache = (key, w, build(w))
        return self._cache[2]

    def _phase_forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        conv = self.conv
        bias = conv.bias.repeat(4) if conv.bias is not None else None
        if conv.runs_derived_packed(x):
            self._cache = None  # only the packed kernel is kept, derived from the conv weight
            y = packed_conv2d(self, x, conv.weight, bias, (1, 1), (1, 1), derive=upsample_phase_weight)
        else:
            kernel = self._fused_weight("phase").to(x.dtype)
            y = maybe_packed_conv2d(self, x, kernel, bias, (1, 1), (1, 1), packed=conv.packed)
        layout = memory_format_of(y)  # the convolution's choice from x's strides (a 1x1 x is contiguous in both)
        y = y.unflatten(1, (2, 2, conv.out_channels))  # (B, a, b, C, h + 1, w + 1)
        out = torch.empty(b, conv.out_channels, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=layout)
        for a in (0, 1):  # phase (a, c) holds output pixel (2i + a, 2j + c) at (i + a, j + c)
            for c in (0, 1):
                out[:, :, a::2, c::2] = y[:, a, c, :, a : a + h, c : c + w]
        return out


def _check_3x3(weight: Tensor, name: str) -> None:
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"{name} needs a 3x3 kernel, got shape {tuple(weight.shape)}")


def upsample_conv_weight(weight: Tensor) -> Tensor:
    """Kernel (I, O, 4, 4) of the stride-2, padding-1 transposed convolution equal to conv3x3(nearest2x(x)).

    Along each axis, output phase 0 takes input offsets (-1, 0) with the 3x3 taps (k0, k1 + k2) and phase 1 takes
    offsets (0, +1) with (k0 + k1, k2); in the transposed convolution's kernel order that is
    (k2, k1 + k2, k0 + k1, k0) for ``weight`` (O, I, 3, 3)."""
    _check_3x3(weight, "upsample_conv_weight")

    def taps(w: Tensor, dim: int) -> Tensor:
        k0, k1, k2 = w.unbind(dim)
        return torch.stack([k2, k1 + k2, k0 + k1, k0], dim)

    kernel = taps(taps(weight, 2), 3).transpose(0, 1)  # transposed convolutions take (in, out)
    return kernel.contiguous(memory_format=memory_format_of(weight))  # the conv weight's layout: no reorder per call


def upsample_phase_weight(weight: Tensor) -> Tensor:
    """Weights (4 * O, I, 2, 2) of the four output phases (a, b), row-major, as a 2x2 convolution on ``x`` padded by
    one: phase (a, b) of output pixel (2i + a, 2j + b) sits at (i + a, j + b), with the same per-axis taps as
    ``upsample_conv_weight``: (k0, k1 + k2) for phase 0 and (k0 + k1, k2) for phase 1."""
    _check_3x3(weight, "upsample_phase_weight")

    def split(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        k0, k1, k2 = w.unbind(dim)
        return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)

    phases = torch.cat([col for row in split(weight, 2) for col in split(row, 3)], dim=0)
    return phases.contiguous(memory_format=memory_format_of(weight))


def attention(q: Tensor, k: Tensor, v: Tensor, mode: str = "sdpa", chunk_size: int = 1024) -> Tensor:
    """Softmax attention over (B, heads, tokens, dim): fused SDPA, query chunks of plain matrix products (bounded
    peak memory), or "auto" (plain products for short sequences, SDPA otherwise)."""
    if mode == "auto":
        mode = "chunked" if q.shape[-2] * k.shape[-2] <= AUTO_CHUNKED_MAX_PAIRS else "sdpa"
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if mode != "chunked":
        raise ValueError(f"attention mode={mode!r} is not supported; allowed values: {', '.join(ATTENTION_MODES)}")
    scale = q.shape[-1] ** -0.5
    if q.shape[2] <= chunk_size:  # one chunk: no output buffer to fill
        return (q @ k.transpose(-1, -2) * scale).float().softmax(dim=-1).to(q.dtype) @ v
    out = torch.empty_like(q)
    for start in range(0, q.shape[2], chunk_size):
        qc = q[:, :, start : start + chunk_size]
        weights = (qc @ k.transpose(-1, -2) * scale).float().softmax(dim=-1).to(q.dtype)
        out[:, :, start : start + chunk_size] = weights @ v
    return out


class Attention(nn.Module):
    """Multi-head attention on token sequences (B, N, C); cross-attention when ``context`` is given."""

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.mode = "sdpa"
        self.chunk_size = 1024
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = attention(q, k, v, self.mode, self.chunk_size).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])
        return self.to_out[1](self.to_out[0](out))


class SpatialAttention(Attention):
    """Self-attention over the pixels of a feature map with its own GroupNorm and a residual connection."""

    def __init__(
        self,
        channels: int,
        *,
        heads: int = 1,
        dim_head: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__(channels, heads=heads, dim_head=dim_head or channels // heads, bias=True)
        self.group_norm = GroupNorm32(groups, channels, eps=eps)
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        out = _add(super().forward(tokens).transpose(1, 2).reshape(b, c, h, w), x, not torch.is_grad_enabled())
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor


class GEGLU(nn.Module):
    """Gated GELU, Shazeer 2020: ``a * gelu(b)`` with ``[a, b] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled() and (x.requires_grad or self.proj.weight.requires_grad):
            return a * F.gelu(gate)
        return F.gelu(gate).mul_(a)  # without autograd, reuse the gelu buffer: one (tokens x 4 dim) tensor less


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input layer (``net.0``) and a linear output (``net.2``).

    On the CPU without autograd it runs over chunks of at most ``chunk_rows`` tokens (all batch items together), so
    the GEGLU's 12x-wide temporaries never exist for a whole long sequence: at 1024 tokens they set the U-Net's peak
    memory otherwise, and the chunks' matrix products run as fast or faster from cache (1.0x at 2 x 1024 tokens of
    96 channels, 0.7-0.8x at 2 x 4096 of 320 on 2 cores). Each token's output is the same arithmetic. On a GPU the
    whole sequence runs at once (smaller products would cost throughput); ``chunk_rows = None`` does that
    everywhere."""

    chunk_rows: int | None = 1024
    CHUNK_DEVICES = ("cpu",)

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        rows = self.chunk_rows
        if (
            rows is None
            or torch.is_grad_enabled()
            or x.device.type not in self.CHUNK_DEVICES
            or x[..., 0].numel() <= rows
        ):
            return self._mlp(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty(flat.shape[0], self.net[2].out_features, dtype=x.dtype, device=x.device)
        for start in range(0, flat.shape[0], rows):
            out[start : start + rows] = self._mlp(flat[start : start + rows])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _mlp(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context, GEGLU MLP (Rombach et al. 2022)."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        inplace = not torch.is_grad_enabled()  # each sublayer's output is a fresh tensor: add the residual into it
        x = _add(self.attn1(self.norm1(x)), x, inplace)
        x = _add(self.attn2(self.norm2(x), context), x, inplace)
        return _add(self.ff(self.norm3(x)), x, inplace)


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, 1x1-conv or linear projection in, transformer blocks, out, residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        *,
        depth: int = 1,
        context_dim: int | None = None,
        groups: int = 32,
        use_linear_projection: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        proj = Linear if use_linear_projection else TokenConv2d  # diffusers' 1x1 conv: a matrix product on tokens
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim=context_dim, dropout=dropout)
            for _ in range(depth)
        )
        self.proj_out = proj(inner, channels)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view when x is channels-last
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return _add(out.contiguous(memory_format=memory_format_of(x)), x, not torch.is_grad_enabled())


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D tensor stored that way (and not also plain contiguous), else contiguous."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def set_upsample_fusion(module: nn.Module, enabled: bool) -> None:
    """Run every ``Upsample2D`` under ``module`` as one fused convolution (``True``, the default) or as nearest
    interpolation followed by the 3x3 conv (``False``, the layout of the original implementations)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled={enabled!r} must be True or False")
    for layer in module.modules():
        if isinstance(layer, Upsample2D):
            layer.fused, layer._cache = enabled, None
            layer.drop_packed()


def feed_forward_chunk_rows(module: nn.Module, device: torch.device | str) -> int | None:
    """Tokens per chunk of the feed-forward layers under ``module`` on ``device`` (None: the whole sequence)."""
    for layer in module.modules():
        if isinstance(layer, FeedForward):
            return layer.chunk_rows if torch.device(device).type in layer.CHUNK_DEVICES else None
    return None


def set_attention_mode(module: nn.Module, mode: str, chunk_size: int = 1024) -> None:
    """Switch every attention layer under ``module`` to ``sdpa`` or query-``chunked`` attention."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode={mode!r} is not supported; allowed values: {', '.join(ATTENTION_MODES)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.mode, layer.chunk_size = mode, chunk_size


def attention_mode(module: nn.Module) -> tuple[str, int]:
    """(mode, chunk size) of the first attention layer under ``module``; ("sdpa", 0) if it has none."""
    layer = next((m for m in module.modules() if isinstance(m, Attention)), None)
    return (layer.mode, layer.chunk_size) if layer is not None else ("sdpa", 0)
