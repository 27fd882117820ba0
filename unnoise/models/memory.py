"""Memory the networks need beside their weights: the model behind ``UNet.activation_bytes``,
``AutoencoderKL.decode_activation_bytes`` and ``resident_bytes``, which the serving VRAM planner combines.

Each forward is estimated by walking its blocks in order and keeping what is alive at once: the skip tensors the
U-Net holds for its up path, plus the working set of the current block (a residual block's input and two
temporaries; a transformer block's tokens and its GEGLU feed-forward's 8x- and 4x-wide temporaries, over one chunk
of tokens on the CPU (``layers.FeedForward``), the same for any depth of the stack, since without autograd each block
replaces the tokens of the one before (SDXL's 10 deep stacks measure as 1; tests/test_unet_sdxl.py); an upsampler's
input and its 4x-larger output and conv). Fused SDPA
kernels (flash / memory-efficient, on CPU and CUDA) hold no N x N score matrix, so attention adds its q, k, v and
output; ``chunked`` attention adds one (heads, chunk, N) block of scores. On top come the kernels' own allocations:
a weight-sized reorder or scratch buffer, and the largest convolution's workspace, which depends on the kernel that
runs it (``packing.conv_backend``; ``conv_workspace``). The estimates are checked against the PyTorch profiler on CPU
in float32 and bfloat16 (tests/test_serve_units.py) and ``torch.cuda.max_memory_allocated`` on GPU: SD-1.5 at
512x512 in fp16 (``benchmarks/gpu.py``) and the default model (``benchmarks/serve_load.py --vram-check``);
docs/benchmarks/gpu.md and serving.md hold the measurements.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from unnoise.models import lora
from unnoise.models.layers import Upsample2D, attention_mode, feed_forward_chunk_rows
from unnoise.models.packing import conv_backend, packed_weight_bytes

if TYPE_CHECKING:
    from unnoise.models.unet import UNet, UNetConfig
    from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig

# Elements alive per element of a block's feature map (calibrated against the profiler, see the module docstring).
RESNET_LIVE = 3  # input, norm/activation temporary, conv output
TRANSFORMER_LIVE = 8  # residual tokens, norm, attention and feed-forward outputs
FEED_FORWARD_LIVE = 12  # per token of a feed-forward chunk: GEGLU projection (8x), gelu (4x, then the product)
ATTENTION_LIVE = 5  # normalized input, q, k, v, output
WORKSPACE = 2**20  # bytes at least that kernels allocate for themselves in one phase
ONEDNN_CHANNEL_BLOCK = 16  # oneDNN's blocked layouts (nChw16c) hold channels in blocks of 16 (AVX-512, AMX)
Conv = tuple[int, int, int]  # a convolution of one image: (input channels, output channels, output pixels)


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules``."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


def resident_bytes(module: nn.Module) -> int:
    """Bytes ``module`` holds between inference calls: its parameters and buffers, the plain kernels its fused
    upsamplers keep (``Upsample2D.fused_weight_bytes``) and, on the CPU, the weights reordered for oneDNN beside the
    plain ones (``packing.packed_weight_bytes``; none for weights packed in place), and what its LoRA adapters hold
    (``lora.held_bytes``)."""
    fused = sum(m.fused_weight_bytes() for m in module.modules() if isinstance(m, Upsample2D))
    return module_bytes(module) + fused + packed_weight_bytes(module) + lora.held_bytes(module)


def kernel_workspace(module: nn.Module) -> int:
    """Bytes a kernel may allocate for itself within one forward of ``module``: a reorder of its largest weight."""
    return max(WORKSPACE, *(p.numel() * p.element_size() for p in module.parameters()))


def conv_workspace(backend: str, convs: list[Conv], batch: int, dtype: torch.dtype) -> int:
    """Elements the largest of ``convs`` allocates for itself over a batch, by the kernel that runs it.

    "packed": none (oneDNN on reordered weights reads the channels-last maps in place). "unfold": PyTorch's im2col
    convolution unfolds the whole batch's input into 3x3 = 9 columns per element (``slow_conv2d``; bf16 on CPUs
    without oneDNN's bf16 kernels). "onednn" (PyTorch's oneDNN convolution) in half precision: the batch's input and
    output copied into the blocked layout, channels padded to a block of 16 (``ONEDNN_CHANNEL_BLOCK``). "onednn" in
    float32 and "device" (cuDNN's algorithm scratch): about one image's input, as measured on the CPU and on an H100
    at SD-1.5's 512x512 decode (benchmarks/gpu.py)."""

    def blocked(channels: int) -> int:
        return -(-channels // ONEDNN_CHANNEL_BLOCK) * ONEDNN_CHANNEL_BLOCK

    def one(c_in: int, c_out: int, pixels: int) -> int:
        if backend == "packed":
            return 0
        if backend == "unfold":
            return 9 * c_in * pixels * batch
        if backend == "onednn" and dtype in (torch.bfloat16, torch.float16):
            return (blocked(c_in) + blocked(c_out)) * pixels * batch
        return c_in * pixels

    return max(one(*conv) for conv in convs)


def attention_live(tokens: int, width: int, heads: int, mode: str, chunk: int) -> int:
    """Elements an attention layer adds over ``tokens`` queries: projections, plus a score block when chunked."""
    scores = heads * min(chunk, tokens) * tokens if mode == "chunked" else 0
    return ATTENTION_LIVE * tokens * width + scores


# -- U-Net -------------------------------------------------------------------------------------------------------


def unet_activation_bytes(unet: UNet, batch: int, h: int, w: int, context: int) -> int:
    """Peak bytes one forward of ``unet`` on ``batch`` latents of h x w with ``context`` tokens allocates beyond its
    weights, with its attention mode, feed-forward chunks, dtype, device and convolution kernels as set now."""
    param = next(unet.parameters())
    rows = feed_forward_chunk_rows(unet, param.device)
    ff_rows = None if rows is None else math.ceil(rows / batch)  # a chunk spans the batch's tokens
    live = batch * unet_activations(unet.config, h, w, context, *attention_mode(unet), ff_rows)
    # The U-Net's peak is in its transformer blocks, not at a convolution (on the CPU in float32 the profiler
    # measures the same peak whether PyTorch's oneDNN convolution copies its maps or the packed one does not),
    # unless the convolution unfolds its input into 9x larger columns (bf16 on a CPU without oneDNN's bf16 kernels).
    backend = conv_backend(unet)
    workspace = conv_workspace(backend, unet_convs(unet.config, h, w), batch, param.dtype) if backend == "unfold" else 0
    return (live + workspace) * param.element_size() + kernel_workspace(unet)


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
    down_kinds, mid_kind, up_kinds = config.block_kinds()

    def block(level: int, c_in: int, kind: str | None) -> int:
        c, t = ch[level], tokens[level]
        live = RESNET_LIVE * t * max(c_in, c) + t * c_in
        if kind is not None:
            heads, dim = config.attention_shape(level)
            inner = heads * dim
            attn = attention_live(t, inner, heads, mode, chunk)
            cross = heads * t * context if kind == "cross" else 0
            ff = FEED_FORWARD_LIVE * min(t, ff_rows or t) * inner
            live = max(live, TRANSFORMER_LIVE * t * inner + ff + attn + cross + t * c)
        return live

    skips = [ch[0] * tokens[0]]  # conv_in output
    peak = 0
    for level, kind in enumerate(down_kinds):
        c_in = ch[max(level - 1, 0)]
        for _ in range(layers[level]):
            peak = max(peak, sum(skips) + block(level, c_in, kind))
            skips.append(ch[level] * tokens[level])
            c_in = ch[level]
        if level < n - 1:
            skips.append(ch[level] * tokens[level + 1])
    if mid_kind is not None:
        peak = max(peak, sum(skips) + block(n - 1, ch[-1], mid_kind))
    c_prev = ch[-1]
    for index, kind in enumerate(up_kinds):
        level = n - 1 - index
        for _ in range(layers[level] + 1):
            skip = skips.pop()
            peak = max(peak, sum(skips) + skip + block(level, c_prev + skip // tokens[level], kind))
            c_prev = ch[level]
        if level > 0:  # nearest upsampling to the next level and its conv
            peak = max(peak, sum(skips) + ch[level] * (tokens[level] + 2 * tokens[level - 1]))
    return peak


def unet_convs(config: UNetConfig, h: int, w: int) -> list[Conv]:
    """The U-Net's convolutions of one image at latent size h x w, as an upper bound per level: inputs of up to the
    up path's concatenation (this level's channels and the next one's), outputs of this level's channels."""
    ch, n = config.block_out_channels, len(config.block_out_channels)
    pixels = [math.ceil(h / 2**i) * math.ceil(w / 2**i) for i in range(n)]
    convs = [(ch[i] + ch[min(i + 1, n - 1)], ch[i], pixels[i]) for i in range(n)]
    return convs + [(config.in_channels, ch[0], pixels[0]), (ch[0], config.out_channels, pixels[0])]


# -- VAE decoder -------------------------------------------------------------------------------------------------


def decode_activation_bytes(vae: AutoencoderKL, batch: int, h: int, w: int) -> int:
    """Peak bytes one ``vae.decode`` of ``batch`` latents of h x w allocates beyond its weights, with its slicing,
    attention mode, dtype, device and convolution kernels as set now."""
    batch = 1 if vae.use_slicing else batch
    param = next(vae.decoder.parameters())
    live = batch * decoder_activations(vae.config, h, w, *attention_mode(vae.decoder))
    workspace = conv_workspace(conv_backend(vae.decoder), decoder_convs(vae.config, h, w), batch, param.dtype)
    return (live + workspace) * param.element_size() + kernel_workspace(vae.decoder)


def decoder_activations(config: AutoencoderKLConfig, h: int, w: int, mode: str = "sdpa", chunk: int = 1024) -> int:
    """Peak elements alive in one VAE decode of one image from latent size h x w."""
    ch = tuple(reversed(config.block_out_channels))
    tokens = h * w
    peak = RESNET_LIVE * ch[0] * tokens + config.latent_channels * tokens
    if config.mid_block_add_attention:
        peak = max(peak, ch[0] * tokens + attention_live(tokens, ch[0], 1, mode, chunk))
    c_in = ch[0]
    for i, c in enumerate(ch):
        peak = max(peak, RESNET_LIVE * tokens * max(c_in, c) + tokens * c_in)
        c_in = c
        if i < len(ch) - 1:
            peak = max(peak, c * tokens * (1 + 2 * 4))  # input, its nearest upsampling and the conv of that
            tokens *= 4
    return max(peak, tokens * (RESNET_LIVE * ch[-1] + config.out_channels))


def decoder_convs(config: AutoencoderKLConfig, h: int, w: int) -> list[Conv]:
    """The decoder's convolutions of one image from latent size h x w, as an upper bound per level: inputs of the
    previous level's channels (its upsampler's conv and this level's first block) or this level's, outputs of this
    level's; then ``conv_out``."""
    ch = tuple(reversed(config.block_out_channels))
    convs = [(max(ch[max(i - 1, 0)], c), c, h * w * 4**i) for i, c in enumerate(ch)]
    return convs + [(ch[-1], config.out_channels, h * w * 4 ** (len(ch) - 1))]
