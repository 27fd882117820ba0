"""VRAM planner: the peak memory of generating a batch, from the figures the networks report and the budget.

Peak = weights + the sampler's latents + the larger of two phases that never overlap: the U-Net forward on the
classifier-free-guidance batch (2B, ``UNet.activation_bytes``) and the VAE decode of B images
(``AutoencoderKL.decode_activation_bytes``). The weights are what the networks hold between calls
(``resident_bytes``: parameters, fused upsampler kernels and, on the CPU, weights reordered for oneDNN beside the
plain ones, LoRA adapters) and the text encoder's parameters and adapters. How the networks estimate their
activations, and how the estimates are checked against the profiler and on GPU, is in ``unnoise.models.memory``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unnoise.models import lora
from unnoise.models.memory import module_bytes

GIB = 2**30
SAMPLER_COPIES = 8  # float32 latents the sampler and guidance keep: x, denoised, cat([x, x]), history
FLOAT32 = 4

__all__ = ["GIB", "MemoryEstimate", "VramPlanner", "measured_activations", "module_bytes"]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one batch: weights, sampler state and the two activation phases (U-Net with CFG, VAE decode)."""

    weights: int
    sampler: int
    unet: int
    vae: int

    @property
    def activations(self) -> int:
        return self.sampler + max(self.unet, self.vae)

    @property
    def peak(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        parts = (("weights", self.weights), ("U-Net activations", self.unet), ("VAE decode", self.vae))
        return f"{self.peak / GIB:.3g} GiB ({', '.join(f'{name} {b / GIB:.3g} GiB' for name, b in parts)})"


class VramPlanner:
    """Peak memory of a batch of a loaded ``Pipeline``, and the largest batch under ``budget`` bytes."""

    def __init__(self, pipe: Any, budget: int, max_batch: int):
        self.pipe, self.budget, self.limit = pipe, int(budget), int(max_batch)
        self._weights: tuple[tuple, int] | None = None

    @property
    def weights(self) -> int:
        """Bytes the networks hold between calls, LoRA adapters included (recounted when the adapters change: a
        ``--lora-dir`` file loads when a request first names it)."""
        pipe = self.pipe
        towers = list(pipe.text_encoder.lora_networks().values())  # SDXL has two
        key = (lora.state_key(pipe.unet), *(lora.state_key(t) for t in towers))
        if self._weights is None or self._weights[0] != key:
            text = module_bytes(pipe.text_encoder) + sum(lora.held_bytes(t) for t in towers)
            self._weights = (key, pipe.unet.resident_bytes() + pipe.vae.resident_bytes() + text)
        return self._weights[1]

    def estimate(self, batch: int, width: int, height: int, *, cfg: bool = True) -> MemoryEstimate:
        """Peak bytes of generating ``batch`` images of ``width`` x ``height`` (with classifier-free guidance)."""
        pipe = self.pipe
        f = pipe.vae_factor
        h, w = height // f, width // f
        unet = pipe.unet.activation_bytes(2 * batch if cfg else batch, h, w, pipe.text_encoder.max_length)
        vae = pipe.vae.decode_activation_bytes(batch, h, w)
        sampler = SAMPLER_COPIES * batch * pipe.vae.config.latent_channels * h * w * FLOAT32
        return MemoryEstimate(self.weights, sampler, unet, vae)

    def max_batch(self, width: int, height: int) -> int:
        """The largest batch (at most the server's ``--max-batch``) whose estimate fits the budget; 0 if none."""
        lo, hi = 0, self.limit
        while lo < hi:  # the estimate grows with the batch: bisect
            mid = (lo + hi + 1) // 2
            if self.estimate(mid, width, height).peak <= self.budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def measured_activations(fn: Any, device: Any) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before: ``torch.cuda.max_memory_allocated``
    on CUDA, the PyTorch profiler's memory timeline on CPU (how the planner's estimates are checked)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _profiled_activations(fn)


def _profiled_activations(fn: Any) -> int:
    import json
    import tempfile
    import warnings
    from pathlib import Path

    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:  # fmt: skip
        fn()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is deprecated for CUDA only
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0
