"""LoRA: low-rank updates of a network's linear and convolution layers (Hu et al. 2021), read from the kohya /
AUTOMATIC1111 and the diffusers / PEFT file formats, stacked, scaled, fused and trained.

A LoRA on a layer with weight ``W`` adds ``s * (alpha / rank) * B A`` to it: ``A`` ("down", rank x in, a conv's
kernel for LyCORIS LoCon) and ``B`` ("up", out x rank, 1x1 for a conv). Un-fused, a forward hook adds
``s * (alpha / rank) * B(A(x))`` to the layer's output and the base weights stay untouched; fused, the products are
added into the weights once, and ``unfuse`` puts back the bits saved before (not a subtraction).

The pieces:

- ``read_lora(path)`` / ``parse_lora(tensors, metadata)``: a file into a ``LoRAFile``, every key accounted for. The
  format is detected from the keys; a key that belongs to no known format is an error naming it (and the count).
- ``LoRAAdapter``: one adapter's layers as an ``nn.Module`` (the trainer optimizes its parameters), keyed by the
  kohya name of each target (``lora_unet_down_blocks_0_...``), and ``save_lora`` writing it in either format.
- ``attach`` / ``detach`` / ``set_scales`` / ``fuse`` / ``unfuse`` on a network (``UNet``, a text encoder's
  transformers model): the network keeps its adapters by name, each with its own scale, and never registers their
  tensors as its own (its ``state_dict`` stays the base model's).
- ``lora_disabled()``: a context in which the networks run without their adapters on the current thread (the safety
  filter encodes prompts with the base text encoder while another thread generates with a LoRA): un-fused the hooks
  add nothing, fused they subtract what fusing added (the base output up to float rounding).

Kohya files name a module by its dotted path with every dot replaced by ``_`` (``down_blocks.0.attentions.0`` ->
``down_blocks_0_attentions_0``); the path is found by building that flat name for every layer of the network.
Text encoders saved from transformers before 5.x carry a ``text_model`` level that 5.x's CLIP no longer has; both
spellings match, and ``save_lora`` writes CLIP's layers with it (what AUTOMATIC1111 and kohya read).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from unnoise.files import file_sha256
from unnoise.models.packing import Conv2d as PackedConv2d

LORA_FORMATS = ("kohya", "diffusers")
# Network names inside a pipeline, as the file formats prefix them.
NETWORKS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_PREFIXES["lora_te_"] = "text_encoder"  # one text encoder (SD 1.x/2.x); checked after lora_te1_/lora_te2_
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights writes ranks and alphas (JSON)
# Which layers a new adapter targets, by the last part of their path (``LoRAAdapter.create``).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SHOWN = 5  # keys named in an error
_CLIP_LAYERS = "encoder.layers."  # a CLIP text encoder's layers in transformers >= 5 (BERT's are encoder.layer.)

_DISABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_disabled", default=False)


class LoRAWarning(UserWarning):
    """Keys of a LoRA file that match no layer of the network, loaded with ``strict=False``."""


def _some(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"{len(keys)} keys: {', '.join(repr(k) for k in keys[:SHOWN])}{more}"


# -- files ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """One layer's update as a file stores it: ``down`` (rank, in[, kh, kw]), ``up`` (out, rank[, 1, 1]), and
    ``alpha`` (the file's, or the rank where it has none: scale 1)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclasses.dataclass
class LoRAFile:
    """A parsed LoRA file: per network (``NETWORKS``), the layers' updates by name. Kohya names are flat (``_``
    for every dot, resolved against the network when attached); diffusers names are dotted module paths."""

    format: str  # "kohya" or "diffusers"
    networks: dict[str, dict[str, LoRAWeights]]
    metadata: dict[str, str]
    use_rslora: dict[str, bool] = dataclasses.field(default_factory=dict)  # per network: scale alpha / sqrt(rank)

    @property
    def flat_names(self) -> bool:
        return self.format == "kohya"


def read_lora(path: str | Path, *, allow_pickle: bool = False, network: str = "unet") -> LoRAFile:
    """Read a LoRA file (``.safetensors``; a pickled ``.ckpt`` / ``.pt`` / ``.bin`` only with ``allow_pickle=True``).
    ``network`` names the network of a bare file whose keys carry no network prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.suffix.lower() != ".safetensors":
        if not allow_pickle:
            raise ValueError(
                f"LoRA file {path} is not .safetensors: a pickle can run arbitrary code when loaded; convert it to "
                "safetensors or pass allow_pickle=True if you trust its source"
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"LoRA file {path}: the pickle does not hold a dict of tensors")
        metadata: dict[str, str] = {}
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as error:
            raise ValueError(f"LoRA file {path} is not a readable safetensors file: {error}") from error
    try:
        return parse_lora(state, metadata, network=network)
    except ValueError as error:
        raise ValueError(f"LoRA file {path}: {error}") from None


def parse_lora(
    state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *, network: str = "unet"
) -> LoRAFile:
    """Split a LoRA state dict into per-network layer updates; the format is detected from the keys."""
    metadata = dict(metadata or {})
    if not state:
        raise ValueError("it holds no tensors")
    keys = sorted(state)
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return _parse_kohya(state, metadata)
    if any(_PEFT_KEY.match(k) for k in keys):
        return _parse_peft(state, metadata, network)
    raise ValueError(
        f"its format is not understood ({_some(keys)}); allowed: kohya/AUTOMATIC1111 (lora_unet_..., lora_te_... "
        "with .lora_down.weight, .lora_up.weight, .alpha) or diffusers/PEFT (unet.<module>.lora_A.weight, "
        ".lora_B.weight)"
    )


def _parse_kohya(state: Mapping[str, Tensor], metadata: dict[str, str]) -> LoRAFile:
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    named: dict[tuple[str, str], tuple[str, float | None]] = {}  # the key stem as the file spells it; alpha: its own
    unknown = []
    for key, value in state.items():
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        name, _, suffix = key.partition(".")
        if prefix is None or suffix not in KOHYA_SUFFIXES:
            unknown.append(key)
            continue
        layer = (KOHYA_PREFIXES[prefix], name.removeprefix(prefix))
        parts.setdefault(layer, {})[KOHYA_SUFFIXES[suffix]] = value
        named[layer] = (name, None)
    if unknown:
        raise ValueError(
            f"{_some(sorted(unknown))} are not kohya LoRA keys (lora_unet_/lora_te_/lora_te1_/lora_te2_<module> with "
            ".lora_down.weight, .lora_up.weight or .alpha; LoHa, LoKr, DoRA and other LyCORIS types are not supported)"
        )
    return LoRAFile("kohya", _pairs(parts, named), metadata)


def _parse_peft(state: Mapping[str, Tensor], metadata: dict[str, str], default_network: str) -> LoRAFile:
    config = _peft_metadata(metadata)
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match:
            path, which = match["path"], "down" if match["which"] == "A" else "up"
        elif key.endswith(".alpha"):
            path, which = key.removesuffix(".alpha"), "alpha"
        else:
            unknown.append(key)
            continue
        head, _, rest = path.partition(".")
        net, path = (head, rest) if head in NETWORKS and rest else (default_network, path)
        parts.setdefault((net, path), {})[which] = value
    if unknown:
        raise ValueError(
            f"{_some(sorted(unknown))} are not diffusers/PEFT LoRA keys (<module>.lora_A.weight, .lora_B.weight, "
            "optionally .alpha; lora_B biases and DoRA magnitudes are not supported)"
        )
    named = {(net, path): (f"{net}.{path}", _peft_alpha(config, net, path)) for net, path in parts}
    rslora = {net: bool(config.get(f"{net}.use_rslora", False)) for net, _ in parts}
    return LoRAFile("diffusers", _pairs(parts, named), metadata, rslora)


def _peft_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"its metadata {PEFT_METADATA_KEY!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"its metadata {PEFT_METADATA_KEY!r} is not a JSON object")
    return config


def _peft_alpha(config: dict[str, Any], net: str, path: str) -> float | None:
    """The alpha PEFT uses for module ``path``: its ``alpha_pattern`` entry (a regex on the path's tail, as PEFT
    matches it), else ``lora_alpha``; None where the metadata gives none (then alpha = rank, scale 1)."""
    pattern = config.get(f"{net}.alpha_pattern") or {}
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    alpha = config.get(f"{net}.lora_alpha")
    return float(alpha) if alpha is not None else None


def _pairs(
    parts: dict[tuple[str, str], dict[str, Tensor]], named: dict[tuple[str, str], tuple[str, float | None]]
) -> dict[str, dict[str, LoRAWeights]]:
    """Each layer's tensors as ``LoRAWeights`` by network and name; every incomplete or malformed layer is named (the
    first few, and their count) in one ValueError. ``named`` gives each layer's name in the file and its alpha."""
    networks: dict[str, dict[str, LoRAWeights]] = {}
    problems = []
    for (net, name), tensors in sorted(parts.items()):
        shown, alpha = named[(net, name)]
        problem = _pair_problem(shown, tensors)
        if problem:
            problems.append(problem)
            continue
        networks.setdefault(net, {})[name] = _weights(tensors, alpha)
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise ValueError(
            f"{len(problems)} layers are not a LoRA pair (down: rank x in[ x kh x kw], up: out x rank[ x 1 x 1], "
            f"both needed): {'; '.join(problems[:SHOWN])}{more}"
        )
    return networks


def _pair_problem(name: str, tensors: dict[str, Tensor]) -> str | None:
    """Why a layer's tensors are not a low-rank pair (None if they are)."""
    missing = [part for part in ("down", "up") if part not in tensors]
    if missing:
        return f"layer {name!r} has no {' and no '.join(missing)} weight"
    down, up = tensors["down"], tensors["up"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        return f"layer {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a low-rank pair"
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        return f"layer {name!r}: up {tuple(up.shape)} must be a 1x1 kernel"
    alpha = tensors.get("alpha")
    if alpha is not None and (alpha.numel() != 1 or not math.isfinite(alpha.float().item())):
        shown = alpha.tolist() if alpha.numel() < SHOWN else f"of shape {tuple(alpha.shape)}"
        return f"layer {name!r}: alpha {shown} is not one finite number"
    return None


def _weights(tensors: dict[str, Tensor], alpha: float | None) -> LoRAWeights:
    down, up = tensors["down"], tensors["up"]
    if "alpha" in tensors:
        alpha = float(tensors["alpha"].float().item())
    return LoRAWeights(down, up, down.shape[0] if alpha is None else alpha)


def tensor_data_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a safetensors file's bytes after its header: kohya's ``sshs_model_hash`` and AUTOMATIC1111's
    "addnet" hash, which do not change when the metadata does."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_hash(path: str | Path) -> str:
    """The short hash AUTOMATIC1111 records for a LoRA in "Lora hashes": the first 12 hex digits of
    ``tensor_data_sha256`` for a safetensors file (a ``sshs_model_hash`` in its metadata, as kohya's trainer writes
    it, is taken as is), of the sha256 of the whole file otherwise."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return file_sha256(path)[:12]
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        metadata = json.loads(f.read(header) or b"{}").get("__metadata__") or {}
    if metadata.get("sshs_model_hash"):
        return str(metadata["sshs_model_hash"])[:12]
    return tensor_data_sha256(path)[:12]


# -- layers and adapters ----------------------------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """One target layer's update: ``down`` and ``up`` parameters, ``alpha``, and how it runs on the layer's input
    (``kind``: "linear" on (..., in), "conv" on (B, in, H, W) with the layer's stride and padding)."""

    def __init__(
        self,
        down: Tensor,
        up: Tensor,
        alpha: float,
        *,
        kind: str,
        stride: tuple[int, int] = (1, 1),
        padding: Any = (0, 0),
        rslora: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        self.alpha, self.kind, self.stride, self.padding = float(alpha), kind, stride, padding
        self.rslora, self.dropout = rslora, dropout

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` for rank-stabilized LoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def forward(self, x: Tensor) -> Tensor:
        """``factor * B(A(x))`` for the layer's input ``x``, in ``x``'s dtype."""
        down, up = self.down, self.up
        h = x.to(down.dtype)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        if self.kind == "conv":
            h = F.conv2d(h, down, None, self.stride, self.padding)
            h = F.conv2d(h, up)
        else:
            h = F.linear(F.linear(h, down.flatten(1)), up.flatten(1))
        return (h * self.factor).to(x.dtype)

    def weight_delta(self) -> Tensor:
        """The update of the layer's weight in float32: ``factor * B A`` shaped as the conv kernel or the matrix."""
        product = self.up.detach().flatten(1).float() @ self.down.detach().flatten(1).float()
        if self.kind == "conv":
            product = product.view(self.up.shape[0], *self.down.shape[1:])
        return product * self.factor


class LoRAAdapter(nn.Module):
    """One adapter: its layers keyed by the kohya name of their target (``lora_unet_<path with _>``,
    ``lora_te_...``), with the dotted path of each target in ``targets``. Attached to networks with ``attach``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.targets: dict[str, tuple[str, str]] = {}  # kohya name -> (network, dotted module path)
        self.metadata: dict[str, str] = {}

    def add(self, network: str, path: str, layer: LoRALayer) -> None:
        key = kohya_name(network, path)
        self.layers[key] = layer
        self.targets[key] = (network, path)

    def of(self, network: str) -> dict[str, LoRALayer]:
        """This adapter's layers on ``network`` by dotted module path."""
        return {path: self.layers[key] for key, (net, path) in self.targets.items() if net == network}

    def counts(self) -> dict[str, int]:
        """How many layers of each network this adapter updates."""
        out: dict[str, int] = {}
        for net, _ in self.targets.values():
            out[net] = out.get(net, 0) + 1
        return out

    def __deepcopy__(self, memo: dict) -> LoRAAdapter:
        copy = LoRAAdapter()
        memo[id(self)] = copy
        for key, layer in self.layers.items():
            copy.layers[key] = _copy_layer(layer)
        copy.targets, copy.metadata = dict(self.targets), dict(self.metadata)
        copy.train(self.training)
        return copy

    @classmethod
    def create(
        cls,
        networks: Mapping[str, nn.Module],
        *,
        rank: int,
        alpha: float,
        targets: tuple[str, ...] = ATTENTION_TARGETS,
        convs: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> LoRAAdapter:
        """A new adapter for training: one layer per linear layer of ``networks`` whose path ends in one of
        ``targets`` (and, with ``convs``, per conv layer with a kernel larger than 1x1: LoCon), ``down`` drawn as
        PEFT does (Kaiming-uniform) and ``up`` zero, so it starts as the identity."""
        adapter = cls()
        for net, module in networks.items():
            for path, layer in module.named_modules():
                is_conv = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
                wanted = any(path == t or path.endswith("." + t) for t in targets)
                if not ((wanted and isinstance(layer, (nn.Linear, nn.Conv2d))) or (convs and is_conv)):
                    continue
                w = layer.weight
                shape = (rank, *w.shape[1:]) if isinstance(layer, nn.Conv2d) else (rank, w.shape[1])
                down = torch.empty(shape, dtype=torch.float32)
                bound = 1 / math.sqrt(down[0].numel())  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
                down.uniform_(-bound, bound, generator=generator)
                up = torch.zeros((w.shape[0], rank, *((1, 1) if down.ndim == 4 else ())), dtype=torch.float32)
                adapter.add(net, path, _layer_for(layer, down, up, alpha, dropout=dropout))
        if not adapter.layers:
            raise ValueError(f"no layer of {sorted(networks)} matches targets={list(targets)} (convs={convs})")
        return adapter


def _copy_layer(layer: LoRALayer) -> LoRALayer:
    down, up = layer.down.detach().clone(), layer.up.detach().clone()
    copy = LoRALayer(
        down,
        up,
        layer.alpha,
        kind=layer.kind,
        stride=layer.stride,
        padding=layer.padding,
        rslora=layer.rslora,
        dropout=layer.dropout,
    )
    copy.down.requires_grad_(layer.down.requires_grad)
    copy.up.requires_grad_(layer.up.requires_grad)
    return copy


def kohya_name(network: str, path: str) -> str:
    """The kohya key stem of a network's module: ``lora_unet_down_blocks_0_...`` (``lora_te_`` for the first text
    encoder, ``lora_te2_`` for the second)."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[network]
    return prefix + path.replace(".", "_")


def _layer_for(target: nn.Module, down: Tensor, up: Tensor, alpha: float, **kwargs: Any) -> LoRALayer:
    if isinstance(target, nn.Conv2d) and not _is_token_conv(target):
        if down.ndim == 2:  # a linear-shaped pair on a 1x1 convolution (``_check_shape`` allows it): as 1x1 kernels
            down, up = down[:, :, None, None], up[:, :, None, None]
        return LoRALayer(down, up, alpha, kind="conv", stride=target.stride, padding=target.padding, **kwargs)
    return LoRALayer(down, up, alpha, kind="linear", **kwargs)


def _is_token_conv(module: nn.Module) -> bool:
    from unnoise.models.packing import TokenConv2d

    return isinstance(module, TokenConv2d)


def _check_shape(name: str, target: nn.Module, w: LoRAWeights) -> str | None:
    """Why ``w`` does not fit ``target`` (None if it does)."""
    weight = target.weight
    out, fan_in = weight.shape[0], weight.shape[1:]
    if isinstance(target, nn.Conv2d) and not _is_token_conv(target):
        expected = (w.rank, *fan_in)
        if tuple(w.down.shape) != expected and not (w.down.ndim == 2 and target.kernel_size == (1, 1)):
            return f"{name}: down {tuple(w.down.shape)} does not fit the conv {tuple(weight.shape)} (needs {expected})"
    elif w.down.flatten(1).shape[1] != math.prod(fan_in) or (w.down.ndim == 4 and w.down.shape[2:] != (1, 1)):
        return f"{name}: down {tuple(w.down.shape)} does not fit the layer {tuple(weight.shape)}"
    if w.up.shape[0] != out:
        return f"{name}: up {tuple(w.up.shape)} does not fit the layer's {out} outputs"
    return None


def lora_targets(network: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``network`` a LoRA may update (linear and 2-D convolution), by dotted path."""
    return {path: m for path, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and path}


def adapter_from_file(
    file: LoRAFile, networks: Mapping[str, nn.Module], *, strict: bool = True, source: str = "the LoRA"
) -> LoRAAdapter:
    """An adapter holding ``file``'s layers for the targets found in ``networks`` (network name -> module).

    Every layer must find its target with a matching shape; a network the file names but ``networks`` lacks, a layer
    without a target and a shape mismatch are ValueErrors naming the first few keys and their count. With
    ``strict=False`` layers without a target (and networks not present) are left out with one ``LoRAWarning`` that
    says the same; shape mismatches stay errors."""
    adapter = LoRAAdapter()
    adapter.metadata = dict(file.metadata)
    unmatched: list[str] = []
    wrong: list[str] = []
    for net, layers in file.networks.items():
        if net not in networks:
            unmatched += [f"{net}: {name}" for name in layers]
            continue
        targets = lora_targets(networks[net])
        lookup = _flat_lookup(targets) if file.flat_names else _dotted_lookup(targets)
        for name, weights in layers.items():
            path = lookup(name)
            if path is None:
                unmatched.append(f"{net}: {name}")
                continue
            problem = _check_shape(f"{net}: {name}", targets[path], weights)
            if problem:
                wrong.append(problem)
                continue
            layer = _layer_for(
                targets[path],
                weights.down.float(),
                weights.up.float(),
                weights.alpha,
                rslora=file.use_rslora.get(net, False),
            )
            adapter.add(net, path, layer.requires_grad_(False))
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} layers have the wrong shape: {'; '.join(wrong[:SHOWN])}")
    if unmatched:
        message = (
            f"{source}: {_some(unmatched)} match no layer of the model "
            f"(networks here: {', '.join(sorted(networks))}); is it for another model family?"
        )
        if strict:
            raise ValueError(message + " Pass strict=False to load the rest.")
        warnings.warn(message + " They were left out (strict=False).", LoRAWarning, stacklevel=3)
    if not adapter.layers:
        raise ValueError(f"{source}: no layer matches this model")
    return adapter


def _text_model_aliases(name: str, sep: str) -> list[str]:
    head = f"text_model{sep}"
    return [name, name.removeprefix(head)] if name.startswith(head) else [name, head + name]


def _flat_lookup(targets: dict[str, nn.Module]):
    flat = {path.replace(".", "_"): path for path in targets}
    return lambda name: next((flat[n] for n in _text_model_aliases(name, "_") if n in flat), None)


def _dotted_lookup(targets: dict[str, nn.Module]):
    return lambda name: next((n for n in _text_model_aliases(name, ".") if n in targets), None)


# -- attaching to a network -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Attached:
    adapter: LoRAAdapter
    network: str
    scale: float


class _Registry:
    """What a network holds: its adapters by name (in loading order), the targets' hooks, and the base weights
    saved while fused."""

    def __init__(self) -> None:
        self.adapters: dict[str, _Attached] = {}
        self.hooks: dict[str, Any] = {}  # module path -> hook handle
        self.saved: dict[str, Tensor] | None = None  # module path -> base weight while fused
        self.version = 0


def _registry(network: nn.Module, create: bool = False) -> _Registry | None:
    registry = network.__dict__.get("_lora_registry")
    if registry is None and create:
        registry = network.__dict__["_lora_registry"] = _Registry()
    return registry


def attach(network: nn.Module, adapter: LoRAAdapter, *, name: str, net: str = "unet", scale: float = 1.0) -> int:
    """Add ``adapter``'s layers for network ``net`` to ``network`` (un-fused, at ``scale``) under ``name``; returns
    how many layers received it. The adapter's parameters are shared, not copied: training them moves the output."""
    _check_scale(name, scale)
    registry = _registry(network, create=True)
    if name in registry.adapters:
        raise ValueError(f"adapter name={name!r} is already loaded; loaded: {sorted(registry.adapters)}")
    if registry.saved is not None:
        raise ValueError(f"cannot add adapter {name!r} while LoRAs are fused; call unfuse_lora() first")
    layers = adapter.of(net)
    modules = dict(network.named_modules())
    missing = [path for path in layers if path not in modules]
    if missing:
        raise ValueError(f"adapter {name!r}: {_some(missing)} are not layers of this {type(network).__name__}")
    registry.adapters[name] = _Attached(adapter, net, float(scale))
    for path in layers:
        if path not in registry.hooks:
            registry.hooks[path] = modules[path].register_forward_hook(_hook(registry, net, path))
            modules[path].__dict__["_lora_hooked"] = True
    registry.version += 1
    return len(layers)


def _hook(registry: _Registry, net: str, path: str):
    def add_updates(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        # un-fused: add the updates (nothing inside ``lora_disabled``); fused, the weights hold them: nothing, and
        # inside ``lora_disabled`` subtract them again (the base output up to float rounding)
        fused = registry.saved is not None
        if fused != _DISABLED.get():
            return output
        sign = -1.0 if fused else 1.0
        x = args[0]
        key = kohya_name(net, path)
        for attached in registry.adapters.values():
            layer = attached.adapter.layers[key] if key in attached.adapter.layers else None
            if layer is None or attached.scale == 0 or attached.network != net:
                continue
            if layer.down.device != x.device:
                layer.to(x.device)
            delta = layer(x)
            if torch.is_grad_enabled():
                output = output + sign * attached.scale * delta
            else:
                output = output.add_(delta, alpha=sign * attached.scale)
        return output

    return add_updates


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` (a layer) carries a LoRA hook that adds to its output: a layer whose owner would bypass
    its forward (a fused upsampler's conv) must then call it."""
    return "_lora_hooked" in module.__dict__


def detach(network: nn.Module, name: str | None = None) -> list[str]:
    """Remove adapter ``name`` (every adapter with None) from ``network``, unfusing first; returns the names
    removed."""
    registry = _registry(network)
    if registry is None or not registry.adapters:
        if name is None:
            return []
        raise ValueError(f"adapter name={name!r} is not loaded; loaded: none")
    if name is not None and name not in registry.adapters:
        raise ValueError(f"adapter name={name!r} is not loaded; loaded: {sorted(registry.adapters)}")
    if registry.saved is not None:
        unfuse(network)
    names = [name] if name is not None else list(registry.adapters)
    for n in names:
        del registry.adapters[n]
    still = {path for a in registry.adapters.values() for path in a.adapter.of(a.network)}
    modules = dict(network.named_modules())
    for path in [p for p in registry.hooks if p not in still]:
        registry.hooks.pop(path).remove()
        modules[path].__dict__.pop("_lora_hooked", None)
    registry.version += 1
    return names


def loaded(network: nn.Module) -> dict[str, float]:
    """The adapters on ``network`` and their scales, in loading order."""
    registry = _registry(network)
    return {n: a.scale for n, a in registry.adapters.items()} if registry else {}


def state_key(network: nn.Module) -> tuple:
    """A value that changes whenever what the LoRAs add to ``network`` may change (for caches of its outputs)."""
    registry = _registry(network)
    if registry is None:
        return (_DISABLED.get(),)
    scales = tuple((n, a.scale) for n, a in registry.adapters.items())
    return (_DISABLED.get(), registry.version, registry.saved is not None, scales)


def held_bytes(network: nn.Module) -> int:
    """Bytes the LoRAs on ``network`` hold beside its own parameters: the adapters' layers for it and, while fused,
    the base weights kept for ``unfuse`` (the memory planner adds them to the network's resident bytes)."""
    registry = _registry(network)
    if registry is None:
        return 0
    tensors = {
        id(p): p
        for a in registry.adapters.values()
        for layer in a.adapter.of(a.network).values()
        for p in layer.parameters()
    }
    tensors |= {id(t): t for t in (registry.saved or {}).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def set_scales(network: nn.Module, scales: Mapping[str, float]) -> None:
    """Set the scale of the named adapters (0 switches one off); the others keep theirs."""
    registry = _registry(network)
    names = sorted(registry.adapters) if registry else []
    for name, scale in scales.items():
        if name not in names:
            raise ValueError(f"adapter name={name!r} is not loaded; loaded: {names or 'none'}")
        _check_scale(name, scale)
    if registry is None:  # nothing loaded and nothing asked
        return
    if registry.saved is not None and any(registry.adapters[n].scale != s for n, s in scales.items()):
        raise ValueError("cannot change LoRA scales while fused; call unfuse_lora() first")
    for name, scale in scales.items():
        registry.adapters[name].scale = float(scale)
    registry.version += 1


def _check_scale(name: str, scale: Any) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale of adapter {name!r}={scale!r} is not allowed; allowed: a finite number")


def fuse(network: nn.Module) -> int:
    """Add every adapter's update, at its scale, into the weights of its layers (saving the base weights first);
    returns the number of layers changed. Generation then costs what the base model costs."""
    registry = _registry(network)
    if registry is None or registry.saved is not None:
        return 0
    modules = dict(network.named_modules())
    deltas: dict[str, Tensor] = {}
    for attached in registry.adapters.values():
        if attached.scale == 0:
            continue
        for path, layer in attached.adapter.of(attached.network).items():
            delta = layer.weight_delta() * attached.scale
            deltas[path] = deltas[path] + delta if path in deltas else delta
    saved: dict[str, Tensor] = {}
    with torch.no_grad():
        for path, delta in deltas.items():
            module = modules[path]
            if isinstance(module, PackedConv2d):
                module.unpack_in_place()
            weight = module.weight
            saved[path] = weight.detach().clone()
            weight.copy_((weight.float() + delta.to(weight.device).view(weight.shape)).to(weight.dtype))
    registry.saved = saved
    registry.version += 1
    return len(saved)


def unfuse(network: nn.Module) -> int:
    """Put back the base weights that ``fuse`` saved, bit for bit; returns the number of layers restored."""
    registry = _registry(network)
    if registry is None or registry.saved is None:
        return 0
    modules = dict(network.named_modules())
    with torch.no_grad():
        for path, weight in registry.saved.items():
            module = modules[path]
            if isinstance(module, PackedConv2d):
                module.unpack_in_place()
            module.weight.copy_(weight.to(module.weight.device))
    count = len(registry.saved)
    registry.saved = None
    registry.version += 1
    return count


def is_fused(network: nn.Module) -> bool:
    registry = _registry(network)
    return registry is not None and registry.saved is not None


@contextlib.contextmanager
def lora_disabled() -> Iterator[None]:
    """The base networks run on this thread (and its tasks) inside the block: un-fused adapters add nothing, fused ones
    are subtracted from the fused layers' outputs (the base output up to float rounding)."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


@contextlib.contextmanager
def scales_applied(network: nn.Module, scales: Mapping[str, float] | None) -> Iterator[None]:
    """Inside the block the adapters of ``network`` run at exactly ``scales`` (the others at 0); None leaves them
    as they are. The previous scales come back afterwards."""
    registry = _registry(network)
    if scales is None or registry is None:
        if scales:
            raise ValueError(f"adapters {sorted(scales)} are not loaded; loaded: none")
        yield
        return
    before = {n: a.scale for n, a in registry.adapters.items()}
    wanted = {n: float(scales.get(n, 0.0)) for n in before}
    unknown = sorted(set(scales) - set(before))
    if unknown:
        raise ValueError(f"adapters {unknown} are not loaded; loaded: {sorted(before) or 'none'}")
    if wanted == before:
        yield
        return
    set_scales(network, wanted)
    try:
        yield
    finally:
        set_scales(network, before)


def save_lora(
    adapter: LoRAAdapter, path: str | Path, *, format: str = "kohya", metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``adapter`` as a ``.safetensors`` file in the kohya/AUTOMATIC1111 format (``lora_unet_...lora_down.
    weight``, ``lora_up.weight``, ``alpha``; two text encoders as ``lora_te1_``/``lora_te2_``) or the diffusers/PEFT
    format (``unet.<path>.lora_A.weight`` / ``lora_B.weight``, with the alphas in ``lora_adapter_metadata`` as
    diffusers' ``save_lora_weights`` writes them). A CLIP text encoder's layers are written with the ``text_model``
    level of transformers < 5 (``_saved_path``). ``metadata`` (strings) is stored in the file's header."""
    if format not in LORA_FORMATS:
        raise ValueError(f"format={format!r} is not allowed; allowed: {', '.join(LORA_FORMATS)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path={str(path)!r} must end in .safetensors")
    header = {k: str(v) for k, v in (metadata or {}).items()}
    tensors: dict[str, Tensor] = {}
    two_encoders = any(net == "text_encoder_2" for net, _ in adapter.targets.values())
    peft: dict[str, Any] = {}
    for key, (net, module_path) in adapter.targets.items():
        layer = adapter.layers[key]
        down, up = layer.down.detach().contiguous().cpu(), layer.up.detach().contiguous().cpu()
        saved_path = _saved_path(net, module_path)
        if format == "kohya":
            stem = kohya_name(net, saved_path)
            stem = stem.replace("lora_te_", "lora_te1_", 1) if two_encoders else stem
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        else:
            tensors[f"{net}.{saved_path}.lora_A.weight"] = down
            tensors[f"{net}.{saved_path}.lora_B.weight"] = up
            entry = peft.setdefault(net, {"r": layer.rank, "lora_alpha": layer.alpha, "alpha": {}, "rank": {}})
            entry["alpha"][module_path] = layer.alpha
            entry["rank"][module_path] = layer.rank
            entry.setdefault("targets", []).append(module_path)
    if format == "diffusers":
        config: dict[str, Any] = {}
        for net, entry in peft.items():
            config[f"{net}.r"] = entry["r"]
            config[f"{net}.lora_alpha"] = entry["lora_alpha"]
            config[f"{net}.alpha_pattern"] = {
                re.escape(p): a for p, a in entry["alpha"].items() if a != entry["lora_alpha"]
            }
            config[f"{net}.rank_pattern"] = {re.escape(p): r for p, r in entry["rank"].items() if r != entry["r"]}
            config[f"{net}.target_modules"] = sorted(entry["targets"])
            config[f"{net}.use_rslora"] = False
        header[PEFT_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
        header.setdefault("format", "pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def _saved_path(net: str, path: str) -> str:
    """A module path as LoRA files spell it: CLIP's layers keep the ``text_model`` level that transformers 5 dropped
    (``text_model.encoder.layers.0...``), which AUTOMATIC1111 and kohya need and diffusers reads with either
    spelling; other text encoders (BERT's ``encoder.layer.0...``) and the U-Net keep their path. The PEFT metadata
    keeps the model's own paths: PEFT matches them as suffixes, so they fit CLIP with and without that level."""
    if net != "unet" and path.startswith(_CLIP_LAYERS):
        return "text_model." + path
    return path


@dataclasses.dataclass(frozen=True)
class LoadedLoRA:
    """What ``load_lora`` loaded: the adapter's name, file, format, AUTOMATIC1111 short hash and how many layers of
    each network received it."""

    name: str
    path: Path | None
    format: str
    hash: str | None
    layers: dict[str, int]


def adapter_name(path: str | Path, name: str | None, taken: Mapping[str, Any]) -> str:
    """``name``, or the file's stem; an error if already loaded."""
    name = Path(path).stem if name is None else name
    if not isinstance(name, str) or not name or any(c in name for c in ":<>,\n"):
        raise ValueError(f"name={name!r} is not allowed; allowed: a non-empty string without ':', '<', '>' or ','")
    if name in taken:
        raise ValueError(f"name={name!r} is already loaded; loaded: {sorted(taken)}; unload it or pick another name")
    return name


class LoRAHost:
    """LoRA methods for a network (``UNet``; a text encoder, whose transformers model takes the adapters):
    ``load_lora``, ``set_lora_scales``, ``unload_lora``, ``fuse_lora``, ``unfuse_lora`` and ``loras``. A file with
    layers for other networks too (a pipeline's LoRA) gives this network its own part."""

    lora_network = "unet"  # which part of a pipeline's LoRA file this network takes

    def lora_root(self) -> nn.Module:
        return self  # type: ignore[return-value]

    def load_lora(
        self,
        path: str | Path,
        scale: float = 1.0,
        name: str | None = None,
        *,
        strict: bool = True,
        allow_pickle: bool = False,
    ) -> LoadedLoRA:
        """Load a LoRA file's layers for this network, un-fused, at ``scale``; see ``adapter_from_file``."""
        name = adapter_name(path, name, self.loras)
        file = read_lora(path, allow_pickle=allow_pickle, network=self.lora_network)
        if self.lora_network not in file.networks:
            raise ValueError(
                f"LoRA file {path} has no layers for the {self.lora_network} (it has: {sorted(file.networks)})"
            )
        file.networks = {self.lora_network: file.networks[self.lora_network]}
        adapter = adapter_from_file(file, {self.lora_network: self.lora_root()}, strict=strict, source=str(path))
        count = attach(self.lora_root(), adapter, name=name, net=self.lora_network, scale=scale)
        return LoadedLoRA(name, Path(path), file.format, lora_hash(path), {self.lora_network: count})

    def set_lora_scales(self, scales: Mapping[str, float]) -> None:
        set_scales(self.lora_root(), scales)

    def unload_lora(self, name: str | None = None) -> list[str]:
        return detach(self.lora_root(), name)

    def fuse_lora(self) -> int:
        return fuse(self.lora_root())

    def unfuse_lora(self) -> int:
        return unfuse(self.lora_root())

    @property
    def loras(self) -> dict[str, float]:
        """The adapters loaded here and their scales."""
        return loaded(self.lora_root())
