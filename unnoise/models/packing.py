"""CPU inference through oneDNN on weights reordered once ("packed"), and the inference defaults that use it.

On the CPU without autograd, convolutions run oneDNN's kernel on a copy of the weight reordered once into its
blocked layout (``Conv2d``, ``packed_conv2d``) instead of reordering it on every call: 0.7-0.85x the time of a 3x3
conv on 8x8 and 4x4 maps with 384 channels, where the per-call reorder costs as much as the arithmetic. By default
the copy stays resident beside the weight (the size of the conv weights; ``packed_weight_bytes``, counted by the
serving VRAM planner); packed in place (``set_weight_packing(model, True, in_place=True)``, what
``prepare_for_inference`` sets) the reordered weight replaces the plain one inside the same parameter and costs no
memory. oneDNN writes convolution results channels-last, which the following GroupNorm, attention (whose token view
of a channels-last map needs no copy) and convolutions take as they are; the models return their output in the
input's layout. Linear layers can run oneDNN's matrix product with the bias inside it (``Linear``; on by default,
off under ``prepare_for_inference``, where it measured no faster and kept more memory). Measured in
docs/benchmarks/models.md; ``set_weight_packing(model, False)`` keeps PyTorch's own kernels.

``Conv2d``, ``TokenConv2d`` and ``Linear`` are drop-in replacements of ``nn.Conv2d`` / ``nn.Linear`` (same
parameters, state-dict keys and results up to float rounding) that the blocks in ``layers`` are built from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def onednn_runs(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether oneDNN's kernels run ``dtype`` on ``device`` here: the CPU, float32, or bfloat16 where this CPU has
    oneDNN's bf16 kernels (AVX-512 or AMX; an AVX2-only CPU has none, and its bf16 convolutions run PyTorch's own)."""
    return (
        torch.device(device).type == "cpu"
        and dtype in PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def packing_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``packed_conv2d`` / ``onednn_linear`` can run: ``onednn_runs`` the dtype of both sides, no autograd, no
    autocast, not inside ``torch.compile`` (which fuses convolutions itself)."""
    return (
        not torch.compiler.is_compiling()
        and x.dtype == weight.dtype
        and onednn_runs(x.dtype, x.device)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # autocast does not reach oneDNN's ops: PyTorch's own path
    )


def reorder_conv_weight(weight: Tensor, input_shape: tuple, stride: tuple, padding: tuple) -> Tensor:
    """``weight`` as a oneDNN tensor in the blocked layout its convolution of an ``input_shape`` input reads."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().to_mkldnn(), list(padding), list(stride), [1, 1], 1, list(input_shape)
    )


def onednn_conv2d(x: Tensor, packed: Tensor, bias: Tensor | None, stride: tuple, padding: tuple) -> Tensor:
    """oneDNN's convolution of ``x`` with a weight from ``reorder_conv_weight`` (channels-last output)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, list(padding), list(stride), [1, 1], 1, "none", [], ""
    )


def packed_conv2d(
    holder: nn.Module,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple,
    padding: tuple,
    derive: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` from ``weight`` reordered once for ``x``'s shape and kept on
    ``holder`` until the shape or the weight (its storage, version, dtype) changes; with ``derive``, the
    convolution's weight is ``derive(weight)``, built and reordered without keeping the plain result. The reordered
    copy keeps a reference to ``weight`` so that its storage cannot be freed and reused by another tensor under the
    same key. An inference tensor has no version counter: pass one only where nothing changes it in place (a kernel
    this module derived itself)."""
    version = 0 if weight.is_inference() else weight._version
    key = (derive, weight.data_ptr(), version, weight.dtype, tuple(x.shape), tuple(stride), tuple(padding))
    cached = holder.__dict__.get("_packed")
    if cached is None or cached[0] != key or cached[1] is not weight:
        with torch.no_grad():
            packed = reorder_conv_weight(weight if derive is None else derive(weight), x.shape, stride, padding)
        holder.__dict__["_packed"] = cached = (key, weight, packed)
    return onednn_conv2d(x, cached[2], bias, stride, padding)


def maybe_packed_conv2d(
    holder: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple, *, packed: bool
) -> Tensor:
    """``packed_conv2d`` where ``packed`` and packing applies, else ``F.conv2d``."""
    if packed and packing_applies(x, weight):
        return packed_conv2d(holder, x, weight, bias, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight.flatten(1), bias)`` through oneDNN (a 1x1 convolution's weight may be passed as it is),
    which adds the bias inside the product where ``addmm`` first copies it into every output row. Unlike the
    convolutions it needs no reordered copy of the weight: keeping one measured no faster."""
    return torch.ops.mkldnn._linear_pointwise(x, weight.flatten(1), bias, "none", [], "")


class PackedHolder(nn.Module):
    """A module that may keep a reordered weight (``packed_conv2d``): copies and pickles of it leave that behind
    (a oneDNN-only tensor, rebuilt on the next call)."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_packed", None)
        return state

    def drop_packed(self) -> None:
        """Forget the reordered weight kept here (the next call that needs one rebuilds it)."""
        self.__dict__.pop("_packed", None)

    def _apply(self, fn, recurse=True):
        self.drop_packed()  # reordered from the weights ``fn`` replaces: it would keep the old ones alive
        return super()._apply(fn, recurse)

    def planned_packed_bytes(self) -> int:
        """Bytes of reordered weights this module and its submodules keep once they have run CPU inference."""
        return sum(packed_weight_bytes(child) for child in self.children())


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU inference calls run ``onednn_linear``; ``packed = False`` (``set_weight_packing``)
    keeps PyTorch's own path."""

    packed = True

    def forward(self, x: Tensor) -> Tensor:
        if self.packed and x.ndim >= 2 and packing_applies(x, self.weight):
            return onednn_linear(x, self.weight, self.bias)
        return super().forward(x)


class Conv2d(PackedHolder, nn.Conv2d):
    """``nn.Conv2d`` whose CPU inference calls run ``packed_conv2d``; ``packed = False`` (``set_weight_packing``)
    keeps PyTorch's own path.

    With ``pack_in_place`` (``set_weight_packing(model, True, in_place=True)``) the reordered weight replaces the
    plain one inside the ``weight`` parameter (the same object, through ``torch.utils.swap_tensors``) instead of
    sitting beside it, so packing costs no memory. Whatever needs the plain weight gets it back first, bit for bit
    with its ``requires_grad`` and ``grad``: a call with autograd, autocast, another dtype or device, or inside
    ``torch.compile``; ``state_dict`` (which always holds the plain weight), ``load_state_dict``, ``.to()`` and its
    kin, copies and pickles. Code that reads the parameter directly between inference calls (an EMA update, say)
    sees a oneDNN tensor, and ``torch.compile`` cannot trace one: call ``unpack_in_place`` or
    ``set_weight_packing(model, True)`` first (``UNet.compile`` does). Where the parameter
    cannot be swapped (something holds a weak reference to it) the conv runs PyTorch's kernel instead.
    """

    packed = True
    pack_in_place = False

    def _packable(self, x: Tensor) -> bool:
        return (
            self.packed
            and x.ndim == 4
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and self.dilation == (1, 1)
            and not self.weight.is_inference()  # no version counter: in-place changes to it would go unnoticed
            and packing_applies(x, self.weight)
        )

    def forward(self, x: Tensor) -> Tensor:
        packable = self._packable(x)
        if packable and self.pack_in_place:
            return self._in_place_conv(x)
        self.unpack_in_place()
        if packable:
            return packed_conv2d(self, x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)

    def packs_derived_in_place(self) -> bool:
        """Whether a kernel derived from this conv's weight (a fused upsampler's) keeps only its reordered copy,
        built straight from the weight: the weight is packed in place, in a dtype oneDNN runs on its device."""
        w = self.weight
        return self.packed and self.pack_in_place and not w.is_inference() and onednn_runs(w.dtype, w.device)

    def runs_derived_packed(self, x: Tensor) -> bool:
        """Whether that derived kernel runs on ``x`` from its reordered copy (``packs_derived_in_place`` and packing
        applies to ``x``)."""
        return self.packs_derived_in_place() and packing_applies(x, self.weight)

    def planned_packed_bytes(self, derived_bytes: int | None = None) -> int:
        """Bytes of the reordered weight this conv keeps beside its own once it has run CPU inference (none packed
        in place); with ``derived_bytes``, of a kernel of that size derived from the weight and run in its place
        (kept whether the weight is packed in place or not)."""
        w = self.weight
        if not self.packed or not onednn_runs(w.dtype, w.device):
            return 0
        if derived_bytes is not None:
            return derived_bytes
        return 0 if self.pack_in_place else w.numel() * w.element_size()

    def _in_place_conv(self, x: Tensor) -> Tensor:
        weight, key = self.weight, (x.dtype, tuple(x.shape))
        if not weight.is_mkldnn or self.__dict__.get("_in_place_key") != key:
            state = self.__dict__.get("_plain_state") or (weight.requires_grad, weight.grad)
            with torch.inference_mode(False), torch.no_grad():  # a parameter cannot be an inference tensor
                plain = weight.to_dense() if weight.is_mkldnn else weight
                packed = reorder_conv_weight(plain, x.shape, self.stride, self.padding)
                if not self._swap(nn.Parameter(packed, requires_grad=False)):
                    return super().forward(x)  # something holds a weak reference to the parameter: PyTorch's path
            self.__dict__["_plain_state"] = state
            self.drop_packed()
            self.__dict__["_in_place_key"] = key
        return onednn_conv2d(x, weight, self.bias, self.stride, self.padding)

    def _swap(self, replacement: nn.Parameter) -> bool:
        """Give the ``weight`` parameter object ``replacement``'s contents (optimizers and hooks that hold it keep
        the same object); False where PyTorch refuses (weak references to the parameter)."""
        try:
            torch.utils.swap_tensors(self.weight, replacement)
        except RuntimeError:
            return False
        return True

    def unpack_in_place(self) -> None:
        """Put the plain weight back into the ``weight`` parameter (with its ``requires_grad`` and ``grad``) if
        ``pack_in_place`` packed it; no-op otherwise."""
        if self.weight.is_mkldnn:
            requires_grad, grad = self.__dict__.pop("_plain_state", (True, None))
            if not self._swap(self._plain_weight(requires_grad)):
                raise RuntimeError(f"cannot unpack the weight of {self!r}: something holds a weak reference to it")
            self.weight.grad = grad
            self.__dict__.pop("_in_place_key", None)

    def _plain_weight(self, requires_grad: bool) -> nn.Parameter:
        with torch.inference_mode(False), torch.no_grad():
            return nn.Parameter(self.weight.to_dense(), requires_grad=requires_grad)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            plain = self._plain_weight(self.__dict__.get("_plain_state", (True, None))[0])
            destination[prefix + "weight"] = plain if keep_vars else plain.detach()

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack_in_place()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.unpack_in_place()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_in_place_key", None)
        requires_grad, _ = state.pop("_plain_state", (True, None))
        if self.weight.is_mkldnn:  # the copy gets the plain weight (and packs its own on its first call)
            state["_parameters"] = {**state["_parameters"], "weight": self._plain_weight(requires_grad)}
        return state


class TokenConv2d(Conv2d):
    """A 1x1 ``Conv2d`` (diffusers' conv ``proj_in`` / ``proj_out``: same parameters and keys) applied to (B, N, C)
    tokens as the matrix product over channels it is: the same arithmetic without a convolution's layout reorders,
    through ``onednn_linear`` where packing applies. It keeps no reordered weight."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.packed and packing_applies(tokens, self.weight):
            return onednn_linear(tokens, self.weight, self.bias)
        return F.linear(tokens, self.weight.flatten(1), self.bias)

    def planned_packed_bytes(self, derived_bytes: int | None = None) -> int:
        return 0


def packed_weight_bytes(module: nn.Module) -> int:
    """Bytes of the reordered weights that the layers under ``module`` keep once it has run on the CPU without
    autograd (``packed_conv2d``): one copy of each conv weight in a dtype oneDNN runs here, of the fused phase kernel
    for a fused ``Upsample2D``; 0 on other devices or with packing switched off. A conv packed in place keeps nothing
    beside its weight, and ``TokenConv2d`` projections keep nothing either."""
    if isinstance(module, PackedHolder):
        return module.planned_packed_bytes()
    return sum(packed_weight_bytes(child) for child in module.children())


def conv_backend(module: nn.Module) -> str:
    """Which convolution kernels the ``Conv2d`` layers under ``module`` run in inference, as set and placed now:
    "packed" (oneDNN on reordered weights), "onednn" (PyTorch's oneDNN convolution, which reorders its input and
    output on each call), "unfold" (PyTorch's im2col convolution: dtypes oneDNN does not run on this CPU) or "device"
    (not on the CPU: cuDNN or the backend's own); "packed" for a module without convolutions."""
    conv = next((m for m in module.modules() if isinstance(m, Conv2d) and not isinstance(m, TokenConv2d)), None)
    if conv is None:
        return "packed"
    w = conv.weight
    if w.device.type != "cpu":
        return "device"
    if conv.packed and onednn_runs(w.dtype, w.device):
        return "packed"
    fp16 = w.dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    if torch.backends.mkldnn.enabled and (onednn_runs(w.dtype, w.device) or fp16):
        return "onednn"
    return "unfold"


def kept_packed_bytes(module: nn.Module) -> int:
    """Bytes of the reordered weights the layers under ``module`` hold now (what ``packed_weight_bytes`` plans)."""
    packs = [m._packed[2] for m in module.modules() if "_packed" in m.__dict__]
    return sum(p.numel() * p.element_size() for p in packs)


def set_weight_packing(module: nn.Module, enabled: bool, *, in_place: bool = False) -> None:
    """Run every ``Conv2d`` and ``Linear`` under ``module`` from weights reordered once for oneDNN (``True``, the
    default; CPU inference only, see ``packed_conv2d``) or through PyTorch's own kernels (``False``).

    ``in_place=True`` (with ``enabled``) makes each ``Conv2d`` replace its weight parameter with the reordered one
    instead of keeping a copy beside it (``Conv2d.pack_in_place``): the same speed at no extra memory, for models
    that only run inference. ``False`` puts plain weights back."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled={enabled!r} must be True or False")
    if not isinstance(in_place, bool):
        raise ValueError(f"in_place={in_place!r} must be True or False")
    if in_place and not enabled:
        raise ValueError("in_place=True packs weights: it needs enabled=True")
    for layer in module.modules():
        if isinstance(layer, (Conv2d, Linear)):
            layer.packed = enabled
        if isinstance(layer, Conv2d):
            layer.pack_in_place = in_place
            if not in_place:
                layer.unpack_in_place()
        if isinstance(layer, PackedHolder) and (in_place or not enabled):
            layer.drop_packed()  # in place, a conv packs its weight itself on the next call


def unpack_in_place(module: nn.Module) -> None:
    """Put the plain weights back into every ``Conv2d`` under ``module`` and stop packing them in place (packing
    beside the weights, where switched on, goes on): for code that reads the parameters directly."""
    for layer in module.modules():
        if isinstance(layer, Conv2d):
            layer.unpack_in_place()
            layer.pack_in_place = False


def prepare_for_inference(module: nn.Module) -> None:
    """The inference defaults of a network that only generates (the Pipeline's and the server's U-Net and VAE).

    Conv weights are packed in place (``set_weight_packing(module, True, in_place=True)``: the oneDNN kernels at no
    memory beside the weights; it acts on the CPU only and packs each weight on its next call), and matrix products
    (``Linear``, ``TokenConv2d``) run PyTorch's own kernels. Upsampling runs fused or not as measured best for the
    network on the device its parameters are on now: on the CPU its class's ``cpu_upsample_fusion`` (``UNet``:
    unfused, ``AutoencoderKL``: fused, each citing docs/benchmarks/models.md), elsewhere fused (the library default;
    docs/benchmarks/gpu.md). Call it after the network's last ``.to(device, dtype)``; calling it again is harmless,
    and needed only after a move to another kind of device. A training loop must not call it: its parameters stay
    plain."""
    from unnoise.models.layers import set_upsample_fusion  # layers builds its blocks on this module's layers

    set_weight_packing(module, True, in_place=True)
    for layer in module.modules():
        # oneDNN's matrix product measured no faster than PyTorch's in the U-Net (0.93x diffusers' latency against
        # 0.88-0.89x without it, on a 2-core AVX2 CPU) and its kernels kept 5.5 MiB more after the first call (which
        # took the U-Net's total memory from 0.99x diffusers' to 1.00x, docs/benchmarks/models.md)
        if isinstance(layer, (Linear, TokenConv2d)):
            layer.packed = False
    param = next(module.parameters(), None)
    on_cpu = param is not None and param.device.type == "cpu"
    set_upsample_fusion(module, getattr(module, "cpu_upsample_fusion", True) if on_cpu else True)
