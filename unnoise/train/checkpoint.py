"""Crash-safe training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding ``tensors.safetensors`` (weights, EMA, optimizer
moments, RNG states, each under a prefix) and ``state.json`` (step, data position, optimizer hyper-parameters,
the config). It is written into a temporary folder beside it and renamed into place, so a run killed at any
moment leaves either the whole checkpoint or none. Nothing is unpickled when it is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

_NAME = re.compile(r"step_(\d{8})")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(
    out_dir: str | Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], *, keep: int
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}."))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        for f in tmp.iterdir():  # data on disk before the rename makes the checkpoint visible
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        if final.exists():  # the same step written again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name)[1]))  # type: ignore[index]


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and state of one checkpoint folder."""
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "tensors.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs state.json and tensors.safetensors)")
    return load_file(str(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())


def prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state dict split into tensors (per-parameter moments) and JSON (hyper-parameters)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of ``optimizer_parts``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
