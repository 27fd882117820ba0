"""Train the MNIST digit classifier of FID-MNIST and prompt adherence: AdamW, warmup + cosine, seeded affine jitter.

Every random choice (initial weights, batch order, augmentation) comes from ``config.seed``, so a run on the CPU is
reproduced exactly. The model trains on ``MNIST("train", size=28)`` and is scored on ``MNIST("val", size=28)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unnoise.data.mnist import MNIST
from unnoise.models.classifier import DigitClassifier, DigitClassifierConfig
from unnoise.models.io import save_model


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig:
    """One classifier training run; the defaults produce the shipped weights."""

    model: DigitClassifierConfig = dataclasses.field(default_factory=DigitClassifierConfig)  # the network's shape
    steps: int = 2000  # optimizer steps (one batch each); 2000 x 128 is about 28 passes over the 9000 images
    batch_size: int = 128  # training images per step
    lr: float = 3e-3  # peak AdamW learning rate, reached after the warmup
    warmup_steps: int = 100  # linear warmup from 0 to ``lr``; then a cosine decay to 0 at ``steps``
    weight_decay: float = 0.05  # AdamW decoupled weight decay, on conv and linear weights only (not biases, norms)
    label_smoothing: float = 0.0  # cross-entropy label smoothing in [0, 1)
    max_shift: float = 2.0  # augmentation: uniform translation in [-max_shift, max_shift] pixels along each axis
    max_rotation: float = 10.0  # augmentation: uniform rotation in [-max_rotation, max_rotation] degrees
    max_scale: float = 0.1  # augmentation: uniform zoom factor in [1 - max_scale, 1 + max_scale]
    seed: int = 0  # seeds the initial weights, the batch order and the augmentation
    eval_batch_size: int = 500  # validation images per forward pass (results do not depend on it)
    log_every: int = 250  # steps between log lines
    cache_dir: str | None = None  # MNIST cache folder; None: $UNNOISE_CACHE, else ~/.cache/unnoise

    def __post_init__(self) -> None:
        counts = ("steps", "batch_size", "eval_batch_size", "log_every")
        checks = [(name, _int_at_least(getattr(self, name), 1), "an int >= 1") for name in counts]
        warmup_ok = (
            _int_at_least(self.warmup_steps, 0) and _int_at_least(self.steps, 1) and self.warmup_steps < self.steps
        )
        checks += [
            ("model", isinstance(self.model, DigitClassifierConfig), "a DigitClassifierConfig"),
            ("warmup_steps", warmup_ok, f"an int in [0, steps={self.steps!r})"),
            ("lr", _number(self.lr) and self.lr > 0, "a finite number > 0"),
            ("weight_decay", _number(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("label_smoothing", _number(self.label_smoothing) and 0 <= self.label_smoothing < 1, "a number in [0, 1)"),
            ("max_shift", _number(self.max_shift) and self.max_shift >= 0, "a finite number >= 0 (pixels)"),
            ("max_rotation", _number(self.max_rotation) and 0 <= self.max_rotation <= 180, "degrees in [0, 180]"),
            ("max_scale", _number(self.max_scale) and 0 <= self.max_scale < 1, "a number in [0, 1)"),
            ("seed", _int_at_least(self.seed, 0), "an int >= 0"),
            ("cache_dir", self.cache_dir is None or isinstance(self.cache_dir, str), "None or a folder path string"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"ClassifierTrainConfig.{name}={getattr(self, name)!r} is not allowed; expected {allowed}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}


def train_classifier(
    config: ClassifierTrainConfig, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train, score on the validation split, save the model and ``metrics.json`` to ``out_dir``; return the metrics."""
    start = time.perf_counter()
    train = MNIST("train", size=config.model.size, cache_dir=config.cache_dir)
    rng = np.random.default_rng(config.seed)
    data = train.batch(np.arange(len(train)), rng)  # all 9000 images at once: 28 MB of float32
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the global generator
        torch.manual_seed(config.seed)
        model = DigitClassifier(config.model)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    order = _batch_order(len(train), config.batch_size, config.steps, rng)
    model.train()
    for step, indices in enumerate(order):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        images = augment(data.images[indices], rng, config)
        loss = F.cross_entropy(model(images), data.labels[indices], label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log(f"step {step + 1}/{config.steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s")
    model.eval()
    val = MNIST("val", size=config.model.size, cache_dir=config.cache_dir)
    val_data = val.batch(np.arange(len(val)), rng)
    scores = evaluate(model, val_data.images, val_data.labels, batch_size=config.eval_batch_size)
    metrics = {**scores, "steps": config.steps, "seconds": time.perf_counter() - start, "config": config.to_dict()}
    save_model(model, out_dir)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"validation accuracy {metrics['val_accuracy']:.4f} after {metrics['seconds']:.0f} s; saved to {out_dir}")
    return metrics


@torch.no_grad()
def evaluate(model: DigitClassifier, images: Tensor, labels: Tensor, *, batch_size: int = 500) -> dict[str, Any]:
    """Accuracy of ``model`` over all images and per digit (None for a digit without images), in batches."""
    predicted = torch.cat([model.predict(chunk) for chunk in images.split(batch_size)])
    correct = predicted == labels
    per_digit = [_fraction(correct[labels == d]) for d in range(model.config.num_classes)]
    return {"val_accuracy": _fraction(correct), "val_images": len(labels), "per_digit_accuracy": per_digit}


def learning_rate(step: int, config: ClassifierTrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then a half-cosine decay from ``lr`` to 0 at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def augment(images: Tensor, rng: np.random.Generator, config: ClassifierTrainConfig) -> Tensor:
    """A random shift, rotation and zoom per image (drawn from ``rng``), resampled bilinearly on a -1 background."""
    n, size = len(images), images.shape[-1]
    angle = np.deg2rad(rng.uniform(-config.max_rotation, config.max_rotation, n))
    zoom = rng.uniform(1 - config.max_scale, 1 + config.max_scale, n)
    shift = rng.uniform(-config.max_shift, config.max_shift, (n, 2)) * 2 / size  # pixels -> [-1, 1] grid units
    # theta maps output to input coordinates: the inverse of "rotate by angle, zoom by zoom, then shift".
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    theta = np.stack([np.stack([cos, sin, -shift[:, 0]], 1), np.stack([-sin, cos, -shift[:, 1]], 1)], 1)
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(images.shape), align_corners=False)
    # Sample x + 1 with zero padding so that pixels moved in from outside are background (-1), not gray (0).
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def _batch_order(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches of indices from consecutive random permutations of ``range(n)`` (epochs run on)."""
    epochs = math.ceil(steps * batch_size / n)
    flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the conv and linear weights only; biases and GroupNorm scales keep no pull towards 0."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _fraction(correct: Tensor) -> float | None:
    """The fraction of True entries as an exact ratio of counts; None when there are none."""
    return int(correct.sum()) / len(correct) if len(correct) else None


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
