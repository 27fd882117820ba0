"""Real image sets to compare against: MNIST splits, image folders or ``.npz`` statistics, cached by content hash.

A reference's features are computed once per feature space and kept in the cache folder (``cache_root()/eval``)
under the sha256 of the reference's pixels (or files) and the extractor's name, so a retrained classifier, another
resize mode or changed images all miss the cache. The cache file is a ``FeatureStatistics`` ``.npz`` (``mu``,
``sigma``, ``count``, ``feature_space``) plus the ``features`` themselves (for KID, precision/recall and the
floor), so it is also a valid ``--reference``. A ``.npz`` from pytorch-fid or clean-fid (``mu`` and ``sigma``
only) serves FID alone.

The real-vs-real floor is the FID of held-out real images against the reference at the same sample size as the
evaluated set: FID is biased upward at small N, so a model is only as far from the data as its FID is above this.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unnoise.data.mnist import MNIST
from unnoise.data.npm import atomic_write, cache_root
from unnoise.eval.images import IMAGE_SUFFIXES, image_files, open_image, to_uint8
from unnoise.metrics import FeatureExtractor, FeatureStatistics, frechet_distance

MNIST_SPLITS = {"mnist-train": "train", "mnist-val": "val"}
# The other split of the MNIST split used as reference: the held-out real images of the floor.
DEFAULT_FLOOR = {"mnist-train": "mnist-val", "mnist-val": "mnist-train"}
MAX_FLOOR_SUBSETS = 5


@dataclasses.dataclass(frozen=True)
class RealSet:
    """Mean and covariance of a real image set's features (with the features themselves unless from statistics)."""

    name: str
    feature_space: str  # "" when an external .npz does not record it
    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    features: np.ndarray | None  # (count, dim) float32
    content_hash: str  # the cache key: sha256 of the data and the feature space ("" for an external .npz)
    from_cache: bool = False

    def require_features(self, metric: str) -> np.ndarray:
        if self.features is None:
            raise ValueError(
                f"{metric} needs the reference's features, and {self.name} holds only statistics (mu, sigma); "
                "use an MNIST split, an image folder or a cache file written by unnoise eval"
            )
        return self.features


@dataclasses.dataclass(frozen=True)
class Floor:
    """FID of ``subsets`` disjoint held-out sets of ``n`` real images against the reference: mean and std."""

    mean: float
    std: float
    n: int
    subsets: int
    held_out: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_spec(spec: str, flag: str = "reference") -> str:
    """``spec`` if it names an MNIST split, an existing ``.npz`` file or a folder of images, else a ValueError."""
    path = Path(spec)
    if spec in MNIST_SPLITS or (path.suffix == ".npz" and path.is_file()) or (path.is_dir() and image_files(path)):
        return spec
    allowed = f"{', '.join(MNIST_SPLITS)}, an .npz statistics file or a folder of images ({', '.join(IMAGE_SUFFIXES)})"
    what = "an empty folder" if path.is_dir() else "not found" if not path.exists() else "not an .npz file"
    raise ValueError(f"{flag}={spec!r} is not allowed ({what}); allowed: {allowed}")


def load_reference(
    spec: str,
    extractor: FeatureExtractor,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 250,
) -> RealSet:
    """The reference ``spec`` (see ``check_spec``) in ``extractor``'s feature space, from the cache when there."""
    check_spec(spec)
    if spec.endswith(".npz") and spec not in MNIST_SPLITS:
        return load_statistics(Path(spec), extractor.name)
    data_hash, batches = _source(spec, batch_size)
    key = hashlib.sha256(f"{extractor.name}\n{data_hash}".encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / "eval" / f"{extractor.name}-{key}.npz"
    if path.is_file():
        return dataclasses.replace(load_statistics(path, extractor.name, name=spec), content_hash=key, from_cache=True)
    features = np.concatenate([_extract(extractor, images) for images in batches()])
    stats = FeatureStatistics.from_features(features, feature_space=extractor.name)
    mu, sigma = stats.mean, stats.cov
    atomic_write(path, lambda f: _save(f, mu, sigma, features, extractor.name))
    return RealSet(spec, extractor.name, mu, sigma, len(features), features, key)


def load_statistics(path: Path, feature_space: str, *, name: str | None = None) -> RealSet:
    """A ``.npz`` with ``mu`` and ``sigma`` (and ``count``, ``feature_space``, ``features`` if unnoise wrote it)."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; a reference .npz holds mu and sigma (FID statistics)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        count = int(data["count"]) if "count" in data.files else None
        recorded = str(data["feature_space"]) if "feature_space" in data.files else ""
        features = data["features"] if "features" in data.files else None
    if recorded and recorded != feature_space:
        raise ValueError(f"{path} has feature space {recorded!r}; this evaluation uses {feature_space!r}")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return RealSet(name or str(path), recorded, mu, sigma, count, features, "")


def real_vs_real_floor(reference: RealSet, held_out: RealSet, n: int, *, seed: int = 0) -> Floor:
    """FID against ``reference`` of up to ``MAX_FLOOR_SUBSETS`` disjoint random ``n``-image subsets of
    ``held_out`` (all of it, once, if it has fewer than ``n`` images)."""
    features = held_out.require_features("the real-vs-real floor")
    if held_out.content_hash and held_out.content_hash == reference.content_hash:
        raise ValueError(f"the floor's held-out set {held_out.name} is the reference itself; give other real images")
    if held_out.feature_space != reference.feature_space and reference.feature_space:
        raise ValueError(f"floor set {held_out.name} and reference {reference.name} are in different feature spaces")
    n = min(n, len(features))
    if n < 2:
        raise ValueError(f"the real-vs-real floor needs at least 2 images per subset, got {n}")
    order = np.random.default_rng(seed).permutation(len(features))
    subsets = max(1, min(MAX_FLOOR_SUBSETS, len(features) // n))
    fids = []
    for i in range(subsets):
        stats = FeatureStatistics.from_features(features[order[i * n : (i + 1) * n]])
        fids.append(frechet_distance(stats.mean, stats.cov, reference.mu, reference.sigma))
    return Floor(float(np.mean(fids)), float(np.std(fids)), n, subsets, held_out.name)


def _source(spec: str, batch_size: int) -> tuple[str, Callable[[], Iterator[Tensor]]]:
    """(sha256 of the data, a function that yields its uint8 image batches)."""
    if spec in MNIST_SPLITS:
        images = MNIST(MNIST_SPLITS[spec], size=32).images
        digest = hashlib.sha256(f"{images.shape}".encode() + images.tobytes()).hexdigest()

        def mnist_batches() -> Iterator[Tensor]:
            for i in range(0, len(images), batch_size):
                yield torch.from_numpy(images[i : i + batch_size])[:, None]

        return digest, mnist_batches
    files = image_files(Path(spec))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())

    def folder_batches() -> Iterator[Tensor]:
        for i in range(0, len(files), batch_size):
            yield to_uint8([open_image(file) for file in files[i : i + batch_size]])

    return digest.hexdigest(), folder_batches


def _extract(extractor: FeatureExtractor, images: Tensor) -> np.ndarray:
    return extractor(images).float().cpu().numpy()


def _save(f, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray, feature_space: str) -> None:
    np.savez(f, mu=mu, sigma=sigma, count=np.int64(len(features)), feature_space=np.str_(feature_space),
             features=features.astype(np.float32))  # fmt: skip
