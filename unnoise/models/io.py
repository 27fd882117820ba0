"""Saving and loading models: our folder format and diffusers model folders. All key renames live here.

Our format is a folder with ``config.json`` (the model's config plus ``"_type"``) and ``model.safetensors``.
A diffusers model folder has ``config.json`` (with ``"_class_name"``) and ``diffusion_pytorch_model.safetensors``
(or ``diffusion_pytorch_model.fp16.safetensors``). Pickled ``.bin`` weights load only with ``allow_pickle=True``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

C = TypeVar("C")

# Our model types: name -> (module, model class, config class, the diffusers class names it reads).
MODELS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "unet": ("unnoise.models.unet", "UNet", "UNetConfig", ("UNet2DModel", "UNet2DConditionModel")),
    "autoencoder_kl": ("unnoise.models.vae", "AutoencoderKL", "AutoencoderKLConfig", ("AutoencoderKL",)),
    "digit_classifier": ("unnoise.models.classifier", "DigitClassifier", "DigitClassifierConfig", ()),
}


def _classes(name: str) -> tuple[type[nn.Module], Any]:
    module_name, model_name, config_name, _ = MODELS[name]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


# Old diffusers/CompVis autoencoder checkpoints name the attention projections differently.
_LEGACY_ATTENTION = [
    (re.compile(r"(\.attentions\.\d+)\.query\."), r"\1.to_q."),
    (re.compile(r"(\.attentions\.\d+)\.key\."), r"\1.to_k."),
    (re.compile(r"(\.attentions\.\d+)\.value\."), r"\1.to_v."),
    (re.compile(r"(\.attentions\.\d+)\.proj_attn\."), r"\1.to_out.0."),
]


def diffusers_key(key: str) -> str:
    """Our state-dict key for a diffusers key: the layouts agree except for legacy attention names."""
    for pattern, repl in _LEGACY_ATTENTION:
        key = pattern.sub(repl, key)
    return key


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` strictly, with errors that name the missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{type(model).__name__} from {source}: missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}"
            f", unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"{type(model).__name__} from {source}: key {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write ``model`` as a folder with ``config.json`` and ``model.safetensors``."""
    name = next((n for n, entry in MODELS.items() if type(model).__name__ == entry[1]), None)
    if name is None:
        raise ValueError(f"{type(model).__name__} is not one of our model types: {[e[1] for e in MODELS.values()]}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_type": name, **model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


def load_model(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Read a folder written by ``save_model``."""
    folder = Path(path)
    config = read_json(folder / "config.json")
    name = config.pop("_type", None)
    if name not in MODELS:
        raise ValueError(f"{folder / 'config.json'}: _type={name!r} is not one of {sorted(MODELS)}")
    model_cls, config_cls = _classes(name)
    model = model_cls(parse_config(folder / "config.json", config_cls.from_dict, config))
    load_state(model, read_safetensors(folder / "model.safetensors"), source=str(folder))
    return model.to(dtype) if dtype is not None else model


def load_diffusers(
    path: str | Path, *, variant: str | None = None, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Read a diffusers model folder (``unet/``, ``vae/`` or a bare model folder) into our module."""
    folder = Path(path)
    config = read_json(folder / "config.json")
    class_name = config.get("_class_name")
    name = next((n for n, entry in MODELS.items() if class_name in entry[3]), None)
    if name is None:
        known = sorted(c for entry in MODELS.values() for c in entry[3])
        raise ValueError(f"{folder / 'config.json'}: _class_name={class_name!r} is not supported; supported: {known}")
    model_cls, config_cls = _classes(name)
    model = model_cls(parse_config(folder / "config.json", config_cls.from_diffusers, config))
    weights = _diffusers_weights(folder, variant, allow_pickle)
    state = {diffusers_key(k): v for k, v in weights.items()}
    load_state(model, state, source=str(folder))
    return model.to(dtype) if dtype is not None else model


def _diffusers_weights(folder: Path, variant: str | None, allow_pickle: bool) -> dict[str, torch.Tensor]:
    infix = f".{variant}" if variant else ""
    names = [f"diffusion_pytorch_model{infix}.safetensors"]
    if variant is None:
        names.append("diffusion_pytorch_model.fp16.safetensors")
    for name in names:
        if (folder / name).exists():
            return read_safetensors(folder / name)
    pickled = folder / f"diffusion_pytorch_model{infix}.bin"
    if pickled.exists():
        if not allow_pickle:
            raise ValueError(
                f"{pickled} is a pickle, which can run arbitrary code when loaded; convert it to safetensors "
                "or pass allow_pickle=True if you trust its source"
            )
        return torch.load(pickled, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{folder / names[0]} does not exist (nor {', '.join([*names[1:], pickled.name])})")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a UTF-8 file; errors name the file and what is wrong with it."""
    _require_file(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object (it holds a {type(data).__name__})")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); errors name the file and what is wrong with it."""
    _require_file(path)
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error


def parse_config(path: Path, parse: Callable[[dict[str, Any]], C], data: dict[str, Any]) -> C:
    """``parse(data)``, the config read from ``path``; a ValueError names the file (in full, once)."""
    try:
        return parse(data)
    except ValueError as error:
        raise ValueError(f"{path}: {str(error).removeprefix(f'{path.name}: ')}") from error
