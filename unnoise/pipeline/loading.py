"""Loading pipelines: ``load_components`` takes our ``pipeline.json`` folders, diffusers Stable Diffusion folders
(``unnoise.pipeline.folders``), single files in the original CompVis/Stability layout (``load_single_file``) and
"default", the embedded model. Converting between layouts is ``unnoise.pipeline.convert``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unnoise.models.tensor_files import load_network, text_keys
from unnoise.models.text import CLIPTextEncoder, DualCLIPTextEncoder
from unnoise.pipeline.folders import Components, SingleFileInfo, load_folder, require_folder, save_components
from unnoise.pipeline.layouts import Layout, read_single_file, tokenizer

__all__ = [  # Components, SingleFileInfo and save_components are imported from here too
    "DEFAULT_MODEL",
    "SINGLE_FILE_SUFFIXES",
    "Components",
    "SingleFileInfo",
    "load_components",
    "load_single_file",
    "resolve_model",
    "save_components",
]

# The embedded default model, shipped as package data: MNIST text-to-image (configs/mnist-*.toml made it).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "mnist-ldm"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def resolve_model(path: str | Path) -> Path:
    """A model: ``"default"`` is the embedded default model (package data), a ``.safetensors``/``.ckpt`` file a single
    file, anything else a folder; a FileNotFoundError names what is missing when it is none of these."""
    if str(path) == "default":
        if not (DEFAULT_MODEL / "pipeline.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall unnoise (or run `make "
                "default-model` in a source checkout), or pass --model DIR, a diffusers Stable Diffusion folder or an "
                "unnoise pipeline folder"
            )
        return DEFAULT_MODEL
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise FileNotFoundError(
                f"{path} is a file but not a single-file checkpoint; allowed: {', '.join(SINGLE_FILE_SUFFIXES)}"
            )
        return path
    folder = require_folder(path)
    if not any((folder / name).is_file() for name in ("pipeline.json", "model_index.json")):
        raise FileNotFoundError(f"{folder} holds neither pipeline.json (our format) nor model_index.json (diffusers)")
    return folder


def load_components(path: str | Path) -> Components:
    """Load our folder (``pipeline.json``), a diffusers Stable Diffusion folder (``model_index.json``), a single file
    (``load_single_file`` with its defaults) or "default".

    Errors name the file and what is wrong: FileNotFoundError for a missing one, ValueError for an unreadable one.
    """
    found = resolve_model(path)
    if found.is_file():
        return load_single_file(found)
    return load_folder(found)


def load_single_file(
    path: str | Path,
    *,
    prediction: str | None = None,
    config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    ema: bool = False,
) -> Components:
    """Load a single-file SD 1.x/2.x, SDXL base or refiner (or inpainting) checkpoint, each tensor mapped or converted
    once into its network; SDXL's text encoder is a ``DualCLIPTextEncoder`` (the refiner's has bigG alone).

    ``prediction`` overrides the prediction type, else ``config``'s scheduler decides, else the file
    (``single_file.detect_prediction``); ``config`` is a diffusers or unnoise folder for configs the family's shipped
    ones do not fit; ``dtype`` (default float32) applies to the U-Net and the text encoders, as diffusers'
    ``torch_dtype`` does, and to a VAE without ``force_upcast``, as ``Pipeline.to`` does; ``allow_pickle`` lets a
    ``.ckpt`` load; ``ema`` loads the file's EMA U-Net weights if it has them. What was detected is in
    ``Components.single_file``.
    """
    path = Path(path)
    layout = read_single_file(path, prediction=prediction, config=config, allow_pickle=allow_pickle, ema=ema)
    try:
        unet, vae, texts = _load_networks(layout, dtype or torch.float32, source=str(path))
    finally:
        layout.close()
    sdxl, clip_skip = layout.family.sdxl, layout.configs.config.text_encoder.clip_skip
    encoders = {
        part: CLIPTextEncoder(model, tokenizer(layout, part), clip_skip=clip_skip, penultimate=sdxl)
        for part, model in texts.items()
    }
    encoder = DualCLIPTextEncoder(encoders.get("text_encoder"), encoders["text_encoder_2"]) if sdxl else None
    return Components(unet, vae, encoder or encoders["text_encoder"], layout.configs.config, path, layout.info)


def _load_networks(layout: Layout, dtype: torch.dtype, *, source: str) -> tuple[Any, Any, dict[str, Any]]:
    """The U-Net and the text encoders in ``dtype`` (as diffusers' ``torch_dtype``), the VAE too unless
    ``force_upcast`` (as ``Pipeline.to``)."""
    nets = layout.nets
    vae_dtype = torch.float32 if layout.configs.vae.force_upcast else dtype
    unet = load_network(nets["unet"], layout.tensors["unet"], dtype=dtype, source=source)
    vae = load_network(nets["vae"], layout.tensors["vae"], dtype=vae_dtype, source=source)
    texts = {
        part: load_network(nets[part], layout.tensors[part], dtype=dtype, source=source, names=text_keys(nets[part]))
        for part in layout.configs.texts
    }
    return unet, vae, texts
