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

from unnoise.models.io import load_diffusers, load_model, save_model
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
    """A model folder: ``"default"`` is the embedded default model (package data), anything else a path."""
    if str(path) == "default":
        if not (DEFAULT_MODEL / "pipeline.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall unnoise, or rebuild it with "
                "`make default-model` in a source checkout"
            )
        return DEFAULT_MODEL
    return Path(path)


def load_components(path: str | Path) -> Components:
    """Load our folder (``pipeline.json``), a diffusers Stable Diffusion folder (``model_index.json``) or "default"."""
    folder = resolve_model(path)
    if (folder / "pipeline.json").is_file():
        return _load_ours(folder)
    if (folder / "model_index.json").is_file():
        return _load_diffusers(folder)
    raise FileNotFoundError(f"{folder} holds neither pipeline.json (our format) nor model_index.json (diffusers)")


def _load_ours(folder: Path) -> Components:
    config = PipelineConfig.from_dict(json.loads((folder / "pipeline.json").read_text()))
    te = config.text_encoder
    if te.kind == "minilm":
        text_encoder: TextEncoder = MiniLMEncoder.from_package(max_length=te.max_length)
    else:
        text_encoder = CLIPTextEncoder.from_folder(
            folder / "text_encoder", folder / "tokenizer", clip_skip=te.clip_skip
        )
    unet, vae = load_model(folder / "unet"), load_model(folder / "vae")
    return Components(unet, vae, text_encoder, config, folder / "unet" / "model.safetensors")


def _load_diffusers(folder: Path) -> Components:
    index = json.loads((folder / "model_index.json").read_text())
    needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [name for name in needed if not index.get(name) or index[name][0] is None]
    if missing:
        raise ValueError(f"{folder / 'model_index.json'}: components {missing} are missing; a Stable Diffusion folder")
    if index.get("text_encoder_2") or index["text_encoder"][1] != "CLIPTextModel":
        raise ValueError(
            f"{folder}: {index.get('_class_name')} with text encoder {index['text_encoder'][1]!r} is not supported; "
            "allowed: Stable Diffusion 1.x/2.x (one CLIPTextModel)"
        )
    scheduler_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    schedule, prediction, sampling = translate_scheduler(scheduler_cfg)
    config = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="clip"), prediction=prediction, schedule=schedule, sampling=sampling
    )
    text_encoder = CLIPTextEncoder.from_folder(folder / "text_encoder", folder / "tokenizer")
    unet, vae = load_diffusers(folder / "unet"), load_diffusers(folder / "vae")
    names = (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    )
    weights = next((folder / "unet" / n for n in names if (folder / "unet" / n).is_file()), None)
    return Components(unet, vae, text_encoder, config, weights)


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
