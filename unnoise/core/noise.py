"""Seeded Gaussian noise, shared by samplers, autoencoders and pipelines (imports nothing of ours)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None


def check_generators(generator: Generator, batch: int) -> None:
    """Raise unless ``generator`` is None, one generator, or a list with one per image of the batch."""
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != batch:
        raise ValueError(f"generator list has {len(generator)} entries for a batch of {batch}; pass one per image")


def randn_like(like: Tensor, generator: Generator = None) -> Tensor:
    """Unit Gaussian noise shaped like ``like`` (batch first), in its dtype, drawn on the generator's device.

    With a list of generators, one per image, image i's noise does not depend on the batch it is in.
    Drawing where the generator lives lets a CPU generator seed CUDA work reproducibly, as diffusers does.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)
    check_generators(generator, like.shape[0])
    return torch.stack(
        [torch.randn(like.shape[1:], generator=g, dtype=like.dtype, device=g.device) for g in generator]
    ).to(like.device)
