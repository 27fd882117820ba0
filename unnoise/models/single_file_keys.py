"""Key plans: where each tensor of a single file in the original CompVis/Stability layout is in our networks.

A plan is a list of ``Entry`` rows built from a network's config and its own state-dict keys: ``unet_plan`` (LDM's
``input_blocks`` / ``middle_block`` / ``output_blocks``, SDXL's ``label_emb``), ``vae_plan``, ``clip_plan``
(transformers' CLIP layout, as SD 1.x and SDXL's first tower hold it) and ``openclip_plan`` (OpenCLIP's, q/k/v fused
in ``in_proj``). The same plan reads a file (``to_ours``) and writes one (``to_ldm``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from unnoise.models.tensor_files import Lazy
from unnoise.models.unet import UNetConfig
from unnoise.models.vae import AutoencoderKLConfig

LDM_UNET, LDM_VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_CLIP, SDXL_BIGG = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
REFINER_BIGG = "conditioner.embedders.0.model."


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
            read = functools.partial(_part, lazy.read, shape, n, i, e.transpose)
            out[name] = Lazy(part, lazy.dtype, read, lazy.mapped and not e.transpose)  # a transpose is a copy
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
