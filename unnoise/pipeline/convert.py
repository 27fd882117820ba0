"""Converting a pipeline between the three layouts (a single file, a diffusers folder, ours) tensor by tensor, bit
for bit unless a dtype is asked for; a diffusers folder gets its configs translated from ours where the source has
none (``diffusers_scheduler_config``, ``unet_diffusers.conditional_config``, ``diffusers_vae_config``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from unnoise.core.samplers import SAMPLER_INFO
from unnoise.core.schedules import check_choice
from unnoise.models.single_file_keys import to_ldm
from unnoise.models.tensor_files import check_tensors, text_keys, write_safetensors
from unnoise.models.unet_diffusers import conditional_config
from unnoise.models.vae import AutoencoderKLConfig
from unnoise.pipeline.config import PipelineConfig
from unnoise.pipeline.layouts import (
    TOKENIZERS,
    Layout,
    key_plans,
    read_folder,
    read_single_file,
    saved_text_name,
    write_tokenizer,
)
from unnoise.pipeline.loading import resolve_model
from unnoise.pipeline.schedulers import SCHEDULERS, translate_scheduler

LAYOUTS = ("diffusers", "single-file", "unnoise")


def convert(
    source: str | Path,
    destination: str | Path,
    *,
    to: str,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
    prediction: str | None = None,
    allow_pickle: bool = False,
    ema: bool = False,
) -> Path:
    """Write ``source`` (a single file, a diffusers folder or ours) as ``to``: "single-file" (one .safetensors with
    the prediction type in its metadata), "diffusers" or "unnoise". Tensors are copied one at a time, bit for bit
    unless ``dtype`` converts the floating-point ones; a single file's configs come as in ``load_single_file``."""
    check_choice("to", to, LAYOUTS)
    source, destination = resolve_model(source), Path(destination)
    if destination.exists() and (destination.is_file() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} exists; name a new file or folder")
    if source.is_file():
        layout = read_single_file(source, prediction=prediction, config=config, allow_pickle=allow_pickle, ema=ema)
    else:
        if config is not None or prediction is not None or ema:
            raise ValueError("config, prediction and ema apply to a single-file source only")
        layout = read_folder(source, allow_pickle=allow_pickle)
    try:
        _check_tensors(layout, str(source))
        {"single-file": _write_single_file, "diffusers": _write_diffusers, "unnoise": _write_ours}[to](
            layout, destination, dtype
        )
    finally:
        layout.close()
    return destination


def _check_tensors(layout: Layout, source: str) -> None:
    for name, net in layout.nets.items():
        names = text_keys(net) if name in layout.configs.texts else None
        check_tensors(net, layout.tensors[name], names=names, source=source)


def _write_single_file(layout: Layout, path: Path, dtype: torch.dtype | None) -> None:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single file is written as .safetensors")
    plans = key_plans(layout.family, layout.configs, layout.nets)
    tensors = {k: v for name, plan in plans.items() for k, v in to_ldm(plan, layout.tensors[name]).items()}
    spec = {"v_prediction": "v"}.get(layout.configs.config.prediction, layout.configs.config.prediction)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, dtype=dtype, metadata={"format": "pt", "modelspec.prediction_type": spec})


def _write_networks(layout: Layout, folder: Path, dtype: torch.dtype | None, names: tuple[str, str]) -> None:
    """The U-Net's and the VAE's weights as ``names[0]``, each text encoder's as transformers writes them
    (``names[1]``, ``saved_text_name``), its config and its tokenizer folder."""
    texts = layout.configs.texts
    for part in ("unet", "vae", *texts):
        (folder / part).mkdir(parents=True)
    meta = {"format": "pt"}
    for part in ("unet", "vae"):
        write_safetensors(folder / part / names[0], layout.tensors[part], dtype=dtype, metadata=meta)
    for part, config in texts.items():
        text = {saved_text_name(k): v for k, v in layout.tensors[part].items()}
        write_safetensors(folder / part / names[1], text, dtype=dtype, metadata=meta)
        _write_json(folder / part / "config.json", config)
        write_tokenizer(layout, part, folder / TOKENIZERS[part])


def _write_diffusers(layout: Layout, folder: Path, dtype: torch.dtype | None) -> None:
    c = layout.configs
    _write_networks(layout, folder, dtype, ("diffusion_pytorch_model.safetensors", "model.safetensors"))
    _write_json(folder / "unet" / "config.json", c.diffusers.get("unet") or conditional_config(c.unet))
    _write_json(folder / "vae" / "config.json", c.diffusers.get("vae") or diffusers_vae_config(c.vae))
    scheduler = c.diffusers.get("scheduler") or diffusers_scheduler_config(c.config)
    _write_json(folder / "scheduler" / "scheduler_config.json", {**scheduler, "prediction_type": c.config.prediction})
    _write_json(folder / "model_index.json", _model_index(layout, scheduler["_class_name"]))


def _model_index(layout: Layout, scheduler: str) -> dict[str, Any]:
    """diffusers' model_index.json of the family's pipeline class; SDXL's lists its absent parts as [null, null]."""
    c, family = layout.configs, layout.family
    index: dict[str, Any] = {"_class_name": family.pipeline, "feature_extractor": [None, None]}
    index |= {"image_encoder": [None, None], "scheduler": ["diffusers", scheduler]}
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for part, data in c.texts.items():
        index[part] = ["transformers", (data.get("architectures") or ["CLIPTextModel"])[0]]
        index[TOKENIZERS[part]] = ["transformers", "CLIPTokenizer"]
    if not family.sdxl:
        return index | {"requires_safety_checker": False, "safety_checker": [None, None]}
    for part in TOKENIZERS:
        index.setdefault(part, [None, None])
        index.setdefault(TOKENIZERS[part], [None, None])
    index["force_zeros_for_empty_prompt"] = c.config.text_encoder.force_zeros_for_empty_prompt
    if family.pipeline != "StableDiffusionXLPipeline":  # img2img and inpainting: the refiner's aesthetic score
        pooled = c.texts["text_encoder_2"].get("projection_dim", 0)
        time_ids = (c.unet.projection_class_embeddings_input_dim - pooled) // c.unet.addition_time_embed_dim
        index["requires_aesthetics_score"] = time_ids == 5
    return index


def _write_ours(layout: Layout, folder: Path, dtype: torch.dtype | None) -> None:
    c = layout.configs
    _write_networks(layout, folder, dtype, ("model.safetensors", "model.safetensors"))
    _write_json(folder / "unet" / "config.json", {"_type": "unet", **c.unet.to_dict()})
    _write_json(folder / "vae" / "config.json", {"_type": "autoencoder_kl", **c.vae.to_dict()})
    _write_json(folder / "pipeline.json", c.config.to_dict())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_BETA_NAMES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
_COMMON_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
_COMMON_KEYS += ("steps_offset", "timestep_spacing")


def diffusers_scheduler_config(config: PipelineConfig) -> dict[str, Any]:
    """A diffusers scheduler config that ``translate_scheduler`` reads back as exactly ``config``'s schedule,
    prediction and sampling options (the sampler's own class first, then any other); a ValueError if none does."""
    s, p = config.schedule, config.sampling
    spacing = p.span or (p.spacing if p.spacing in ("leading", "linspace", "trailing") else "linspace")
    values: dict[str, Any] = dict(
        num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
        beta_schedule=_BETA_NAMES[s.beta_schedule], trained_betas=list(s.trained_betas) if s.trained_betas else None,
        prediction_type=config.prediction, steps_offset=p.steps_offset, timestep_spacing=spacing,
        rescale_betas_zero_snr=s.rescale_zero_snr, clip_sample=False, set_alpha_to_one=p.final == "zero",
        final_sigmas_type=p.final, use_karras_sigmas=p.spacing == "karras",
        use_exponential_sigmas=p.spacing == "exponential", skip_prk_steps=True,
    )  # fmt: skip
    info = SAMPLER_INFO[p.sampler]
    names = sorted(SCHEDULERS, key=lambda name: name != info.diffusers_name)
    expected = (s, config.prediction, dataclasses.replace(p, steps=50, guidance_scale=7.5))
    for name in names:
        keys = (*_COMMON_KEYS, *SCHEDULERS[name], *(("skip_prk_steps",) if name == "PNDMScheduler" else ()))
        raw = {"_class_name": name, **{k: values[k] for k in keys if k in values}}
        raw |= dict(info.diffusers_config) if name == info.diffusers_name else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if translate_scheduler(raw) == expected:
                return raw
    raise ValueError(
        f"sampling.sampler={p.sampler!r} with spacing={p.spacing!r}, final={p.final!r}: no diffusers scheduler "
        "config reproduces this pipeline.json's sampling; convert to single-file or unnoise instead"
    )


def diffusers_vae_config(c: AutoencoderKLConfig) -> dict[str, Any]:
    """diffusers' ``AutoencoderKL`` config.json for ``c``."""
    n = len(c.block_out_channels)
    blocks = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", **c.to_dict(), **blocks}
