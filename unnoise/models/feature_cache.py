"""Feature caching across sampler steps (DeepCache, Ma et al. 2023): reuse the U-Net's deep features.

Between adjacent sampler steps the output of a U-Net's inner blocks changes little, while the outer,
high-resolution blocks carry the detail. On a reusing call the U-Net runs only ``conv_in``, the first ``depth``
levels of its down path (without the last of their downsamplers) and its last ``depth`` up blocks, taking the input
of those up blocks from the last full call. ``FeatureCache(interval=N)`` makes every N-th call a full one (N - 1
reuse it); N = 1 never reuses, so the output is bit for bit the uncached one. A call whose timesteps lie outside
``t_range``, whose input shape, dtype or device differs from the cached call's, or the first call, is always full.

Calls are counted, not sampler steps: under classifier-free guidance the pipeline evaluates both branches in one
call, so a step is a call; a second-order sampler makes two calls per step. Attach a cache with
``UNet.caching(...)`` (a context manager); the U-Net asks ``reuse`` on each call and ``store``\\ s what it computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class FeatureCache:
    """The cached deep features of the last full call and the rule that decides when to reuse them."""

    def __init__(self, interval: int, *, t_range: tuple[float, float] | None = None, depth: int = 1):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"cache_interval={interval!r} is not allowed; expected an integer >= 1 (1: no caching)")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"cache depth={depth!r} is not allowed; expected an integer >= 1 (levels recomputed)")
        if t_range is not None:
            lo, hi = t_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"cache t_range={t_range!r} is not allowed; expected finite (low, high), low <= high")
        self.interval, self.t_range, self.depth = interval, t_range, depth
        self.features: Tensor | None = None
        self._signature: tuple[Any, ...] | None = None
        self._since_full = 0
        self.full_calls = 0
        self.reused_calls = 0

    def reuse(self, t: Tensor, x: Tensor) -> bool:
        """Whether this call (timesteps ``t``, input ``x``) takes the cached features; counts the call."""
        signature = (tuple(x.shape), x.dtype, x.device)
        usable = self.features is not None and signature == self._signature and self._in_range(t)
        if usable and self._since_full + 1 < self.interval:
            self._since_full += 1
            self.reused_calls += 1
            return True
        self._signature, self._since_full = signature, 0
        self.full_calls += 1
        return False

    def store(self, features: Tensor) -> None:
        """Keep the deep features of a full call (the input of the recomputed up blocks)."""
        self.features = features

    def reset(self) -> None:
        """Forget the cached features: the next call is full."""
        self.features, self._signature, self._since_full = None, None, 0

    def _in_range(self, t: Tensor) -> bool:
        if self.t_range is None:
            return True
        t = torch.as_tensor(t)
        lo, hi = self.t_range
        return bool(((t >= lo) & (t <= hi)).all())
