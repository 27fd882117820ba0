"""Weights files read and written one tensor at a time, and networks given those tensors without a second copy.

``Checkpoint`` reads a safetensors file (validated by ``safe_open``, then memory-mapped, each tensor a view of the
map) or a trusted pickle, one tensor at a time; ``Lazy`` is a tensor not read yet. ``meta_network`` builds a network
on the meta device without running its initialisers, ``load_network`` (``Loading``) makes each read tensor, converted
to the target dtype, the network's parameter, and ``write_safetensors`` streams tensors to a file: none of them holds
a second copy of the weights.
"""

from __future__ import annotations

import concurrent.futures
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
    floating-point tensor to ``dtype`` (and lets go of what it read); ``mapped``: ``read()`` gives a view of a
    memory-mapped file, whose pages ``load_network`` hands back once it has converted them."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[..., Tensor]
    mapped: bool = False


# -- reading a file --------------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class Checkpoint:
    """The tensors of one weights file, read one at a time: safetensors (its header read once, the file mapped) or,
    with ``allow_pickle``, a pickle (``torch.load``, ``state_dict`` nesting unwrapped); ``global_step`` is the pickle's
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
        self._file: mmap.mmap | None = None  # the mapped safetensors file, which its tensors view
        self._entries: dict[str, _Entry] = {}
        self._tensors: dict[str, Tensor] | None = None
        self._last: tuple[tuple[str, torch.dtype | None], Tensor] | None = None  # fused q/k/v: read once for three
        if _kind(self.path) == "safetensors":
            with _safe_open(self.path) as checked:  # safetensors validates the header against the file
                self.metadata = checked.metadata() or {}
                self.keys = list(checked.keys())
            self._file, self._entries = _map_safetensors(self.path)
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
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        if self._tensors is not None:
            return self._tensors[key].dtype
        name = self._entries[key].dtype
        if name not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}; supported: {sorted(_DTYPES)}")
        return _DTYPES[name]

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor ``key``, a floating-point one converted to ``dtype`` if given."""
        if self._last is not None and self._last[0] == (key, dtype):
            return self._last[1]
        tensor = self._tensors[key] if self._tensors is not None else self._mapped(key)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            source, tensor = tensor, tensor.to(dtype)
            if self._tensors is None:
                _release(source)
        self._last = ((key, dtype), tensor)
        return tensor

    def _is_view(self, key: str) -> bool:
        """Whether ``get(key)`` is a view of the mapped file (not a copy: misaligned, or from a pickle)."""
        entry = self._entries.get(key)
        return entry is not None and entry.offset % self.dtype(key).itemsize == 0 and math.prod(entry.shape) > 0

    def _mapped(self, key: str) -> Tensor:
        """The tensor ``key`` as a view of the mapped file (its own storage, as safetensors' ``get_tensor`` gives)."""
        entry, dtype = self._entries[key], self.dtype(key)
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        if entry.offset % dtype.itemsize:  # misaligned in the file: an aligned copy
            raw = torch.frombuffer(self._file, dtype=torch.uint8, count=count * dtype.itemsize, offset=entry.offset)
            return raw.clone().view(dtype).view(entry.shape)
        return torch.frombuffer(self._file, dtype=dtype, count=count, offset=entry.offset).view(entry.shape)

    def lazy(self, rename: Callable[[str], str | None] = lambda k: k) -> dict[str, Lazy]:
        """Every tensor under ``rename(key)`` (None: left out), not read yet."""
        out = {}
        for key in self.keys:
            name = rename(key)
            if name is not None:
                read = functools.partial(self.get, key)
                out[name] = Lazy(self.shape(key), self.dtype(key), read, self._is_view(key))
        return out

    def close(self) -> None:
        self._file, self._entries, self._tensors, self._last = None, {}, None, None

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


class _Entry(NamedTuple):
    """A tensor of a safetensors file: its dtype's name there, its shape, where its bytes start in the file."""

    dtype: str
    shape: tuple[int, ...]
    offset: int


def _map_safetensors(path: Path) -> tuple[mmap.mmap, dict[str, _Entry]]:
    """The file mapped copy-on-write (as safetensors maps it for PyTorch: pages are read when first touched, and
    writes to a tensor stay in this process) and its header read once, which ``_safe_open`` has validated. Tensors
    made from the map (``torch.frombuffer``) keep it alive after ``Checkpoint.close``."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + size
    entries = {
        name: _Entry(e["dtype"], tuple(e["shape"]), start + e["data_offsets"][0])
        for name, e in header.items()
        if name != "__metadata__"
    }
    return mapped, entries


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
    _release_span(tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size())


def _release_all(tensors: list[Tensor]) -> None:
    """``_release`` for many tensors of one mapped file, in as few calls as they allow: tensors less than a page
    apart are released as one range. Nothing writes to the mapping while loading, so a page of it that also holds
    bytes of another tensor is read again, unchanged, when that one is touched. (Each call lets go of Python's
    global lock, and a thread waits to get it back while another thread runs Python.)"""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + mmap.PAGESIZE:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        _release_span(start, end)


def _release_span(first: int, last: int) -> None:
    """``MADV_DONTNEED`` on the whole pages in ``[first, last)``."""
    madvise, page = _madvise(), mmap.PAGESIZE
    if madvise is None:
        return
    start, end = -(-first // page) * page, last // page * page
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
        tensor = next((p for p in module._parameters.values() if p is not None), None)  # what parameters() finds first
        return None if tensor is not None and tensor.is_meta else method(module)

    return run


class _Slot(NamedTuple):
    """Where a network holds a tensor: the module, its attribute name, the tensor, whether it is a parameter and
    whether the state dict has it (parameters and persistent buffers)."""

    module: nn.Module
    leaf: str
    tensor: Tensor
    parameter: bool
    saved: bool


def _slots(model: nn.Module) -> dict[str, _Slot]:
    """Every parameter and buffer under its state-dict name, in ``state_dict``'s order: one walk of the modules, which
    ``state_dict`` (detaching each tensor, running hooks) and ``named_parameters`` would each make again."""
    out: dict[str, _Slot] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for leaf, tensor in module._parameters.items():
            if tensor is not None:
                out[prefix + leaf] = _Slot(module, leaf, tensor, True, True)
        transient = module._non_persistent_buffers_set
        for leaf, tensor in module._buffers.items():
            if tensor is not None:
                out[prefix + leaf] = _Slot(module, leaf, tensor, False, leaf not in transient)
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return out


def state_keys(model: nn.Module) -> list[str]:
    """The keys of ``model.state_dict()``, without making it."""
    return [name for name, slot in _slots(model).items() if slot.saved]


def text_keys(model: nn.Module) -> dict[str, str]:
    """Our name of each text-encoder tensor -> the model's (transformers < 5 nests the tower under ``text_model.``)."""
    return {k.removeprefix("text_model."): k for k in state_keys(model)}


def check_tensors(
    model: nn.Module, tensors: dict[str, Lazy], *, names: dict[str, str] | None = None, source: str
) -> dict[str, str]:
    """``tensors`` (our names; ``names`` maps them to the model's) are exactly the model's, in its shapes; returns
    ``names``. One error names the first few missing, unexpected or mis-shaped tensors and their count."""
    return _check(model, _slots(model), tensors, names, source)


def _check(
    model: nn.Module, slots: dict[str, _Slot], tensors: dict[str, Lazy], names: dict[str, str] | None, source: str
) -> dict[str, str]:
    state = {name: slot.tensor for name, slot in slots.items() if slot.saved}
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
    converted to ``dtype`` (floating point only): each read tensor becomes the parameter, so the file's tensors and
    the network are never both whole in memory, and nothing is allocated twice."""
    return Loading(model, tensors, dtype=dtype, source=source, names=names).result()


CONVERT_CHUNK_BYTES = 256 << 20  # converted tensors per call: a bound on the file pages resident at once
_PIECE = 32767  # elements: below at::internal::GRAIN_SIZE, under which PyTorch's elementwise loops run serially


class Loading:
    """A network being given its tensors (``load_network``). Tensors in ``dtype`` already (views of the mapped
    file) are its parameters at once; those to convert are converted in ``worker`` if given, a thread that runs
    the conversions while the caller goes on with other work (building the rest of a pipeline), or else in
    ``result()``. A conversion is a few calls into PyTorch, each converting up to ``CONVERT_CHUNK_BYTES`` of
    tensors without Python's global lock, after which the pages read from the file are handed back
    (``_release``). ``result()`` waits for them and returns the network."""

    def __init__(
        self,
        model: nn.Module,
        tensors: dict[str, Lazy],
        *,
        dtype: torch.dtype,
        source: str,
        names: dict[str, str] | None = None,
        worker: concurrent.futures.Executor | None = None,
    ) -> None:
        self.model = model
        self._slots = slots = _slots(model)
        names = _check(model, slots, tensors, names, source)
        self._pending: list[tuple[_Slot, Tensor, Tensor, bool]] = []  # slot, source, converted, source mapped
        with torch.no_grad():
            for key, lazy in tensors.items():
                slot = slots[names[key]]
                if lazy.dtype.is_floating_point and lazy.dtype != dtype:
                    self._pending.append((slot, lazy.read(), torch.empty(lazy.shape, dtype=dtype), lazy.mapped))
                    continue
                tensor = lazy.read(dtype)  # floating point only: position ids stay integers
                if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                    tensor = tensor.clone()  # a part of a bigger tensor (fused q/k/v) gets its own storage
                _assign(slot, tensor)
        self._future = worker.submit(self._convert) if worker is not None and self._pending else None

    def _convert(self) -> None:
        chunk: list[tuple[_Slot, Tensor, Tensor, bool]] = []
        size = 0
        for item in [*self._pending, None]:
            if chunk and (item is None or size + item[2].nbytes > CONVERT_CHUNK_BYTES):
                # In pieces smaller than PyTorch's grain for parallel loops, so one thread converts: beside the
                # caller's thread that is faster than two threads of PyTorch's pool taking turns on a 2-core CPU
                # (most of the time goes to the first touch of the new pages, not to the conversion)
                pieces = [(c[2].view(-1).split(_PIECE), c[1].reshape(-1).split(_PIECE)) for c in chunk]
                with torch.no_grad():
                    torch._foreach_copy_([d for p in pieces for d in p[0]], [s for p in pieces for s in p[1]])
                _release_all([c[1] for c in chunk if c[3]])
                chunk, size = [], 0
            if item is not None:
                chunk.append(item)
                size += item[2].nbytes

    def wait(self) -> None:
        """Wait for the conversions (an error in them is raised by ``result``)."""
        if self._future is not None:
            concurrent.futures.wait([self._future])

    def result(self) -> nn.Module:
        if self._future is not None:
            self._future.result()
        elif self._pending:
            self._convert()
        with torch.no_grad():
            for slot, _, tensor, _ in self._pending:
                _assign(slot, tensor)
            self._pending = []
            for name, slot in self._slots.items():  # buffers not saved: rebuilt as the constructor builds them
                if slot.saved:
                    continue
                if not name.endswith("position_ids"):
                    raise ValueError(f"{type(self.model).__name__}: buffer {name!r} is not saved and cannot be rebuilt")
                shape = slot.tensor.shape
                _assign(slot, torch.arange(shape[-1], dtype=slot.tensor.dtype).expand(shape).clone())
        return self.model.eval()


def _assign(slot: _Slot, tensor: Tensor) -> None:
    if slot.parameter:
        slot.module._parameters[slot.leaf] = nn.Parameter(tensor, requires_grad=slot.tensor.requires_grad)
    else:
        slot.module._buffers[slot.leaf] = tensor


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
