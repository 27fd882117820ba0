"""VRAM planner: the peak memory of generating a batch, from the model's configs, the resolution and the dtype.

Peak = weights + the sampler's latents + the larger of two phases that never overlap: the U-Net forward on the
classifier-free-guidance batch (2B) and the VAE decode of B images. Each phase is estimated by walking its blocks
in forward order and keeping what is alive at once: the skip tensors the U-Net holds for its up path, plus the
working set of the current block (a residual block's input and two temporaries; a transformer block's tokens and
its GEGLU feed-forward's 8x- and 4x-wide temporaries, over one chunk of tokens on the CPU (``FeedForward``); an
upsampler's input and its 4x-larger output and conv).
Fused SDPA kernels (flash / memory-efficient, on CPU and CUDA) hold no N x N score matrix, so attention adds its
q, k, v and output; ``chunked`` attention adds one (heads, chunk, N) block of scores. The VAE decode adds one
image's largest convolution input as workspace (cuDNN's algorithm scratch at batch 1, an im2col buffer on CPU).
The estimate is checked against the PyTorch profiler on CPU in float32 and bfloat16 (tests/test_serve_units.py) and
``torch.cuda.max_memory_allocated`` on GPU: SD-1.5 at 512x512 in fp16 (``benchmarks/gpu.py``) and the default model
(``benchmarks/serve_load.py --vram-check``); docs/benchmarks/gpu.md and serving.md hold the measurements.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from unnoise.models.layers import Upsample2D, feed_forward_chunk_rows, packed_weight_bytes
from unnoise.models.unet import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS, UNetConfig
from unnoise.models.vae import AutoencoderKLConfig

GIB = 2**30
# Elements alive per element of a block's feature map (calibrated against the profiler, see the module docstring).
RESNET_LIVE = 3  # input, norm/activation temporary, conv output
TRANSFORMER_LIVE = 8  # residual tokens, norm, attention and feed-forward outputs
FEED_FORWARD_LIVE = 12  # per token of a feed-forward chunk: GEGLU projection (8x), gelu (4x, then the product)
ATTENTION_LIVE = 5  # normalized input, q, k, v, output
SAMPLER_COPIES = 8  # float32 latents the sampler and guidance keep: x, denoised, cat([x, x]), history
FLOAT32 = 4
WORKSPACE = 2**20  # bytes at least that kernels allocate for themselves in one phase


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one batch: weights, sampler state and the two activation phases (U-Net with CFG, VAE decode)."""

    weights: int
    sampler: int
    unet: int
    vae: int

    @property
    def activations(self) -> int:
        return self.sampler + max(self.unet, self.vae)

    @property
    def peak(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        parts = (("weights", self.weights), ("U-Net activations", self.unet), ("VAE decode", self.vae))
        return f"{self.peak / GIB:.3g} GiB ({', '.join(f'{name} {b / GIB:.3g} GiB' for name, b in parts)})"


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules``."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


def _attention_live(tokens: int, width: int, heads: int, mode: str, chunk: int) -> int:
    """Elements an attention layer adds over ``tokens`` queries: projections, plus a score block when chunked."""
    scores = heads * min(chunk, tokens) * tokens if mode == "chunked" else 0
    return ATTENTION_LIVE * tokens * width + scores


def unet_activations(
    config: UNetConfig,
    h: int,
    w: int,
    context: int,
    mode: str = "sdpa",
    chunk: int = 1024,
    ff_rows: int | None = None,
) -> int:
    """Peak elements alive in one U-Net forward of one image at latent size h x w (multiply by batch and itemsize).
    ``ff_rows``: the image's tokens in one feed-forward chunk (``layers.FeedForward.chunk_rows`` over the batch;
    None: all of them)."""
    ch, n = config.block_out_channels, len(config.block_out_channels)
    layers = config.per_block("layers_per_block")
    tokens = [math.ceil(h / 2**i) * math.ceil(w / 2**i) for i in range(n)]

    def block(level: int, c_in: int, kind: str | None) -> int:
        c, t = ch[level], tokens[level]
        live = RESNET_LIVE * t * max(c_in, c) + t * c_in
        if kind is not None:
            heads, dim = config.attention_shape(level)
            inner = heads * dim
            attn = _attention_live(t, inner, heads, mode, chunk)
            cross = heads * t * context if kind == "cross" else 0
            ff = FEED_FORWARD_LIVE * min(t, ff_rows or t) * inner
            live = max(live, TRANSFORMER_LIVE * t * inner + ff + attn + cross + t * c)
        return live

    skips = [ch[0] * tokens[0]]  # conv_in output
    peak = 0
    for level, kind in enumerate(DOWN_BLOCKS[t] for t in config.down_block_types):
        c_in = ch[max(level - 1, 0)]
        for _ in range(layers[level]):
            peak = max(peak, sum(skips) + block(level, c_in, kind))
            skips.append(ch[level] * tokens[level])
            c_in = ch[level]
        if level < n - 1:
            skips.append(ch[level] * tokens[level + 1])
    if config.mid_block_type is not None:
        peak = max(peak, sum(skips) + block(n - 1, ch[-1], MID_BLOCKS[config.mid_block_type]))
    c_prev = ch[-1]
    for index, kind in enumerate(UP_BLOCKS[t] for t in config.up_block_types):
        level = n - 1 - index
        for _ in range(layers[level] + 1):
            skip = skips.pop()
            peak = max(peak, sum(skips) + skip + block(level, c_prev + skip // tokens[level], kind))
            c_prev = ch[level]
        if level > 0:  # nearest upsampling to the next level and its conv
            peak = max(peak, sum(skips) + ch[level] * (tokens[level] + 2 * tokens[level - 1]))
    return peak


def decoder_largest_map(config: AutoencoderKLConfig, h: int, w: int) -> int:
    """Elements of the decoder's largest convolution input for one image from latent size h x w: the upsampler conv
    at the next resolution, or the last level's first block (its input has the previous level's channels)."""
    ch = tuple(reversed(config.block_out_channels))
    return max(ch[i] * h * w * 4 ** min(i + 1, len(ch) - 1) for i in range(len(ch)))


def decoder_activations(config: AutoencoderKLConfig, h: int, w: int, mode: str = "sdpa", chunk: int = 1024) -> int:
    """Peak elements alive in one VAE decode of one image from latent size h x w."""
    ch = tuple(reversed(config.block_out_channels))
    tokens = h * w
    peak = RESNET_LIVE * ch[0] * tokens + config.latent_channels * tokens
    if config.mid_block_add_attention:
        peak = max(peak, ch[0] * tokens + _attention_live(tokens, ch[0], 1, mode, chunk))
    c_in = ch[0]
    for i, c in enumerate(ch):
        peak = max(peak, RESNET_LIVE * tokens * max(c_in, c) + tokens * c_in)
        c_in = c
        if i < len(ch) - 1:
            peak = max(peak, c * tokens * (1 + 2 * 4))  # input, its nearest upsampling and the conv of that
            tokens *= 4
    return max(peak, tokens * (RESNET_LIVE * ch[-1] + config.out_channels))


class VramPlanner:
    """Peak memory of a batch of a loaded ``Pipeline``, and the largest batch under ``budget`` bytes."""

    def __init__(self, pipe: Any, budget: int, max_batch: int):
        self.pipe, self.budget, self.limit = pipe, int(budget), int(max_batch)
        # plus the phase weights fused upsamplers keep between calls (unnoise.models.layers.Upsample2D) and, on the
        # CPU, the weights reordered once for oneDNN (unnoise.models.layers.packed_conv2d)
        upsamplers = [m for model in (pipe.unet, pipe.vae) for m in model.modules() if isinstance(m, Upsample2D)]
        self.weights = (
            module_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
            + sum(m.fused_weight_bytes() for m in upsamplers)
            + packed_weight_bytes(pipe.unet)
            + packed_weight_bytes(pipe.vae)
        )
        # kernels' workspaces: a convolution may copy (reorder) its weight or unfold its input (im2col)
        self.unet_workspace = max(WORKSPACE, *(p.numel() * p.element_size() for p in pipe.unet.parameters()))
        self.vae_workspace = max(WORKSPACE, *(p.numel() * p.element_size() for p in pipe.vae.decoder.parameters()))
        # oneDNN's convolutions on reordered weights read the channels-last maps in place: no input workspace
        self.vae_conv_workspace = not packed_weight_bytes(pipe.vae.decoder)

    def estimate(self, batch: int, width: int, height: int, *, cfg: bool = True) -> MemoryEstimate:
        """Peak bytes of generating ``batch`` images of ``width`` x ``height`` (with classifier-free guidance)."""
        pipe = self.pipe
        f = pipe.vae_factor
        h, w = height // f, width // f
        mode, chunk = _attention_mode(pipe.unet)
        context = pipe.text_encoder.max_length
        unet_batch = 2 * batch if cfg else batch
        rows = feed_forward_chunk_rows(pipe.unet, next(pipe.unet.parameters()).device)
        ff_rows = None if rows is None else math.ceil(rows / unet_batch)  # a chunk spans the batch's tokens
        unet = unet_batch * unet_activations(pipe.unet.config, h, w, context, mode, chunk, ff_rows)
        vae_batch = 1 if getattr(pipe.vae, "use_slicing", False) else batch
        vae = vae_batch * decoder_activations(pipe.vae.config, h, w, *_attention_mode(pipe.vae))
        sampler = SAMPLER_COPIES * batch * pipe.vae.config.latent_channels * h * w * FLOAT32
        unet_bytes = unet * next(pipe.unet.parameters()).element_size() + self.unet_workspace
        itemsize = next(pipe.vae.parameters()).element_size()
        # a convolution's workspace (cuDNN's algorithm scratch, an im2col buffer) is up to about one image's largest
        # input map: measured on an H100 at SD-1.5's 512x512 decode, batch 1 (benchmarks/gpu.py)
        vae_bytes = vae * itemsize + self.vae_workspace
        if self.vae_conv_workspace:
            vae_bytes += decoder_largest_map(pipe.vae.config, h, w) * itemsize
        return MemoryEstimate(self.weights, sampler, unet_bytes, vae_bytes)

    def max_batch(self, width: int, height: int) -> int:
        """The largest batch (at most the server's ``--max-batch``) whose estimate fits the budget; 0 if none."""
        lo, hi = 0, self.limit
        while lo < hi:  # the estimate grows with the batch: bisect
            mid = (lo + hi + 1) // 2
            if self.estimate(mid, width, height).peak <= self.budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _attention_mode(module: nn.Module) -> tuple[str, int]:
    """(mode, chunk size) of the first attention layer under ``module``; ("sdpa", 0) if it has none."""
    for layer in module.modules():
        if hasattr(layer, "mode") and hasattr(layer, "chunk_size"):
            return layer.mode, layer.chunk_size
    return "sdpa", 0


def measured_activations(fn: Any, device: Any) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before: ``torch.cuda.max_memory_allocated``
    on CUDA, the PyTorch profiler's memory timeline on CPU (how the planner's estimates are checked)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _profiled_activations(fn)


def _profiled_activations(fn: Any) -> int:
    import json
    import tempfile
    import warnings
    from pathlib import Path

    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:  # fmt: skip
        fn()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is deprecated for CUDA only
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0
