"""Loading and saving pipelines: our ``pipeline.json`` folders and diffusers Stable Diffusion folders.

Our format is a folder with ``pipeline.json`` (``PipelineConfig``), ``unet/`` and ``vae/`` in our model format
(``unnoise.models.io``) and, for a CLIP text encoder, diffusers-style ``text_encoder/`` and ``tokenizer/`` folders.
The bundled MiniLM encoder is not copied: it loads from its package.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from unnoise.models.io import load_diffusers, load_model, parse_config, read_json, save_model
from unnoise.models.text import CLIPTextEncoder, MiniLMEncoder, TextEncoder
from unnoise.pipeline.config import PipelineConfig, TextEncoderConfig
from unnoise.pipeline.schedulers import translate_scheduler

# The embedded default model, shipped as package data: MNIST text-to-image (configs/mnist-*.toml made it).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "mnist-ldm"


@dataclasses.dataclass
class Components:
    """What a pipeline folder holds, loaded; ``unet_weights`` is the file whose hash names the model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: TextEncoder
    config: PipelineConfig
    unet_weights: Path | None


def resolve_model(path: str | Path) -> Path:
    """A model folder: ``"default"`` is the embedded default model (package data), anything else a path; a
    FileNotFoundError names what is missing when it is not a pipeline folder."""
    if str(path) == "default":
        if not (DEFAULT_MODEL / "pipeline.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall unnoise (or run `make "
                "default-model` in a source checkout), or pass --model DIR, a diffusers Stable Diffusion folder or an "
                "unnoise pipeline folder"
            )
        return DEFAULT_MODEL
    folder = _require_folder(Path(path))
    if not any((folder / name).is_file() for name in ("pipeline.json", "model_index.json")):
        raise FileNotFoundError(f"{folder} holds neither pipeline.json (our format) nor model_index.json (diffusers)")
    return folder


def load_components(path: str | Path) -> Components:
    """Load our folder (``pipeline.json``), a diffusers Stable Diffusion folder (``model_index.json``) or "default".

    Errors name the file and what is wrong: FileNotFoundError for a missing one, ValueError for an unreadable one.
    """
    folder = resolve_model(path)
    return _load_ours(folder) if (folder / "pipeline.json").is_file() else _load_diffusers(folder)


def _load_ours(folder: Path) -> Components:
    path = folder / "pipeline.json"
    config = parse_config(path, PipelineConfig.from_dict, read_json(path))
    te = config.text_encoder
    if te.kind == "minilm":
        text_encoder: TextEncoder = MiniLMEncoder.from_package(max_length=te.max_length)
    else:
        text_encoder = _clip(folder / "text_encoder", folder / "tokenizer", clip_skip=te.clip_skip)
    unet, vae = load_model(folder / "unet"), load_model(folder / "vae")
    return Components(unet, vae, text_encoder, config, folder / "unet" / "model.safetensors")


# The components a diffusers Stable Diffusion folder lists in model_index.json, each as [library, class].
_DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _load_diffusers(folder: Path) -> Components:
    path = folder / "model_index.json"
    index = read_json(path)
    missing = [
        name
        for name in _DIFFUSERS_COMPONENTS
        if not (isinstance(index.get(name), list) and len(index[name]) == 2 and index[name][0] is not None)
    ]
    if missing:
        raise ValueError(
            f"{path}: components {missing} are missing; a Stable Diffusion folder lists each of "
            f"{list(_DIFFUSERS_COMPONENTS)} as [library, class]"
        )
    if index.get("text_encoder_2") or index["text_encoder"][1] != "CLIPTextModel":
        raise ValueError(
            f"{folder}: {index.get('_class_name')} with text encoder {index['text_encoder'][1]!r} is not supported; "
            "allowed: Stable Diffusion 1.x/2.x (one CLIPTextModel)"
        )
    path = folder / "scheduler" / "scheduler_config.json"
    schedule, prediction, sampling = parse_config(path, translate_scheduler, read_json(path))
    config = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="clip"), prediction=prediction, schedule=schedule, sampling=sampling
    )
    text_encoder = _clip(folder / "text_encoder", folder / "tokenizer")
    unet, vae = load_diffusers(folder / "unet"), load_diffusers(folder / "vae")
    names = (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    )
    weights = next((folder / "unet" / n for n in names if (folder / "unet" / n).is_file()), None)
    return Components(unet, vae, text_encoder, config, weights)


def _clip(text_encoder: Path, tokenizer: Path, *, clip_skip: int = 0) -> CLIPTextEncoder:
    """The CLIP text encoder of diffusers-style folders; a missing folder or unreadable weights named (as
    transformers does not)."""
    _require_folder(text_encoder)
    if not any((_require_folder(tokenizer) / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"{tokenizer} holds neither tokenizer.json nor vocab.json")
    try:
        return CLIPTextEncoder.from_folder(text_encoder, tokenizer, clip_skip=clip_skip)
    except SafetensorError as error:
        raise ValueError(f"{text_encoder}: its weights are not a readable safetensors file: {error}") from error


def _require_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    return folder


def save_components(path: str | Path, parts: Components) -> None:
    """Write our format: ``pipeline.json``, ``unet/``, ``vae/`` and, for CLIP, ``text_encoder/`` and ``tokenizer/``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(parts.unet, folder / "unet")
    save_model(parts.vae, folder / "vae")
    if parts.config.text_encoder.kind == "clip":
        parts.text_encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        parts.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
    text = json.dumps(parts.config.to_dict(), indent=2, sort_keys=True) + "\n"
    (folder / "pipeline.json").write_text(text)
