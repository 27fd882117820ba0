"""The images to evaluate: what to generate (prompts, labels, seeds) and the batches of one process's share.

Image ``k`` of a plan has prompt ``prompts[k]``, seed ``seed + k`` and, for digit prompts, label ``labels[k]``.
Prompts come in equal shares as consecutive blocks (digit-major, then the caption templates of
``unnoise.data.captions`` within each digit), so a block of one prompt is one pipeline call with consecutive
seeds, and since the pipeline draws each image from its own generator, image ``k`` is the same whatever the batch
size or the number of processes that share the work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from unnoise.data.captions import TEMPLATES, caption
from unnoise.eval.images import open_image, to_uint8
from unnoise.pipeline import Request
from unnoise.pipeline.png import parse_parameters

# Every caption the digit prompts use, to read the label of an image folder's PNGs back from their parameters.
CAPTION_DIGITS = {caption(d, t): d for d in range(10) for t in range(len(TEMPLATES))}


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """What to generate: image k has ``prompts[k]``, seed ``seed + k`` and label ``labels[k]`` if labelled."""

    prompts: tuple[str, ...]
    labels: np.ndarray | None
    seed: int
    source: str  # how the prompts were made, for the report

    def __len__(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class SampleBatch:
    """uint8 images ``(B, C, H, W)`` with their prompts and digit labels when known."""

    images: Tensor
    prompts: list[str] | None
    labels: np.ndarray | None


def digit_plan(num_images: int, seed: int = 0) -> SamplePlan:
    """``num_images / 10`` images of each digit, the caption templates in equal shares within each digit."""
    if not (isinstance(num_images, int) and num_images >= 10 and num_images % 10 == 0):
        raise ValueError(f"num_images={num_images!r} is not allowed; digit prompts need a multiple of 10 (>= 10)")
    per_digit = num_images // 10
    counts = np.diff([t * per_digit // len(TEMPLATES) for t in range(len(TEMPLATES) + 1)])
    prompts = [caption(d, t) for d in range(10) for t, count in enumerate(counts) for _ in range(count)]
    labels = np.repeat(np.arange(10), per_digit)
    return SamplePlan(tuple(prompts), labels, seed, f"MNIST digit captions, {per_digit} per digit")


def prompt_plan(prompts: list[str], num_images: int, seed: int = 0, source: str = "prompts") -> SamplePlan:
    """``num_images`` images over ``prompts`` in equal shares (the first ones get one more if it does not divide)."""
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    if not (isinstance(num_images, int) and num_images >= 1):
        raise ValueError(f"num_images={num_images!r} is not allowed; expected an integer >= 1")
    bounds = [i * num_images // len(prompts) for i in range(len(prompts) + 1)]
    expanded = [p for p, lo, hi in zip(prompts, bounds[:-1], bounds[1:]) for _ in range(hi - lo)]
    return SamplePlan(tuple(expanded), None, seed, f"{len(prompts)} prompts from {source}")


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def shard(count: int, rank: int, size: int) -> range:
    """Process ``rank``'s contiguous share of ``count`` items; shares differ by at most one item."""
    return range(rank * count // size, (rank + 1) * count // size)


def generated_batches(
    pipe: Any, plan: SamplePlan, indices: range, *, batch_size: int, **settings: Any
) -> Iterator[SampleBatch]:
    """Generate images ``indices`` of ``plan`` through ``pipe.generate``: one sampler pass per ``batch_size``
    images, one request per run of one prompt (image k has seed ``plan.seed + k``, whatever the batching)."""
    for lo in range(indices.start, indices.stop, batch_size):
        hi = min(indices.stop, lo + batch_size)
        requests, k = [], lo
        while k < hi:
            end = k + 1
            while end < hi and plan.prompts[end] == plan.prompts[k]:
                end += 1
            requests.append(Request(plan.prompts[k], num_images=end - k, seed=plan.seed + k, **settings))
            k = end
        images = [image for request_images in pipe.generate(requests) for image in request_images]
        labels = plan.labels[lo:hi] if plan.labels is not None else None
        yield SampleBatch(to_uint8(images), list(plan.prompts[lo:hi]), labels)


def folder_batches(files: list[Path], indices: range, *, batch_size: int) -> Iterator[SampleBatch]:
    """Images ``indices`` of ``files``; their prompts (and digit labels) from unnoise's PNG parameters if all have
    them."""
    for lo in range(indices.start, indices.stop, batch_size):
        images = [open_image(path) for path in files[lo : min(lo + batch_size, indices.stop)]]
        prompts = [_prompt(image) for image in images]
        known = all(p is not None for p in prompts)
        labels = [CAPTION_DIGITS.get(p, -1) for p in prompts] if known else None
        yield SampleBatch(to_uint8(images), prompts if known else None, np.asarray(labels) if known else None)


def _prompt(image: Image.Image) -> str | None:
    text = image.info.get("parameters")
    return parse_parameters(text).get("prompt") if text is not None else None
