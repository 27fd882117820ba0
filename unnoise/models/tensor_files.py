"""Weights files read and written one tensor at a time, and networks given those tensors without a second copy.

``Checkpoint`` reads a safetensors file through ``safe_open`` (memory-mapped) or a trusted pickle, one tensor at a
time; ``Lazy`` is a tensor not read yet. ``meta_network`` builds a network on the meta device without running its
initialisers, ``load_network`` makes each read tensor, converted to the target dtype, the network's parameter, and
``write_safetensors`` streams tensors to a file: none of them holds a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import mmap
import os
import struct
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn


class Lazy(NamedTuple):
    """A tensor not read yet: its shape, dtype and the call that reads it, ``read(dtype=None)``, which converts a
    floating-point tensor to ``dtype`` (and lets go of what it read)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[..., Tensor]


# -- reading a file --------------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class Checkpoint:
    """The tensors of one weights file, read one at a time: safetensors through ``safe_open`` or, with
    ``allow_pickle``, a pickle (``torch.load``, ``state_dict`` nesting unwrapped); ``global_step`` is the pickle's
    training step, if any. Use it as a context manager.

    safetensors tensors are views of the memory-mapped file: one wanted in the file's dtype costs no copy (its pages
    are read when first used, as diffusers' loader does), and the pages of one converted to another dtype are handed
    back to the page cache once converted (``_release``), so that resident memory holds one copy of the weights."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path} does not exist" if not self.path.exists() else f"{self.path} is not a file"
            )
        self.global_step: int | None = None
        self.metadata: dict[str, str] = {}
        self._file: Any = None
        self._tensors: dict[str, Tensor] | None = None
        self._last: tuple[tuple[str, torch.dtype | None], Tensor] | None = None  # fused q/k/v: read once for three
        if _kind(self.path) == "safetensors":
            self._file = _safe_open(self.path)
            self.metadata = self._file.metadata() or {}
            self.keys = list(self._file.keys())
        else:
            if not allow_pickle:
                raise ValueError(
                    f"{self.path} is a pickle, which can run arbitrary code when loaded; convert it to safetensors "
                    "(unnoise convert FILE OUT.safetensors --to single-file --allow-pickle) or pass allow_pickle=True "
                    "if you trust its source"
                )
            self._tensors = self._unpickle()
            self.keys = list(self._tensors)

    def _unpickle(self) -> dict[str, Tensor]:
        try:  # mapped, as safetensors files are, unless it predates torch.save's zip format
            state = torch.load(self.path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(self.path))
        except Exception as error:  # a pickle can raise anything
            why = f"is not a readable PyTorch pickle (truncated or damaged?): {' '.join(str(error).split())}"
            raise ValueError(f"{self.path} {why}") from error
        if isinstance(state, dict) and isinstance(state.get("global_step"), int):
            self.global_step = state["global_step"]
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{self.path} holds a {type(state).__name__}, not a state dict of tensors")
        return {k: v for k, v in state.items() if isinstance(v, Tensor)}

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if self._tensors is not None:
            return self._tensors[key].dtype
        name = self._file.get_slice(key).get_dtype()
        if name not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}; supported: {sorted(_DTYPES)}")
        return _DTYPES[name]

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor ``key``, a floating-point one converted to ``dtype`` if given."""
        if self._last is not None and self._last[0] == (key, dtype):
            return self._last[1]
        if self._tensors is not None:
            tensor = self._tensors[key]
        else:
            try:
                tensor = self._file.get_tensor(key)
            except SafetensorError as error:
                raise ValueError(f"{self.path}: tensor {key!r} cannot be read: {error}") from error
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            source, tensor = tensor, tensor.to(dtype)
            if self._tensors is None:
                _release(source)
        self._last = ((key, dtype), tensor)
        return tensor

    def lazy(self, rename: Callable[[str], str | None] = lambda k: k) -> dict[str, Lazy]:
        """Every tensor under ``rename(key)`` (None: left out), not read yet."""
        out = {}
        for key in self.keys:
            name = rename(key)
            if name is not None:
                out[name] = Lazy(self.shape(key), self.dtype(key), functools.partial(self.get, key))
        return out

    def close(self) -> None:
        self._file, self._tensors, self._last = None, None, None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kind(path: Path) -> str:
    """ "safetensors" or "pickle" from the first bytes (not the name); other content is an error naming the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip archive, or a legacy pickle
        return "pickle"
    raise ValueError(f"{path} is neither a safetensors file nor a PyTorch pickle (first bytes {head[:8]!r})")


def _safe_open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {error}") from error


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).madvise if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


def _release(tensor: Tensor) -> None:
    """Drop the whole pages of a memory-mapped, unmodified file tensor from this process's resident memory
    (``MADV_DONTNEED``; they stay in the page cache and would be read again from the file if touched)."""
    madvise, page = _madvise(), mmap.PAGESIZE
    if madvise is None:
        return
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


# -- networks ---------------------------------------------------------------------------------------------------------


def meta_network(build: Callable[[], nn.Module]) -> nn.Module:
    """The network on the meta device: its structure and state-dict keys, no memory, no initialisers run."""
    with torch.device("meta"), _no_meta_init():
        return build()


# Layers that initialise their weights when built (``reset_parameters``), and transformers' models (``init_weights``
# in ``post_init``). On the meta device that computes nothing, yet each tensor call goes through the device mode's
# Python hook: building SD 1.5's U-Net, VAE and text encoder took 0.12 s of CPU with the initialisers, 0.04 s without.
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
_PATCHING = threading.Lock()


@contextlib.contextmanager
def _no_meta_init() -> Iterator[None]:
    """Skip the initialisers of modules whose tensors are on the meta device. The methods are patched on their classes
    (as transformers' ``no_init_weights`` does), but a module with real tensors, built by another thread meanwhile,
    still initialises them."""
    targets = [(cls, "reset_parameters") for cls in _LAYERS]
    if "transformers" in sys.modules:  # imported by whoever builds a text encoder
        targets.append((sys.modules["transformers"].PreTrainedModel, "init_weights"))
    with _PATCHING:  # two threads building at once: the second patches after the first has restored
        saved = [(cls, name, cls.__dict__.get(name)) for cls, name in targets]
        for cls, name, _ in saved:
            setattr(cls, name, _unless_meta(getattr(cls, name)))
        try:
            yield
        finally:
            for cls, name, method in saved:
                if method is None:
                    delattr(cls, name)
                else:
                    setattr(cls, name, method)


def _unless_meta(method: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    @functools.wraps(method)
    def run(module: nn.Module) -> Any:
        tensor = next(module.parameters(), None)
        return None if tensor is not None and tensor.is_meta else method(module)

    return run


def text_keys(model: nn.Module) -> dict[str, str]:
    """Our name of each text-encoder tensor -> the model's (transformers < 5 nests the tower under ``text_model.``)."""
    return {k.removeprefix("text_model."): k for k in model.state_dict()}


def check_tensors(
    model: nn.Module, tensors: dict[str, Lazy], *, names: dict[str, str] | None = None, source: str
) -> dict[str, str]:
    """``tensors`` (our names; ``names`` maps them to the model's) are exactly the model's, in its shapes; returns
    ``names``. One error names the first few missing, unexpected or mis-shaped tensors and their count."""
    state = model.state_dict()
    names = names or {k: k for k in state}
    missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    wrong = [
        f"{k} {tensors[k].shape} (expected {tuple(state[names[k]].shape)})"
        for k in tensors
        if k in names and tuple(state[names[k]].shape) != tuple(tensors[k].shape)
    ]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if keys:
            more = " ..." if len(keys) > 5 else ""
            raise ValueError(f"{type(model).__name__} from {source}: {len(keys)} {what} tensors: {keys[:5]}{more}")
    return names


def load_network(
    model: nn.Module, tensors: dict[str, Lazy], *, dtype: torch.dtype, source: str, names: dict[str, str] | None = None
) -> nn.Module:
    """Give a meta-device ``model`` the tensors of ``tensors`` (``check_tensors`` first, so nothing is read in vain),
    read one at a time and converted to ``dtype`` (floating point only): each read tensor becomes the parameter, so
    the file's tensors and the network are never both whole in memory, and nothing is allocated twice."""
    names = check_tensors(model, tensors, names=names, source=source)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    modules = dict(model.named_modules())
    saved = set(model.state_dict())
    loose = [name for name in buffers if name not in saved]

    def assign(name: str, tensor: Tensor) -> None:
        module_name, _, leaf = name.rpartition(".")
        if name in params:
            modules[module_name]._parameters[leaf] = nn.Parameter(tensor, requires_grad=params[name].requires_grad)
        else:
            modules[module_name]._buffers[leaf] = tensor

    with torch.no_grad():
        for key, lazy in tensors.items():
            tensor = lazy.read(dtype)  # floating point only: position ids stay integers
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()  # a part of a bigger tensor (fused q/k/v) gets its own storage
            assign(names[key], tensor)
        for name in loose:  # not saved: rebuilt as the constructor builds them
            if not name.endswith("position_ids"):
                raise ValueError(f"{type(model).__name__}: buffer {name!r} is not saved and cannot be rebuilt")
            shape = buffers[name].shape
            assign(name, torch.arange(shape[-1], dtype=buffers[name].dtype).expand(shape).clone())
    return model.eval()


# -- writing ----------------------------------------------------------------------------------------------------------


def write_safetensors(
    path: str | Path,
    tensors: dict[str, Lazy],
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file reading one tensor at a time (``dtype`` converts the floating-point ones); the file
    appears complete or not at all."""
    path = Path(path)

    def target(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, lazy in tensors.items():
        size = math.prod(lazy.shape) * target(lazy.dtype).itemsize
        header[name] = {
            "dtype": _NAMES[target(lazy.dtype)],
            "shape": list(lazy.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, lazy in tensors.items():
            tensor = lazy.read(target(lazy.dtype)).contiguous()
            if tuple(tensor.shape) != tuple(lazy.shape):
                raise ValueError(f"{name}: read shape {tuple(tensor.shape)}, announced {lazy.shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(partial, path)
