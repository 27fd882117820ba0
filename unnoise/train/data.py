"""What the trainer feeds the network: data order, cached latents and cached text embeddings.

Randomness is counter-based: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, and every
per-sample choice (a caption template, a flip) by ``(seed, step, position in the step's global batch)``.
So a run resumed from a checkpoint, or split over any number of processes, sees exactly the same samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from unnoise.data.base import Batch, ImageDataset
from unnoise.data.npm import cache_root
from unnoise.files import file_sha256
from unnoise.models.text import TextEncoder
from unnoise.models.vae import AutoencoderKL
from unnoise.train.config import DataConfig


def build_dataset(cfg: DataConfig) -> ImageDataset:
    """The data set that ``[data]`` names."""
    if cfg.dataset == "mnist":
        from unnoise.data.mnist import MNIST

        return MNIST(
            cfg.part, size=cfg.size, split_seed=cfg.split_seed, cache_dir=cfg.cache_dir, upside_down=cfg.upside_down
        )
    if cfg.dataset == "emoji":
        from unnoise.data.emoji import Emoji

        return Emoji(
            cfg.styles,
            size=cfg.size,
            part=cfg.part,
            split_seed=cfg.split_seed,
            style_in_caption=cfg.style_in_caption,
            cache_dir=cfg.cache_dir,
        )
    from unnoise.data.folder import ImageFolder

    return ImageFolder(cfg.path, size=cfg.size, channels=cfg.channels, flip=cfg.flip)


def cache_key(cfg: DataConfig) -> dict[str, Any]:
    """What identifies the data set's images in ``LatentCache``: its config (``upside_down`` only where set, so the
    keys of configs that predate it stay valid)."""
    key = {**cfg.__dict__, "styles": list(cfg.styles)}
    if not cfg.upside_down:
        del key["upside_down"]
    return key


@dataclass
class DataOrder:
    """Position in the stream of shuffled epochs: ``take(n)`` returns the next ``n`` indices and advances."""

    n: int
    seed: int
    epoch: int = 0
    offset: int = 0

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            chunk = self.permutation(self.epoch)[self.offset : self.offset + count]
            parts.append(chunk)
            count -= len(chunk)
            self.offset += len(chunk)
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(parts)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def sample_rngs(seed: int, step: int, count: int) -> list[np.random.Generator]:
    """One generator per sample of a step's global batch, independent of how the batch is split."""
    return [np.random.default_rng([seed, step, i]) for i in range(count)]


def batch_of(dataset: ImageDataset, indices: np.ndarray, rngs: list[np.random.Generator]) -> Batch:
    """``dataset.batch`` sample by sample (each with its own generator), stacked."""
    parts = [dataset.batch(indices[i : i + 1], rng) for i, rng in enumerate(rngs)]
    captions = None if parts[0].captions is None else [c for p in parts for c in p.captions]
    labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])
    return Batch(torch.cat([p.images for p in parts]), captions, labels)


class TextCache:
    """Text-encoder states per caption of a frozen encoder, computed once each (one caption per call, so
    batch-independent)."""

    def __init__(self, encoder: TextEncoder, max_entries: int = 50_000):
        self.encoder, self.max_entries = encoder, max_entries
        self._cache: dict[str, Tensor] = {}

    def __call__(self, captions: list[str]) -> Tensor:
        for text in captions:
            if text not in self._cache:
                if len(self._cache) >= self.max_entries:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[text] = self.encoder.encode([text]).hidden_states[0]
        return torch.stack([self._cache[text] for text in captions])


class LatentCache:
    """Posterior mean and std of every training image under an autoencoder, encoded once and stored on disk.

    The file is keyed by the autoencoder's weights file and the data set (``key``: its config, which names any
    transformation such as ``upside_down``), so a changed model or data set is encoded anew. Each epoch the trainer
    draws fresh latents ``mean + std * noise`` from the stored posterior.
    """

    def __init__(self, mean: Tensor, std: Tensor):
        self.mean, self.std = mean, std

    @classmethod
    def build(
        cls, vae: AutoencoderKL, weights: Path, dataset: ImageDataset, key: dict[str, Any], *, batch: int = 256
    ) -> LatentCache:
        """Load or encode the latents of ``dataset`` under ``vae``, whose weights file is ``weights``."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        digest.update(file_sha256(weights).encode())
        digest.update(str(len(dataset)).encode())
        path = cache_root(key.get("cache_dir")) / "latents" / f"{digest.hexdigest()[:20]}.safetensors"
        if path.exists():
            stored = load_file(str(path))
            return cls(stored["mean"], stored["std"])
        means, stds = [], []
        rng = np.random.default_rng(0)  # captions are not used here; images do not depend on it without flips
        with torch.no_grad():
            for start in range(0, len(dataset), batch):
                images = dataset.batch(np.arange(start, min(start + batch, len(dataset))), rng).images
                posterior = vae.encode(images.to(next(vae.parameters()).device))
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
        cache = cls(torch.cat(means).contiguous(), torch.cat(stds).contiguous())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"mean": cache.mean.contiguous(), "std": cache.std.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return cache

    def sample(self, indices: np.ndarray, noise: Tensor) -> Tensor:
        """Raw latents of ``indices``: ``mean + std * noise``."""
        idx = torch.from_numpy(indices)
        return self.mean[idx] + self.std[idx] * noise
