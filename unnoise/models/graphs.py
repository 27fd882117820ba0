"""CUDA graphs for the U-Net: one forward captured per input signature and replayed, so a U-Net call costs one graph
launch instead of one launch per kernel (the default model made about 7,300 per 20-step image on an H100, most of
its latency there: docs/benchmarks/serving.md).

``GraphedUNet(unet)`` keeps the U-Net's call (``x, t, encoder_hidden_states, class_labels`` and the keyword
conditioning) and, for each signature (every input's shape, strides, dtype and device, which optional inputs are
given, inference mode and autocast), captures ``unet(...)`` once into a ``torch.cuda.CUDAGraph`` with static input
buffers, as PyTorch's CUDA-graph notes prescribe: a few warm-up calls on a side stream first (lazy initialization,
cuDNN's algorithm choice), then the capture. Later calls copy their inputs into the buffers, replay, and return a
*clone* of the static output, so an output stays valid whatever runs next; the graphs share one memory pool, which
is safe because replays never overlap (a lock) and each output is copied out before the next replay.

A graph replays the kernels and the weights' addresses it saw. So all graphs are dropped (and recaptured on demand)
when what the network computes may have changed: a LoRA attached, detached, fused or rescaled (``lora.state_key``:
un-fused adapters run in forward hooks that the capture recorded with their scales), or a parameter or buffer moved
to new memory (``.to(device, dtype)``). In-place weight updates (``load_state_dict``, ``copy_``) need nothing: the
graph reads the same memory. Changing a layer's mode (attention, upsampling fusion) needs ``reset()``.

Eager fallback: with gradients enabled, while a feature cache is open (``UNet.caching``), for inputs not on the
U-Net's CUDA device (the CPU), for inputs that are neither tensors nor numbers, and for new signatures once
``max_graphs`` are held (each holds its activations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from unnoise.models import lora

DEFAULT_MAX_GRAPHS = 8  # a server batching up to 8 images at one size: guidance batches 2, 4, ..., 16
WARMUP_CALLS = 3  # PyTorch's CUDA-graph examples warm up three iterations on a side stream
POSITIONAL = ("x", "t", "encoder_hidden_states", "class_labels")  # UNet.forward's positional parameters

log = logging.getLogger(__name__)

# capture(fn, pool) -> (static output, replay, pool): runs ``fn`` into a graph; ``pool`` is shared between graphs
Capture = Callable[[Callable[[], Tensor], Any], tuple[Tensor, Callable[[], None], Any]]


class GraphCaptureError(RuntimeError):
    """A call that ran eagerly could not be captured (an operation that a CUDA graph cannot hold)."""


def capture_cuda_graph(fn: Callable[[], Tensor], pool: Any, warmup: int = WARMUP_CALLS) -> tuple:
    """``fn`` warmed up on a side stream, then captured into a ``torch.cuda.CUDAGraph`` in memory pool ``pool``
    (None: a new one); returns (its static output, the graph's replay, the pool). Errors of the warm-up calls are
    ``fn``'s own and pass through; a failed capture raises ``GraphCaptureError``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: CUDA calls of other threads (a server's request threads) do not invalidate the capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
    except RuntimeError as error:
        raise GraphCaptureError(f"the U-Net could not be captured into a CUDA graph: {error}") from error
    return out, graph.replay, graph.pool()


@dataclasses.dataclass
class GraphStats:
    """What the wrapper did: graphs captured, calls replayed, calls run eagerly, times all graphs were dropped."""

    captured: int = 0
    replayed: int = 0
    eager: int = 0
    invalidated: int = 0


@dataclasses.dataclass
class _Graph:
    inputs: dict[str, Tensor]  # static buffers, by flat name
    output: Tensor
    replay: Callable[[], None]


class GraphedUNet(nn.Module):
    """``unet`` behind CUDA graphs captured per input signature; see the module docstring."""

    def __init__(
        self,
        unet: nn.Module,
        *,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        capture: Capture = capture_cuda_graph,
        device_type: str = "cuda",
    ):
        """``capture`` and ``device_type`` exist for tests: the CPU runs the same bookkeeping with an eager capture."""
        super().__init__()
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs!r} is not allowed; expected an integer >= 1")
        self.unet = unet
        self.max_graphs = max_graphs
        self.stats = GraphStats()
        self._capture, self._device_type = capture, device_type
        self._graphs: dict[tuple, _Graph] = {}
        self._pool: Any = None
        self._state: tuple | None = None
        self._params: list[Tensor] | None = None
        self._buffer_owners: list[nn.Module] = []
        self._lock = threading.Lock()
        self._warned_full = False
        self._uncapturable: set[tuple] = set()  # signatures whose capture failed: eager from then on

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every graph and its memory; the next calls capture again."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._graphs:
            self.stats.invalidated += 1
        self._graphs, self._pool, self._uncapturable = {}, None, set()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        inputs = _flat_inputs(args, kwargs)
        key = self._signature(inputs)
        with self._lock, _on(inputs.get("x")):
            graph = self._graph(key, inputs) if key is not None else None
            if graph is not None:
                for name, value in inputs.items():
                    graph.inputs[name].copy_(value)
                graph.replay()
                self.stats.replayed += 1
                return graph.output.clone()
            self.stats.eager += 1
        return self.unet(*args, **kwargs)

    def _graph(self, key: tuple, inputs: dict[str, Tensor]) -> _Graph | None:
        """The graph of ``key``, captured now if new and there is room; None: run eagerly."""
        self._check_state()
        graph = self._graphs.get(key)
        if graph is None and key in self._uncapturable:
            return None
        if graph is None and len(self._graphs) < self.max_graphs:
            try:
                graph = self._graphs[key] = self._new_graph(inputs)
            except GraphCaptureError as error:
                self._uncapturable.add(key)
                log.warning("%s; inputs %s run eagerly from now on", error, _describe(inputs))
        elif graph is None and not self._warned_full:
            self._warned_full = True
            log.warning(
                "GraphedUNet holds max_graphs=%d graphs; new input signatures run eagerly (raise max_graphs to "
                "capture more)",
                self.max_graphs,
            )
        return graph

    def _signature(self, inputs: dict[str, Any]) -> tuple | None:
        """The graph key of these inputs, or None where they must run eagerly."""
        if torch.is_grad_enabled() or "x" not in inputs or "t" not in inputs:
            return None
        if getattr(self.unet, "feature_cache", None) is not None:
            return None  # feature caching picks its path per call in Python: a graph would replay one of them
        device = _device(self.unet)
        if device is None or device.type != self._device_type:
            return None
        parts = []
        for name, value in inputs.items():
            if not isinstance(value, Tensor):
                return None  # _flat_inputs turned numbers into tensors: something else the graph cannot take
            if value.device != device or value.requires_grad:
                return None
            parts.append((name, tuple(value.shape), value.stride(), value.dtype))
        modes = (torch.is_inference_mode_enabled(), torch.is_autocast_enabled(device.type))
        return (*parts, modes)

    def _check_state(self) -> None:
        """Drop the graphs when a LoRA change or a move of the weights makes them stale."""
        state = (lora.state_key(self.unet), self._addresses())
        if state != self._state:
            self._drop()
            self._state = state

    def _addresses(self) -> tuple:
        """Where every parameter and buffer lives. ``Module.to`` keeps the parameter objects and swaps their data, so
        the list of parameters is kept (walking the modules costs milliseconds per call on SD-1.5) and rebuilt when
        the first parameter is another object; buffers are read from the few modules that hold them."""
        first = next(self.unet.parameters(), None)
        if self._params is None or (self._params and first is not self._params[0]):
            self._params = list(self.unet.parameters())
            self._buffer_owners = [m for m in self.unet.modules() if next(m.buffers(recurse=False), None) is not None]
        tensors = [*self._params, *(b for m in self._buffer_owners for b in m.buffers(recurse=False))]
        # (oneDNN-packed CPU weights have no storage: their tensor object stands for their memory)
        return tuple(t.data_ptr() if t.layout == torch.strided else id(t) for t in tensors)

    def _new_graph(self, inputs: dict[str, Tensor]) -> _Graph:
        static = {
            name: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for name, v in inputs.items()
        }
        for name, value in inputs.items():
            static[name].copy_(value)
        args, kwargs = _call_arguments(static)
        output, replay, self._pool = self._capture(lambda: self.unet(*args, **kwargs), self._pool)
        self.stats.captured += 1
        log.info("captured a CUDA graph of the U-Net for %s (%d held)", _describe(inputs), len(self._graphs) + 1)
        return _Graph(static, output, replay)


def _on(x: Any) -> contextlib.AbstractContextManager:
    """Capture and replay on the inputs' CUDA device, whichever is current."""
    return (
        torch.cuda.device(x.device) if isinstance(x, Tensor) and x.device.type == "cuda" else contextlib.nullcontext()
    )


def _device(module: nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return None if param is None else param.device


def _flat_inputs(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's inputs by name, None left out, a dict argument (``added_cond_kwargs``) flattened to
    ``name.key``, and a number ``t`` as the 0-d tensor the U-Net makes of it."""
    if len(args) > len(POSITIONAL):
        raise TypeError(f"GraphedUNet takes at most {len(POSITIONAL)} positional inputs ({', '.join(POSITIONAL)})")
    named = dict(zip(POSITIONAL, args, strict=False))
    duplicated = sorted(set(named) & set(kwargs))
    if duplicated:
        raise TypeError(f"GraphedUNet got {duplicated} both by position and by name")
    flat: dict[str, Any] = {}
    for name, value in {**named, **kwargs}.items():
        if isinstance(value, dict):
            flat |= {f"{name}.{k}": v for k, v in value.items() if v is not None}
        elif value is not None:
            flat[name] = value
    x, t = flat.get("x"), flat.get("t")
    if isinstance(x, Tensor) and isinstance(t, int | float) and not isinstance(t, bool):
        flat["t"] = torch.as_tensor(t, device=x.device)  # exactly what UNet._embed does with a number
    return flat


def _call_arguments(flat: dict[str, Tensor]) -> tuple[tuple, dict[str, Any]]:
    """``_flat_inputs`` undone: the U-Net's positional inputs and keyword arguments."""
    args = (flat["x"], flat["t"])
    kwargs: dict[str, Any] = {}
    for name, value in flat.items():
        if name in ("x", "t"):
            continue
        outer, _, inner = name.partition(".")
        if inner:
            kwargs.setdefault(outer, {})[inner] = value
        else:
            kwargs[name] = value
    return args, kwargs


def _describe(inputs: dict[str, Tensor]) -> str:
    return ", ".join(f"{name} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for name, v in inputs.items())
