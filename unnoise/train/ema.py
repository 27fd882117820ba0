"""Exponential moving average of weights, with the warm-up of Polyak averaging's early steps."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def ema_decay(step: int, decay: float, warmup_power: float, start_step: int = 0) -> float:
    """Decay at optimizer step ``step`` (1-based): 0 before ``start_step``, then ``min(decay, 1 - (1 + t)^-power)``.

    ``t`` counts steps since ``start_step``; power 2/3 is the warm-up of diffusers' ``EMAModel`` and of
    Karras et al. 2024's power-function EMA family, so the average forgets the random initialisation quickly.
    """
    t = step - start_step
    if t <= 0:
        return 0.0
    return min(decay, 1 - (1 + t) ** -warmup_power)


class EMA:
    """A float32 shadow copy of a module's floating-point parameters and buffers, updated after each step."""

    def __init__(self, model: nn.Module, *, decay: float, warmup_power: float = 2 / 3, start_step: int = 0):
        self.decay, self.warmup_power, self.start_step = decay, warmup_power, start_step
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Move the average towards ``model``'s weights after optimizer step ``step``; returns the decay used."""
        d = ema_decay(step, self.decay, self.warmup_power, self.start_step)
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)
        return d

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (buffers that are not floating point are left as they are)."""
        own = model.state_dict()
        model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in self.shadow.items()}})
