"""Pipeline folders: ours (``pipeline.json``) and diffusers' Stable Diffusion 1.x/2.x and SDXL folders
(``model_index.json``), loaded whole (``load_folder``) and written (``save_components``); ``Components`` is what any
layout loads into.

Our format is a folder with ``pipeline.json`` (``PipelineConfig``), ``unet/`` and ``vae/`` in our model format
(``unnoise.models.io``) and, for a CLIP text encoder, diffusers-style ``text_encoder/`` and ``tokenizer/`` folders.
The bundled MiniLM encoder is not copied: it loads from its package.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from unnoise.models.io import load_diffusers, load_model, parse_config, read_json, save_model
from unnoise.models.text import CLIPTextEncoder, DualCLIPTextEncoder, MiniLMEncoder, TextEncoder
from unnoise.pipeline.config import PipelineConfig, TextEncoderConfig
from unnoise.pipeline.schedulers import translate_scheduler


@dataclasses.dataclass(frozen=True)
class SingleFileInfo:
    """What a single file was detected to be and how its prediction type was decided (logged; for PNG parameters)."""

    family: str
    prediction: str
    prediction_source: str
    ema: bool = False


@dataclasses.dataclass
class Components:
    """What a pipeline folder holds, loaded; ``unet_weights`` is the file whose hash names the model (a single file:
    the whole file, as AUTOMATIC1111 hashes it); ``single_file`` says what a single file was detected to be."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: TextEncoder
    config: PipelineConfig
    unet_weights: Path | None
    single_file: SingleFileInfo | None = None


def load_folder(folder: Path) -> Components:
    """Our folder (``pipeline.json``) or a diffusers Stable Diffusion folder (``model_index.json``)."""
    return _load_ours(folder) if (folder / "pipeline.json").is_file() else _load_diffusers(folder)


def _load_ours(folder: Path) -> Components:
    path = folder / "pipeline.json"
    config = parse_config(path, PipelineConfig.from_dict, read_json(path))
    te = config.text_encoder
    text_encoder: TextEncoder | DualCLIPTextEncoder
    if te.kind == "minilm":
        text_encoder = MiniLMEncoder.from_package(max_length=te.max_length)
    elif te.kind == "sdxl":
        text_encoder = _dual_clip(folder, with_first=(folder / "text_encoder").is_dir(), clip_skip=te.clip_skip)
    else:
        text_encoder = _clip(folder / "text_encoder", folder / "tokenizer", clip_skip=te.clip_skip)
    unet, vae = load_model(folder / "unet"), load_model(folder / "vae")
    return Components(unet, vae, text_encoder, config, model_weights_file(folder))


# The components a diffusers Stable Diffusion folder lists in model_index.json, each as [library, class].
_DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def listed(index: dict[str, Any], name: str) -> str | None:
    """The class model_index.json lists for component ``name`` ([library, class]); None where it lists none."""
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None else None


def check_model_index(folder: Path, *, sdxl: bool = False) -> dict[str, Any]:
    """model_index.json of a Stable Diffusion 1.x/2.x folder or, with ``sdxl``, also of an SDXL one (CLIP-L and
    OpenCLIP-bigG with its projection; the refiner lists bigG alone); other text-encoder sets are refused, naming
    them."""
    path = folder / "model_index.json"
    index = read_json(path)
    first, second = listed(index, "text_encoder"), listed(index, "text_encoder_2")
    if sdxl and second == "CLIPTextModelWithProjection" and first in ("CLIPTextModel", None):
        needed = ("unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2", *(("tokenizer",) if first else ()))
    elif second is None and first == "CLIPTextModel":
        needed = _DIFFUSERS_COMPONENTS
    else:
        allowed = "Stable Diffusion 1.x/2.x (one CLIPTextModel)"
        allowed += " or SDXL (CLIPTextModel and CLIPTextModelWithProjection)" if sdxl else ""
        raise ValueError(
            f"{folder}: {index.get('_class_name')} with text encoders {first!r} and {second!r} is not supported "
            f"here; allowed: {allowed}"
        )
    missing = [name for name in needed if listed(index, name) is None]
    if missing:
        raise ValueError(
            f"{path}: components {missing} are missing; this folder needs each of {list(needed)} as [library, class]"
        )
    return index


def _load_diffusers(folder: Path) -> Components:
    index = check_model_index(folder, sdxl=True)
    sdxl = listed(index, "text_encoder_2") is not None
    path = folder / "scheduler" / "scheduler_config.json"
    schedule, prediction, sampling = parse_config(path, translate_scheduler, read_json(path))
    zeros = force_zeros(index, sdxl)
    config = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="sdxl" if sdxl else "clip", force_zeros_for_empty_prompt=zeros),
        prediction=prediction,
        schedule=schedule,
        sampling=sampling,
    )
    text_encoder: TextEncoder | DualCLIPTextEncoder
    if sdxl:
        text_encoder = _dual_clip(folder, with_first=listed(index, "text_encoder") is not None)
    else:
        text_encoder = _clip(folder / "text_encoder", folder / "tokenizer")
    unet, vae = load_diffusers(folder / "unet"), load_diffusers(folder / "vae")
    return Components(unet, vae, text_encoder, config, model_weights_file(folder))


def model_weights_file(path: Path) -> Path | None:
    """The file whose sha256 names a model (``Pipeline.model_hash``, AUTOMATIC1111's checkpoint hash): a single file
    itself, else the U-Net weights of our folder layout or of diffusers'; None if there is none."""
    if path.is_file():
        return path
    ours = (path / "pipeline.json").is_file()
    names = ("model.safetensors",) if ours else (*DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.bin")
    return next((path / "unet" / n for n in names if (path / "unet" / n).is_file()), None)


def force_zeros(index: dict[str, Any], sdxl: bool) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` from a diffusers model_index.json (diffusers' default: on)."""
    return sdxl and bool(index.get("force_zeros_for_empty_prompt", True))


def _dual_clip(folder: Path, *, with_first: bool, clip_skip: int = 0) -> DualCLIPTextEncoder:
    """SDXL's two text towers from ``text_encoder(_2)/`` and ``tokenizer(_2)/`` (the refiner has bigG alone)."""
    first = None
    if with_first:
        first = _clip(folder / "text_encoder", folder / "tokenizer", clip_skip=clip_skip, penultimate=True)
    second = _clip(folder / "text_encoder_2", folder / "tokenizer_2", clip_skip=clip_skip, penultimate=True)
    return DualCLIPTextEncoder(first, second)


def _clip(text_encoder: Path, tokenizer: Path, *, clip_skip: int = 0, penultimate: bool = False) -> CLIPTextEncoder:
    """The CLIP text encoder of diffusers-style folders; a missing folder or unreadable weights named (as
    transformers does not)."""
    require_folder(text_encoder)
    if not has_tokenizer(require_folder(tokenizer)):
        raise FileNotFoundError(f"{tokenizer} holds neither tokenizer.json nor vocab.json")
    try:
        return CLIPTextEncoder.from_folder(text_encoder, tokenizer, clip_skip=clip_skip, penultimate=penultimate)
    except SafetensorError as error:
        raise ValueError(f"{text_encoder}: its weights are not a readable safetensors file: {error}") from error


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json"))


def require_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    return folder


def save_components(path: str | Path, parts: Components) -> None:
    """Write our format: ``pipeline.json``, ``unet/``, ``vae/`` and, for CLIP, ``text_encoder/`` and ``tokenizer/``
    (SDXL: also ``text_encoder_2/`` and ``tokenizer_2/``)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(parts.unet, folder / "unet")
    save_model(parts.vae, folder / "vae")
    if parts.config.text_encoder.kind == "clip":
        parts.text_encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        parts.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
    if parts.config.text_encoder.kind == "sdxl":
        for encoder, suffix in ((parts.text_encoder.first, ""), (parts.text_encoder.second, "_2")):
            if encoder is not None:  # the refiner has no first
                encoder.model.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
                encoder.tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
    text = json.dumps(parts.config.to_dict(), indent=2, sort_keys=True) + "\n"
    (folder / "pipeline.json").write_text(text)
