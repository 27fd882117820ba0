"""Single-file Stable Diffusion checkpoints in the original CompVis/Stability layout (SD 1.x, 2.x, SDXL, inpainting).

One file holds the U-Net (``model.diffusion_model.``), the VAE (``first_stage_model.``) and the text encoders
(``Tower``): CLIP ViT-L in transformers' layout for SD 1.x (``cond_stage_model.transformer.``), OpenCLIP ViT-H for
SD 2.x (``cond_stage_model.model.``, attention q/k/v fused in ``in_proj_weight``); Stability's sgm layout for SDXL
(``conditioner.embedders.N.``: CLIP ViT-L, then OpenCLIP ViT-bigG with its text projection; the refiner has bigG
alone). Key mappings are plans of ``Entry`` rows built from the networks' configs and their own state-dict keys
(``unet_plan``, ``vae_plan``, ``clip_plan``, ``openclip_plan``); the same plan reads a file (``to_ours``) and writes
one (``to_ldm``). Tensors are read one at a time (``Checkpoint``: safetensors through ``safe_open``, memory-mapped,
or a trusted pickle); ``load_network`` makes each read tensor, converted to the target dtype, the network's
parameter, and ``write_safetensors`` streams tensors to a file: neither holds a second copy of the weights. Keys
real files carry beside the networks are recognised (``SKIPPED_KEYS``, EMA copies, SD 2.x's unused last text layer);
any other unknown or missing key is one error that names the file. ``detect_family`` and ``detect_prediction`` say
what a file is.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gzip
import json
import math
import mmap
import os
import re
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from unnoise.models.unet import UNetConfig
from unnoise.models.vae import AutoencoderKLConfig

LDM_UNET, LDM_VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_CLIP, SDXL_BIGG = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
REFINER_BIGG = "conditioner.embedders.0.model."
FAMILY_CONFIGS = Path(__file__).resolve().parent.parent / "weights" / "families"
CLIP_MERGES = FAMILY_CONFIGS / "clip" / "merges.txt.gz"


@dataclasses.dataclass(frozen=True)
class Tower:
    """A text encoder in a single file: the pipeline component it is (``text_encoder`` or ``text_encoder_2``), the
    prefix of its keys, and their layout: OpenCLIP's or transformers'."""

    component: str
    prefix: str
    openclip: bool


_SD1 = (Tower("text_encoder", SD1_TEXT, openclip=False),)
_SD2 = (Tower("text_encoder", SD2_TEXT, openclip=True),)
_SDXL = (Tower("text_encoder", SDXL_CLIP, openclip=False), Tower("text_encoder_2", SDXL_BIGG, openclip=True))
_REFINER = (Tower("text_encoder_2", REFINER_BIGG, openclip=True),)


@dataclasses.dataclass(frozen=True)
class Family:
    """A kind of single file: ``configs`` names its shipped config folder (``weights/families/``), ``towers`` its
    text encoders (the last one's key prefix tells the family apart), ``pipeline`` diffusers' pipeline class."""

    name: str
    title: str
    configs: str
    towers: tuple[Tower, ...]
    pipeline: str
    inpainting: bool = False

    @property
    def sd2(self) -> bool:
        """SD 2.x: conditioned on OpenCLIP ViT-H's penultimate layer, whose last layer its files still hold."""
        return self.towers == _SD2

    @property
    def sdxl(self) -> bool:
        return self.towers[-1].component == "text_encoder_2"


_SD, _SD_INPAINT = "StableDiffusionPipeline", "StableDiffusionInpaintPipeline"
FAMILIES = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x", "sd1", _SD1, _SD),
        Family("sd1-inpainting", "Stable Diffusion 1.x inpainting", "sd1", _SD1, _SD_INPAINT, inpainting=True),
        Family("sd2", "Stable Diffusion 2.x", "sd2", _SD2, _SD),
        Family("sd2-inpainting", "Stable Diffusion 2.x inpainting", "sd2", _SD2, _SD_INPAINT, inpainting=True),
        Family("sdxl-base", "Stable Diffusion XL base", "sdxl-base", _SDXL, "StableDiffusionXLPipeline"),
        Family(
            "sdxl-inpainting",
            "Stable Diffusion XL inpainting",
            "sdxl-base",
            _SDXL,
            "StableDiffusionXLInpaintPipeline",
            inpainting=True,
        ),  # fmt: skip
        Family(
            "sdxl-refiner", "Stable Diffusion XL refiner", "sdxl-refiner", _REFINER, "StableDiffusionXLImg2ImgPipeline"
        ),
    )
}
# Other kinds of checkpoint, by a key prefix only they have, so that the error names them.
_OTHERS = (
    ("control_model.", "ControlNet"),
    ("depth_model.", "Stable Diffusion 2 depth-to-image"),
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
    ("model.diffusion_model.double_blocks.", "Flux"),
)

# Keys real files carry beside the networks: LatentDiffusion's noise-schedule buffers (sgm's ``denoiser.sigmas``), the
# EMA's counters, OpenCLIP's contrastive head (SD 2.x also the text projection it does not use), transformers'
# constant position ids and ComfyUI's v-prediction marker.
SKIPPED_KEYS = frozenset(
    {
        *("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"),
        *("log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "logvar"),
        *("posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"),
        *("model_ema.decay", "model_ema.num_updates", SD2_TEXT + "logit_scale", SD2_TEXT + "text_projection"),
        *(SD1_TEXT + "text_model.embeddings.position_ids", SD1_TEXT + "embeddings.position_ids", "v_pred"),
        *(SDXL_CLIP + "text_model.embeddings.position_ids", SDXL_BIGG + "logit_scale", REFINER_BIGG + "logit_scale"),
        "denoiser.sigmas",
    }
)
EMA = "model_ema."
V_STATISTIC = 0.09  # ComfyUI's threshold on the std of the last output block's norm1.bias (supported_models.SD20)
SD2_BASE_STEP = 875000  # global_step of SD 2.0 512-base, the one SD 2.x checkpoint diffusers knows as epsilon


class Lazy(NamedTuple):
    """A tensor not read yet: its shape, dtype and the call that reads it, ``read(dtype=None)``, which converts a
    floating-point tensor to ``dtype`` (and lets go of what it read)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[..., Tensor]


# -- reading a file --------------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class Checkpoint:
    """The tensors of one weights file, read one at a time: safetensors through ``safe_open`` or, with
    ``allow_pickle``, a pickle (``torch.load``, ``state_dict`` nesting unwrapped); ``global_step`` is the pickle's
    training step, if any. Use it as a context manager.

    safetensors tensors are views of the memory-mapped file: one wanted in the file's dtype costs no copy (its pages
    are read when first used, as diffusers' loader does), and the pages of one converted to another dtype are handed
    back to the page cache once converted (``_release``), so that resident memory holds one copy of the weights."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path} does not exist" if not self.path.exists() else f"{self.path} is not a file"
            )
        self.global_step: int | None = None
        self.metadata: dict[str, str] = {}
        self._file: Any = None
        self._tensors: dict[str, Tensor] | None = None
        self._last: tuple[tuple[str, torch.dtype | None], Tensor] | None = None  # fused q/k/v: read once for three
        if _kind(self.path) == "safetensors":
            self._file = _safe_open(self.path)
            self.metadata = self._file.metadata() or {}
            self.keys = list(self._file.keys())
        else:
            if not allow_pickle:
                raise ValueError(
                    f"{self.path} is a pickle, which can run arbitrary code when loaded; convert it to safetensors "
                    "(unnoise convert FILE OUT.safetensors --to single-file --allow-pickle) or pass allow_pickle=True "
                    "if you trust its source"
                )
            self._tensors = self._unpickle()
            self.keys = list(self._tensors)

    def _unpickle(self) -> dict[str, Tensor]:
        try:  # mapped, as safetensors files are, unless it predates torch.save's zip format
            state = torch.load(self.path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(self.path))
        except Exception as error:  # a pickle can raise anything
            why = f"is not a readable PyTorch pickle (truncated or damaged?): {' '.join(str(error).split())}"
            raise ValueError(f"{self.path} {why}") from error
        if isinstance(state, dict) and isinstance(state.get("global_step"), int):
            self.global_step = state["global_step"]
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{self.path} holds a {type(state).__name__}, not a state dict of tensors")
        return {k: v for k, v in state.items() if isinstance(v, Tensor)}

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if self._tensors is not None:
            return self._tensors[key].dtype
        name = self._file.get_slice(key).get_dtype()
        if name not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}; supported: {sorted(_DTYPES)}")
        return _DTYPES[name]

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor ``key``, a floating-point one converted to ``dtype`` if given."""
        if self._last is not None and self._last[0] == (key, dtype):
            return self._last[1]
        if self._tensors is not None:
            tensor = self._tensors[key]
        else:
            try:
                tensor = self._file.get_tensor(key)
            except SafetensorError as error:
                raise ValueError(f"{self.path}: tensor {key!r} cannot be read: {error}") from error
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            source, tensor = tensor, tensor.to(dtype)
            if self._tensors is None:
                _release(source)
        self._last = ((key, dtype), tensor)
        return tensor

    def lazy(self, rename: Callable[[str], str | None] = lambda k: k) -> dict[str, Lazy]:
        """Every tensor under ``rename(key)`` (None: left out), not read yet."""
        out = {}
        for key in self.keys:
            name = rename(key)
            if name is not None:
                out[name] = Lazy(self.shape(key), self.dtype(key), functools.partial(self.get, key))
        return out

    def close(self) -> None:
        self._file, self._tensors, self._last = None, None, None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kind(path: Path) -> str:
    """ "safetensors" or "pickle" from the first bytes (not the name); other content is an error naming the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip archive, or a legacy pickle
        return "pickle"
    raise ValueError(f"{path} is neither a safetensors file nor a PyTorch pickle (first bytes {head[:8]!r})")


def _safe_open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {error}") from error


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).madvise if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


def _release(tensor: Tensor) -> None:
    """Drop the whole pages of a memory-mapped, unmodified file tensor from this process's resident memory
    (``MADV_DONTNEED``; they stay in the page cache and would be read again from the file if touched)."""
    madvise, page = _madvise(), mmap.PAGESIZE
    if madvise is None:
        return
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


# -- key plans --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the original layout and the tensor(s) it is in ours: several are stacked along dim 0 there
    (OpenCLIP's fused q/k/v); ``conv1x1``: a 1x1 convolution's weight there, a linear weight here (VAE attention);
    ``transpose``: a matrix applied as ``x @ W`` there, a linear weight (``W.T``) here (OpenCLIP's text projection)."""

    ldm: str
    ours: tuple[str, ...]
    conv1x1: bool = False
    transpose: bool = False


# Submodule renames inside a module of each kind: ours -> the original's ("same": identical names below it).
_RENAMES: dict[str, dict[str, str] | None] = {
    "same": None,
    "resnet": {
        "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
    },
    "vae_resnet": {
        "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut",
    },
    "vae_attention": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
}  # fmt: skip


def unet_modules(config: UNetConfig) -> list[tuple[str, str, str]]:
    """(original module, our module, kind) for the U-Net of ``config``, numbered as the original's
    ``input_blocks`` / ``middle_block`` / ``output_blocks`` (each holds a resnet, its attention, a resampler); SDXL's
    added conditioning (``addition_embed_type="text_time"``) is sgm's ``label_emb``. Levels without attention and
    any transformer depth need nothing more: a level's attention module keeps its inner names."""
    down, mid, up = config.block_kinds()
    if "self" in (*down, mid, *up) or config.num_class_embeds:
        raise ValueError(
            "single files of Stable Diffusion U-Nets: self-attention blocks and class embeddings are not supported"
        )
    rows = [("time_embed.0", "time_embedding.linear_1", "same"), ("time_embed.2", "time_embedding.linear_2", "same")]
    if config.addition_embed_type == "text_time":
        rows += [
            ("label_emb.0.0", "add_embedding.linear_1", "same"),
            ("label_emb.0.2", "add_embedding.linear_2", "same"),
        ]
    rows += [("input_blocks.0.0", "conv_in", "same"), ("out.0", "conv_norm_out", "same"), ("out.2", "conv_out", "same")]
    layers, n, k = config.per_block("layers_per_block"), len(config.block_out_channels), 1
    for level in range(n):
        for j in range(layers[level]):
            rows.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            rows += [(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "same")] if down[level] else []
            k += 1
        if level < n - 1:
            rows.append((f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            k += 1
    if mid:
        rows += [
            ("middle_block.0", "mid_block.resnets.0", "resnet"),
            ("middle_block.2", "mid_block.resnets.1", "resnet"),
        ]
        rows.append(("middle_block.1", "mid_block.attentions.0", "same"))
    k = 0
    for i in range(n):
        level = n - 1 - i
        for j in range(layers[level] + 1):
            rows.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            rows += [(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "same")] if up[i] else []
            if j == layers[level] and level > 0:
                rows.append((f"output_blocks.{k}.{2 if up[i] else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", "same"))
            k += 1
    return rows


def vae_modules(config: AutoencoderKLConfig) -> list[tuple[str, str, str]]:
    """(original module, our module, kind) for the autoencoder; the original numbers decoder stages bottom-up."""
    rows = [("quant_conv", "quant_conv", "same"), ("post_quant_conv", "post_quant_conv", "same")]
    n, layers = len(config.block_out_channels), config.layers_per_block
    for side in ("encoder", "decoder"):
        rows += [(f"{side}.conv_in", f"{side}.conv_in", "same"), (f"{side}.conv_out", f"{side}.conv_out", "same")]
        rows += [(f"{side}.norm_out", f"{side}.conv_norm_out", "same")]
        rows += [(f"{side}.mid.block_{i + 1}", f"{side}.mid_block.resnets.{i}", "vae_resnet") for i in range(2)]
        rows.append((f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", "vae_attention"))
    for i in range(n):
        rows += [
            (f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", "vae_resnet") for j in range(layers)
        ]
        rows += [(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", "same")]
        up = f"decoder.up.{n - 1 - i}"
        rows += [(f"{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", "vae_resnet") for j in range(layers + 1)]
        rows += [(f"{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", "same")]
    return rows


def module_plan(modules: list[tuple[str, str, str]], keys: Iterable[str], prefix: str) -> list[Entry]:
    """One entry per key of our network, from the module rows it falls under (the longest matching module)."""
    by_module = {ours: (ldm, kind) for ldm, ours, kind in modules}
    plan = []
    for key in keys:
        parts = key.split(".")
        module = next(
            (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in by_module), None
        )
        if module is None:
            raise ValueError(f"{key}: this network has no counterpart in the original single-file layout")
        ldm, kind = by_module[module]
        sub, _, param = key[len(module) + 1 :].rpartition(".")
        renames = _RENAMES[kind]
        if renames is not None and sub not in renames:
            raise ValueError(f"{key}: {sub!r} has no counterpart in the original {kind} layout")
        renamed = sub if renames is None else renames[sub]
        conv1x1 = kind == "vae_attention" and param == "weight" and sub != "group_norm"
        plan.append(Entry(prefix + ldm + (f".{renamed}" if renamed else "") + f".{param}", (key,), conv1x1))
    return plan


def unet_plan(config: UNetConfig, keys: Iterable[str]) -> list[Entry]:
    return module_plan(unet_modules(config), keys, LDM_UNET)


def vae_plan(config: AutoencoderKLConfig, keys: Iterable[str]) -> list[Entry]:
    return module_plan(vae_modules(config), keys, LDM_VAE)


def clip_plan(keys: Iterable[str], prefix: str = SD1_TEXT + "text_model.") -> list[Entry]:
    """SD 1.x and SDXL's first tower: transformers' CLIPTextModel under ``prefix`` (SD 1.x files from transformers
    < 4.22 lack ``text_model.``)."""
    return [Entry(prefix + key, (key,)) for key in keys]


def openclip_plan(layers: int, prefix: str = SD2_TEXT, *, projection: bool = False) -> list[Entry]:
    """OpenCLIP's text tower under ``prefix``, ``layers`` residual blocks of it, as transformers' CLIPTextModel (SD
    2.x) or, with ``projection``, CLIPTextModelWithProjection (SDXL's bigG): OpenCLIP pools as ``x @ text_projection``,
    so its (width, projection) matrix is the transpose of the linear weight."""
    plan = [Entry("token_embedding.weight", ("embeddings.token_embedding.weight",))]
    plan.append(Entry("positional_embedding", ("embeddings.position_embedding.weight",)))
    for i in range(layers):
        block, layer = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            plan.append(Entry(f"{block}attn.in_proj_{p}", tuple(f"{layer}self_attn.{x}_proj.{p}" for x in "qkv")))
            for theirs, ours in (
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("attn.out_proj", "self_attn.out_proj"),
            ):
                plan.append(Entry(f"{block}{theirs}.{p}", (f"{layer}{ours}.{p}",)))
            for theirs, ours in (("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                plan.append(Entry(f"{block}{theirs}.{p}", (f"{layer}{ours}.{p}",)))
    plan += [Entry(f"ln_final.{p}", (f"final_layer_norm.{p}",)) for p in ("weight", "bias")]
    plan += [Entry("text_projection", ("text_projection.weight",), transpose=True)] if projection else []
    return [dataclasses.replace(e, ldm=prefix + e.ldm) for e in plan]


def to_ours(plan: list[Entry], source: dict[str, Lazy]) -> dict[str, Lazy]:
    """The tensors of ``source`` (original names) under our names, split and reshaped as the plan says."""
    out = {}
    for e in plan:
        lazy = source[e.ldm]
        shape = lazy.shape[:2] if e.conv1x1 and len(lazy.shape) == 4 else lazy.shape
        n = len(e.ours)
        for i, name in enumerate(e.ours):
            part = (shape[0] // n, *shape[1:]) if shape else shape
            part = part[::-1] if e.transpose else part
            out[name] = Lazy(part, lazy.dtype, functools.partial(_part, lazy.read, shape, n, i, e.transpose))
    return out


def _part(
    read: Callable[..., Tensor],
    shape: tuple[int, ...],
    n: int,
    i: int,
    transpose: bool,
    dtype: torch.dtype | None = None,
) -> Tensor:
    tensor = read(dtype).reshape(shape)
    tensor = tensor if n == 1 else tensor.chunk(n)[i]
    return tensor.t().contiguous() if transpose else tensor


def to_ldm(plan: list[Entry], ours: dict[str, Lazy]) -> dict[str, Lazy]:
    """Our tensors under the original names: stacked and reshaped back, the inverse of ``to_ours``."""
    out = {}
    for e in plan:
        parts = [ours[name] for name in e.ours]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) + ((1, 1) if e.conv1x1 else ())
        shape = shape[::-1] if e.transpose else shape
        reads = [p.read for p in parts]
        out[e.ldm] = Lazy(shape, parts[0].dtype, functools.partial(_join, reads, shape, e.transpose))
    return out


def _join(
    reads: list[Callable[..., Tensor]], shape: tuple[int, ...], transpose: bool, dtype: torch.dtype | None = None
) -> Tensor:
    tensor = reads[0](dtype) if len(reads) == 1 else torch.cat([read(dtype) for read in reads])
    return (tensor.t().contiguous() if transpose else tensor).reshape(shape)


# -- what a file is ---------------------------------------------------------------------------------------------------


SUPPORTED = "Stable Diffusion 1.x, 2.x, their inpainting variants, SDXL base (and inpainting) and SDXL refiner"


def detect_family(ckpt: Checkpoint) -> Family:
    """The family from the keys: the last text encoder's prefix (SDXL's bigG, else SD 2.x's OpenCLIP, else SD 1.x's
    CLIP), then the U-Net's input channels (9: inpainting)."""
    keys = ckpt.keys
    for prefix, title in _OTHERS:
        if any(k.startswith(prefix) for k in keys):
            raise ValueError(
                f"{ckpt.path} is a {title} checkpoint (keys {prefix}...), which is not supported; supported single "
                f"files: {SUPPORTED}"
            )
    prefixes = {f.towers[-1].prefix: f for f in reversed(FAMILIES.values()) if not f.inpainting}  # SDXL first
    family = next((f for prefix, f in prefixes.items() if any(k.startswith(prefix) for k in keys)), None)
    if family is None:
        raise ValueError(
            f"{ckpt.path}: unknown family: no Stable Diffusion text encoder (keys {' or '.join(prefixes)}...); "
            f"{_first(keys)}"
        )
    conv_in = LDM_UNET + "input_blocks.0.0.weight"
    if conv_in not in keys:
        raise ValueError(f"{ckpt.path}: no U-Net input convolution {conv_in!r}; {_first(keys)}")
    channels = ckpt.shape(conv_in)[1]
    inpainting = next((f for f in FAMILIES.values() if f.inpainting and f.towers == family.towers), None)
    if channels == 4 or (channels == 9 and inpainting is not None):
        return family if channels == 4 else inpainting
    allowed = "4 (text-to-image) or 9 (inpainting)" if inpainting is not None else "4"
    raise ValueError(
        f"{ckpt.path}: a {family.title} U-Net with {channels} input channels (InstructPix2Pix has 8) is not "
        f"supported; allowed: {allowed}"
    )


def _first(keys: list[str], n: int = 5) -> str:
    return f"its first keys: {sorted(keys)[:n]} ({len(keys)} keys)"


# ``modelspec.prediction_type`` values (the model spec writes "epsilon" or "v"; unnoise also "sample") -> ours.
_SPEC_NAMES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
_SPEC_NAMES["sample"] = "sample"


def detect_prediction(ckpt: Checkpoint, family: Family) -> tuple[str, str]:
    """(prediction type, why) from the file alone: its ``modelspec.prediction_type`` metadata, ComfyUI's ``v_pred``
    marker key, SD 2.0 512-base's ``global_step`` (diffusers), else ComfyUI's weight statistic for SD 2.x text-to-image:
    the std of the last output block's first ``norm1.bias`` above 0.09 means v-prediction (768-v); other families are
    epsilon-prediction."""
    spec = ckpt.metadata.get("modelspec.prediction_type")
    if spec is not None:
        if spec.lower() not in _SPEC_NAMES:
            raise ValueError(
                f"{ckpt.path}: metadata modelspec.prediction_type={spec!r}; allowed: {sorted(_SPEC_NAMES)}"
            )
        return _SPEC_NAMES[spec.lower()], f"the file's metadata modelspec.prediction_type={spec!r}"
    if "v_pred" in ckpt.keys:
        return "v_prediction", "the file's v_pred key (ComfyUI's marker)"
    if family.name != "sd2":
        return "epsilon", f"{family.title} is epsilon-prediction"
    if ckpt.global_step == SD2_BASE_STEP:
        return "epsilon", f"global_step={SD2_BASE_STEP} is SD 2.0 512-base (diffusers' rule)"
    pattern = re.compile(re.escape(LDM_UNET) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias")
    found = sorted((int(m[1]), k) for k in ckpt.keys if (m := pattern.fullmatch(k)))
    if not found:
        return "epsilon", "no output-block attention to measure"
    key = found[-1][1]
    std = ckpt.get(key).float().std(unbiased=False).item()
    kind = "v_prediction" if std > V_STATISTIC else "epsilon"
    return kind, f"std of {key} = {std:.4f} {'>' if std > V_STATISTIC else '<='} {V_STATISTIC} (ComfyUI's rule)"


def check_keys(ckpt: Checkpoint, used: set[str], skipped: Callable[[str], bool], hint: str) -> None:
    """Every key of the file is used or recognised, and every used key is there; else one error naming both."""
    have = set(ckpt.keys)
    unknown = sorted(k for k in have - used if not skipped(k))
    missing = sorted(used - have)
    problems = [
        f"{len(v)} {what} keys: {v[:5]}{' ...' if len(v) > 5 else ''}"
        for what, v in (("unknown", unknown), ("missing", missing))
        if v
    ]
    if problems:
        raise ValueError(f"{ckpt.path}: {'; '.join(problems)}; {hint}")


def ema_key(ldm: str) -> str:
    """The EMA copy of a U-Net key: ``model_ema.`` and the key after ``model.`` with its dots dropped."""
    return EMA + ldm.removeprefix("model.").replace(".", "")


# -- networks ---------------------------------------------------------------------------------------------------------


def meta_network(build: Callable[[], nn.Module]) -> nn.Module:
    """The network on the meta device: its structure and state-dict keys, no memory."""
    with torch.device("meta"):
        return build()


def text_keys(model: nn.Module) -> dict[str, str]:
    """Our name of each text-encoder tensor -> the model's (transformers < 5 nests the tower under ``text_model.``)."""
    return {k.removeprefix("text_model."): k for k in model.state_dict()}


def check_tensors(
    model: nn.Module, tensors: dict[str, Lazy], *, names: dict[str, str] | None = None, source: str
) -> dict[str, str]:
    """``tensors`` (our names; ``names`` maps them to the model's) are exactly the model's, in its shapes; returns
    ``names``. One error names the first few missing, unexpected or mis-shaped tensors and their count."""
    names = names or {k: k for k in model.state_dict()}
    state = model.state_dict()
    missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    wrong = [
        f"{k} {tensors[k].shape} (expected {tuple(state[names[k]].shape)})"
        for k in tensors
        if k in names and tuple(state[names[k]].shape) != tuple(tensors[k].shape)
    ]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if keys:
            more = " ..." if len(keys) > 5 else ""
            raise ValueError(f"{type(model).__name__} from {source}: {len(keys)} {what} tensors: {keys[:5]}{more}")
    return names


def load_network(
    model: nn.Module, tensors: dict[str, Lazy], *, dtype: torch.dtype, source: str, names: dict[str, str] | None = None
) -> nn.Module:
    """Give a meta-device ``model`` the tensors of ``tensors`` (``check_tensors`` first, so nothing is read in vain),
    read one at a time and converted to ``dtype`` (floating point only): each read tensor becomes the parameter, so
    the file's tensors and the network are never both whole in memory, and nothing is allocated twice."""
    names = check_tensors(model, tensors, names=names, source=source)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    modules = dict(model.named_modules())
    loose = [name for name in buffers if name not in model.state_dict()]

    def assign(name: str, tensor: Tensor) -> None:
        module_name, _, leaf = name.rpartition(".")
        if name in params:
            modules[module_name]._parameters[leaf] = nn.Parameter(tensor, requires_grad=params[name].requires_grad)
        else:
            modules[module_name]._buffers[leaf] = tensor

    with torch.no_grad():
        for key, lazy in tensors.items():
            tensor = lazy.read(dtype)  # floating point only: position ids stay integers
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()  # a part of a bigger tensor (fused q/k/v) gets its own storage
            assign(names[key], tensor)
        for name in loose:  # not saved: rebuilt as the constructor builds them
            if not name.endswith("position_ids"):
                raise ValueError(f"{type(model).__name__}: buffer {name!r} is not saved and cannot be rebuilt")
            shape = buffers[name].shape
            assign(name, torch.arange(shape[-1], dtype=buffers[name].dtype).expand(shape).clone())
    return model.eval()


# -- writing ----------------------------------------------------------------------------------------------------------


def write_safetensors(
    path: str | Path,
    tensors: dict[str, Lazy],
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file reading one tensor at a time (``dtype`` converts the floating-point ones); the file
    appears complete or not at all."""
    path = Path(path)

    def target(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, lazy in tensors.items():
        size = math.prod(lazy.shape) * target(lazy.dtype).itemsize
        header[name] = {
            "dtype": _NAMES[target(lazy.dtype)],
            "shape": list(lazy.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, lazy in tensors.items():
            tensor = lazy.read(target(lazy.dtype)).contiguous()
            if tuple(tensor.shape) != tuple(lazy.shape):
                raise ValueError(f"{name}: read shape {tuple(tensor.shape)}, announced {lazy.shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(partial, path)


# -- configs: CLIP's tokenizer and diffusers' config.json ---------------------------------------------------------


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, which CLIP's BPE works on."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, built from the shipped merges as OpenAI's ``SimpleTokenizer`` builds them."""
    merges = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()[1:]  # after "#version: 0.2"
    chars = list(_bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, family: Family, tokenizer: str = "tokenizer") -> None:
    """The family's CLIP tokenizer ``tokenizer`` (SDXL: also ``tokenizer_2``, which pads with "!") as a diffusers
    folder: vocab.json, merges.txt and its configs."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((FAMILY_CONFIGS / family.configs / tokenizer / name).read_bytes())


def clip_tokenizer(family: Family, tokenizer: str = "tokenizer") -> Any:
    """transformers' CLIPTokenizer ``tokenizer`` of the family, built in memory (transformers >= 5; else from a
    written folder)."""
    import transformers  # the caller has checked it is installed (text.import_transformers)

    folder = FAMILY_CONFIGS / family.configs / tokenizer
    options = json.loads((folder / "tokenizer_config.json").read_text())
    options.pop("tokenizer_class", None)
    vocab, merges = clip_bpe()
    try:
        return transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], **options)
    except TypeError:  # transformers 4: files only
        with tempfile.TemporaryDirectory() as tmp:
            write_clip_tokenizer(Path(tmp), family, tokenizer)
            return transformers.CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def diffusers_unet_config(c: UNetConfig) -> dict[str, Any]:
    """diffusers' ``UNet2DConditionModel`` config.json for ``c`` (``UNetConfig.from_diffusers`` reads it back)."""
    unet_modules(c)  # refuses what a Stable Diffusion U-Net does not have
    heads = [c.attention_shape(level)[0] for level in range(len(c.block_out_channels))]
    copied = (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
    )
    copied += ("mid_block_type", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block")
    copied += ("norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "mid_block_scale_factor")
    copied += ("downsample_padding", "dropout", "resnet_time_scale_shift", "time_embedding_dim", "sample_size")
    if c.reverse_transformer_layers_per_block is not None:
        copied += ("reverse_transformer_layers_per_block",)
    if c.addition_embed_type is not None:  # SDXL
        copied += ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    config = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", **{k: getattr(c, k) for k in copied}}
    config["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else heads  # diffusers' name for the head count
    return json.loads(json.dumps(config))  # tuples as lists


def diffusers_vae_config(c: AutoencoderKLConfig) -> dict[str, Any]:
    """diffusers' ``AutoencoderKL`` config.json for ``c``."""
    n = len(c.block_out_channels)
    blocks = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", **c.to_dict(), **blocks}
