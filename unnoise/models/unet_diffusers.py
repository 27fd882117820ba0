"""Translation of diffusers' ``UNet2DModel`` / ``UNet2DConditionModel`` config.json into ``UNetConfig`` fields.

Quirk handled here: in ``UNet2DConditionModel`` the key ``attention_head_dim`` holds the NUMBER of heads of the
transformer blocks (unless ``num_attention_heads`` is set); in ``UNet2DModel`` it is the head dimension. SDXL's
``attention_head_dim: [5, 10, 20]`` is thus 5, 10 and 20 heads of 64 channels.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unnoise.models.unet import UNetConfig

_COMMON_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "downsample_padding": 1,
    "dropout": 0.0,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "num_class_embeds": None,
    "time_embedding_dim": None,
}

# diffusers' defaults for the keys we translate, used where an (old, hand-written) config.json leaves one out.
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "UNet2DModel": {
        **_COMMON_DEFAULTS,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2D",
        "block_out_channels": [224, 448, 672, 896],
        "attn_norm_num_groups": None,
    },
    "UNet2DConditionModel": {
        **_COMMON_DEFAULTS,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [320, 640, 1280, 1280],
        "num_attention_heads": None,
        "cross_attention_dim": 1280,
        "use_linear_projection": False,
        "transformer_layers_per_block": 1,
        "reverse_transformer_layers_per_block": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
        "time_cond_proj_dim": None,
    },
}

# Options we do not implement -> the values that mean "off" (a list of such values also passes).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "act_fn": ("silu", "swish"),
    "class_embed_type": (None,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "add_attention": (True,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}

# Keys without effect on a supported model: addition_embed_type_num_heads only acts with addition_embed_type "text"
# or "text_image" (refused by UNetConfig), num_train_timesteps nowhere in the network. upcast_attention (SD 2.1;
# None or False in SDXL) asks for fp32 attention scores; diffusers' default SDPA processor ignores it as well, and
# SDPA kernels accumulate the scores in fp32 (our chunked path forms them in the weights' dtype, softmax in fp32).
IGNORED = ("addition_embed_type_num_heads", "num_train_timesteps", "upcast_attention")

_COPIED = (
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_scale_factor",
    "norm_num_groups",
    "norm_eps",
    "flip_sin_to_cos",
    "freq_shift",
    "resnet_time_scale_shift",
    "num_class_embeds",
    "downsample_padding",
    "dropout",
    "time_embedding_dim",
)
# UNet2DConditionModel keys ``_conditional_fields`` takes as they are.
_CONDITIONAL = (
    "mid_block_type",
    "use_linear_projection",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "time_cond_proj_dim",
)


def unet_config_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """``UNetConfig`` fields for a diffusers U-Net config.json; unsupported or unknown options raise ValueError."""
    class_name = cfg.get("_class_name")
    if class_name not in DIFFUSERS_DEFAULTS:
        raise ValueError(
            f"_class_name={class_name!r} is not a supported U-Net; supported: {sorted(DIFFUSERS_DEFAULTS)}"
        )
    cfg = {**DIFFUSERS_DEFAULTS[class_name], **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    _check_supported(cfg, class_name)
    fields = {k: cfg[k] for k in _COPIED}
    fields["freq_shift"] = float(cfg["freq_shift"])
    if class_name == "UNet2DModel":
        fields.update(_unet2d_fields(cfg))
    else:
        fields.update(_conditional_fields(cfg))
    return fields


def _check_supported(cfg: dict[str, Any], class_name: str) -> None:
    known = set(DIFFUSERS_DEFAULTS[class_name]) | set(UNSUPPORTED) | set(IGNORED)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{class_name} config: unknown options {unknown}; not translated, so refused")
    for key, off in UNSUPPORTED.items():
        value = cfg.get(key, off[0])
        values = value if isinstance(value, list) else [value]
        if any(v not in off for v in values):
            raise ValueError(f"{class_name} config: {key}={value!r} is not supported; supported: {off[0]!r}")


def _unet2d_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """UNet2DModel: ``attention_head_dim`` is the head dimension (None: one head); any mid type is UNetMidBlock2D."""
    return {
        "attention_head_dim": cfg["attention_head_dim"],
        "mid_block_type": None if cfg["mid_block_type"] is None else "UNetMidBlock2D",
        # diffusers gives the mid attention a GroupNorm only with additive time conditioning or explicit groups
        "mid_attention_norm": cfg["attn_norm_num_groups"] is not None or cfg["resnet_time_scale_shift"] == "default",
        "attn_norm_num_groups": cfg["attn_norm_num_groups"],
    }


def _conditional_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel: head counts from ``num_attention_heads``, else from ``attention_head_dim``."""
    blocks = [*cfg["down_block_types"], *cfg["up_block_types"]]
    for name in ("AttnDownBlock2D", "AttnUpBlock2D"):
        if name in blocks:  # their head dim comes from attention_head_dim, unlike the transformer blocks' heads
            raise ValueError(f"UNet2DConditionModel config: {name} is not supported (only in UNet2DModel)")
    if cfg["mid_block_type"] not in (None, "UNetMidBlock2DCrossAttn"):
        raise ValueError(
            f"UNet2DConditionModel config: mid_block_type={cfg['mid_block_type']!r} is not supported; "
            "supported: 'UNetMidBlock2DCrossAttn' or None"
        )
    cross = any("CrossAttn" in b for b in blocks) or cfg["mid_block_type"] is not None
    return {
        **{k: cfg[k] for k in _CONDITIONAL},
        "num_attention_heads": cfg["num_attention_heads"] or cfg["attention_head_dim"],
        "cross_attention_dim": _one_value("cross_attention_dim", cfg["cross_attention_dim"]) if cross else None,
    }


def conditional_config(c: UNetConfig) -> dict[str, Any]:
    """diffusers' ``UNet2DConditionModel`` config.json for ``c``, which ``unet_config_fields`` reads back as ``c``:
    the copied keys as they are, the head counts as ``attention_head_dim`` (diffusers' name for them)."""
    down, mid, up = c.block_kinds()
    if "self" in (*down, mid, *up) or c.num_class_embeds:
        raise ValueError(
            "UNet2DConditionModel config: self-attention blocks and class embeddings are UNet2DModel's; this U-Net "
            "has them"
        )
    heads = [c.attention_shape(level)[0] for level in range(len(c.block_out_channels))]
    config = {"_class_name": "UNet2DConditionModel", "act_fn": "silu"}
    config |= {k: getattr(c, k) for k in (*_COPIED, *_CONDITIONAL, "cross_attention_dim")}
    config["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else heads
    return json.loads(json.dumps(config))  # tuples as lists


def _one_value(key: str, value: Any) -> Any:
    """An int, or a per-block list whose entries agree (per-block values of ``key`` are not supported)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"UNet2DConditionModel config: per-block {key}={value!r} is not supported")
        return value[0]
    return value
