"""Loading pipelines: ``load_components`` takes our ``pipeline.json`` folders, diffusers Stable Diffusion folders
(``unnoise.pipeline.folders``), single files in the original CompVis/Stability layout (``load_single_file``) and
the embedded models by name ("default", "lcm"). Converting between layouts is ``unnoise.pipeline.convert``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

import torch

from unnoise.models.tensor_files import Loading, text_keys
from unnoise.models.text import CLIPTextEncoder, DualCLIPTextEncoder
from unnoise.models.unet import UNetConfig
from unnoise.models.vae import AutoencoderKLConfig
from unnoise.pipeline.folders import Components, SingleFileInfo, load_folder, require_folder, save_components
from unnoise.pipeline.layouts import Layout, read_single_file, tokenizer

__all__ = [  # Components, SingleFileInfo and save_components are imported from here too
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "SINGLE_FILE_SUFFIXES",
    "Components",
    "SingleFileInfo",
    "load_components",
    "load_single_file",
    "resolve_model",
    "save_components",
    "vae_dtype",
]

# The embedded default model, shipped as package data: MNIST text-to-image (configs/mnist-*.toml made it).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "mnist-ldm"
# The models shipped as package data, by the name that loads them: the default, and its latent consistency student
# (configs/mnist-lcm.toml: 1-4 steps of the lcm sampler, one U-Net call per step).
EMBEDDED_MODELS = {"default": DEFAULT_MODEL, "lcm": DEFAULT_MODEL.parent / "mnist-lcm"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def resolve_model(path: str | Path) -> Path:
    """A model: a name of ``EMBEDDED_MODELS`` (``"default"``, ``"lcm"``) is that embedded model (package data), a
    ``.safetensors``/``.ckpt`` file a single file, anything else a folder; a FileNotFoundError names what is missing
    when it is none of these."""
    if str(path) in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[str(path)]
        if not (folder / "pipeline.json").is_file():
            raise FileNotFoundError(
                f"the embedded {path} model is missing from {folder}; reinstall unnoise (or run `make "
                "default-model` in a source checkout), or pass --model DIR, a diffusers Stable Diffusion folder or an "
                "unnoise pipeline folder"
            )
        return folder
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
    ``torch_dtype`` does, and to the VAE as ``vae_dtype`` says (as ``Pipeline.to``); ``allow_pickle`` lets a
    ``.ckpt`` load; ``ema`` loads the file's EMA U-Net weights if it has them. What was detected is in
    ``Components.single_file``.
    """
    path = Path(path)
    with _no_collection(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unnoise-load") as worker:
        layout = read_single_file(path, prediction=prediction, config=config, allow_pickle=allow_pickle, ema=ema)
        loads: dict[str, Loading] = {}
        try:
            loads = _start_networks(layout, dtype or torch.float32, source=str(path), worker=worker)
            tokenizers = {part: tokenizer(layout, part) for part in layout.configs.texts}  # while the worker converts
            nets = {name: load.result() for name, load in loads.items()}
        finally:
            for load in loads.values():
                load.wait()
            layout.close()
    sdxl, clip_skip = layout.family.sdxl, layout.configs.config.text_encoder.clip_skip
    encoders = {
        part: CLIPTextEncoder(nets[part], tokenizers[part], clip_skip=clip_skip, penultimate=sdxl)
        for part in layout.configs.texts
    }
    encoder = DualCLIPTextEncoder(encoders.get("text_encoder"), encoders["text_encoder_2"]) if sdxl else None
    text = encoder or encoders["text_encoder"]
    return Components(nets["unet"], nets["vae"], text, layout.configs.config, path, layout.info)


def vae_dtype(unet: UNetConfig, vae: AutoencoderKLConfig, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype in a pipeline whose U-Net runs in ``dtype``: float32 if the VAE config says ``force_upcast``
    and the U-Net is SDXL's (``addition_embed_type="text_time"``), whose VAE overflows in float16, as diffusers' SDXL
    pipelines honour the flag; else ``dtype``, as diffusers' SD 1.x/2.x pipelines and AUTOMATIC1111 run those VAEs
    (their configs carry the flag too: diffusers' ``AutoencoderKL`` defaults it to True, and its SD pipelines ignore
    it)."""
    sdxl = unet.addition_embed_type == "text_time"
    return torch.float32 if vae.force_upcast and sdxl and dtype in (torch.float16, torch.bfloat16) else dtype


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No cyclic garbage collection while loading: building the networks and the tokenizer makes many objects that
    all stay, and a full collection they trigger walks every object of the process (with torch and transformers
    imported) to free none of them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _start_networks(
    layout: Layout, dtype: torch.dtype, *, source: str, worker: concurrent.futures.Executor
) -> dict[str, Loading]:
    """The networks' loads, their conversions run by ``worker``: the U-Net and the text encoders in ``dtype`` (as
    diffusers' ``torch_dtype``), the VAE in ``vae_dtype`` (as ``Pipeline.to``). The VAE starts first: it is the one
    converted from a half-precision SDXL file into float32."""
    nets, tensors = layout.nets, layout.tensors
    vae = vae_dtype(layout.configs.unet, layout.configs.vae, dtype)
    loads = {"vae": Loading(nets["vae"], tensors["vae"], dtype=vae, source=source, worker=worker)}
    loads["unet"] = Loading(nets["unet"], tensors["unet"], dtype=dtype, source=source, worker=worker)
    for part in layout.configs.texts:
        names = text_keys(nets[part])
        loads[part] = Loading(nets[part], tensors[part], dtype=dtype, source=source, names=names, worker=worker)
    return loads
