"""Emoji from the npm packages ``emoji-datasource-{google,twitter,apple}`` v16.0.0 (iamcal/emoji-data), one per style.

Each package ships ``package/emoji.json``, the same in all three: per emoji a ``name`` ("GRINNING FACE", or
"Egypt Flag" for flags), ``short_names`` (["grinning"]), ``category`` and ``subcategory`` ("face-smiling"),
``image`` ("1f600.png"), ``sort_order`` and ``has_img_<style>``; there are no keywords. The images are
``package/img/<style>/64/<image>``: 64 x 64 PNGs (RGBA, LA or P). A style is converted once into
``emoji-datasource-<style>-16.0.0.npz`` in the cache: RGB composited on white, in ``sort_order``, with each emoji's
metadata; the tarball (60-100 MB) is deleted after. Skin-tone variants (``skin_variations``) are left out.

Image licenses, from the packages' README: Google (Noto) Apache 2.0; Twitter (Twemoji) CC-BY 4.0; Apple images are
copyright Apple Inc. and not licensed for commercial use.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unnoise.data.base import Batch, check_indices, to_unit_range
from unnoise.data.folder import composite_on_white
from unnoise.data.mnist import split
from unnoise.data.npm import atomic_write, cache_root, fetch_npm_tarball, verify_sha256

VERSION = "16.0.0"
STYLES = ("google", "twitter", "apple")
# sha256 of the tarballs that `npm pack emoji-datasource-<style>@16.0.0` downloads.
TARBALL_SHA256 = {
    "google": "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    "twitter": "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    "apple": "b34d1665e136f163b0d4433318df151895b785186e8c729b2211b43017945075",
}
# The order of the package's categories.json; a label is an index into this tuple.
CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Component",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
SIZE = 64


def package(style: str) -> str:
    """The npm package spec of a style: ``emoji-datasource-<style>@16.0.0``."""
    return f"emoji-datasource-{style}@{VERSION}"


def tarball_name(style: str) -> str:
    """The file that ``npm pack`` writes for a style."""
    return f"emoji-datasource-{style}-{VERSION}.tgz"


def load_emoji(style: str = "google", cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The emoji of one style, fetched and converted on first use; see ``convert_tarball`` for the arrays."""
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not allowed; allowed: {', '.join(map(repr, STYLES))}")
    root = cache_root(cache_dir)
    arrays = root / f"emoji-datasource-{style}-{VERSION}.npz"
    if not arrays.exists():
        tarball = root / tarball_name(style)
        if not tarball.exists():
            fetch_npm_tarball(package(style), tarball, TARBALL_SHA256[style])
        verify_sha256(tarball, TARBALL_SHA256[style], package(style))
        converted = convert_tarball(tarball, style)
        atomic_write(arrays, lambda f: np.savez_compressed(f, **converted))
        tarball.unlink()  # the .npz holds all that is used, in a tenth of the space
    with np.load(arrays, allow_pickle=False) as data:
        loaded = {key: data[key] for key in data.files}
    images = loaded.get("images")
    if images is None or images.dtype != np.uint8 or images.shape[1:] != (SIZE, SIZE, 3):
        shape = None if images is None else (images.shape, images.dtype)
        raise ValueError(f"{arrays} holds images {shape}, expected uint8 (N, 64, 64, 3): delete the file to rebuild it")
    return loaded


def convert_tarball(tarball: Path, style: str) -> dict[str, np.ndarray]:
    """The emoji of a package tarball that have a ``style`` image, in ``sort_order``, as arrays.

    ``images`` uint8 (N, 64, 64, 3) composited on white; ``ids`` int64, the emoji's position in the sorted
    ``emoji.json`` (the same for every style, so splits agree across styles); ``num_emoji``, the length of that list;
    ``labels`` int64, indices into ``CATEGORIES``; ``names``, ``short_names`` (joined by ","), ``subcategories``.
    """
    entries, pngs = _read_tarball(tarball, style)
    entries = sorted(entries, key=lambda e: e["sort_order"])
    kept = [(i, e) for i, e in enumerate(entries) if e.get(f"has_img_{style}")]
    images = np.empty((len(kept), SIZE, SIZE, 3), dtype=np.uint8)
    for row, (_, entry) in enumerate(kept):
        if entry["image"] not in pngs:
            raise ValueError(f"{tarball} has no image img/{style}/64/{entry['image']}, which emoji.json promises")
        with Image.open(io.BytesIO(pngs[entry["image"]])) as image:
            rgba = np.asarray(image.convert("RGBA"))
        if rgba.shape != (SIZE, SIZE, 4):
            raise ValueError(f"{entry['image']} in {tarball} is {rgba.shape[1]} x {rgba.shape[0]}, expected 64 x 64")
        images[row] = composite_on_white(rgba)
    unknown = {e["category"] for _, e in kept} - set(CATEGORIES)
    if unknown:
        raise ValueError(f"{tarball} has categories {sorted(unknown)} that are not in CATEGORIES")
    return {
        "images": images,
        "ids": np.array([i for i, _ in kept], dtype=np.int64),
        "num_emoji": np.array(len(entries), dtype=np.int64),
        "labels": np.array([CATEGORIES.index(e["category"]) for _, e in kept], dtype=np.int64),
        "names": np.array([e["name"] for _, e in kept], dtype=str),
        "short_names": np.array([",".join(e["short_names"]) for _, e in kept], dtype=str),
        "subcategories": np.array([e["subcategory"] for _, e in kept], dtype=str),
    }


def _read_tarball(tarball: Path, style: str) -> tuple[list[dict], dict[str, bytes]]:
    """``emoji.json`` and the bytes of every ``img/<style>/64/*.png``, read in one pass over the gzip stream."""
    entries, pngs, folder = None, {}, f"package/img/{style}/64/"
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.name == "package/emoji.json":
                entries = json.load(tar.extractfile(member))
            elif member.name.startswith(folder) and "/" not in member.name[len(folder) :]:
                pngs[member.name[len(folder) :]] = tar.extractfile(member).read()
    if entries is None:
        raise ValueError(f"{tarball} has no package/emoji.json; is it an emoji-datasource package?")
    return entries, pngs


def _keywords(short_names: str, subcategory: str, name: str) -> tuple[str, ...]:
    """The words a caption may add to ``name``: short names and the subcategory, "_" and "-" read as spaces."""
    words = [w.replace("_", " ").replace("-", " ") for w in [*short_names.split(","), subcategory] if w]
    return tuple(w for w in dict.fromkeys(words) if w != name)


class Emoji:
    """Emoji of one or more ``styles`` as an ``ImageDataset``: RGB, ``size`` pixels, labelled by category.

    Items are the (style, emoji) pairs that have an image, style by style. ``part`` is "train", "val" or "all":
    ``split(num_emoji, seed=split_seed)`` of MNIST's module (10% validation) taken over emoji, so an emoji is in the
    same part in every style. Labels index ``CATEGORIES`` (``num_classes`` = 10). A caption is the lower-cased name
    and a random subset, in random order, of the keywords (short names and subcategory), drawn from the batch's
    ``rng``: "grinning face", "grinning face, face smiling, grinning". With ``style_in_caption`` it ends in
    ", <style> style". Sizes other than 64 are resized with Lanczos once, at construction.
    """

    channels = 3
    num_classes = len(CATEGORIES)

    def __init__(
        self,
        styles: tuple[str, ...] | str = ("google",),
        *,
        size: int = SIZE,
        part: str = "train",
        split_seed: int = 0,
        style_in_caption: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ):
        styles = (styles,) if isinstance(styles, str) else tuple(styles)
        if not styles or len(set(styles)) != len(styles) or not set(styles) <= set(STYLES):
            raise ValueError(f"styles={styles!r} must be distinct styles among {', '.join(map(repr, STYLES))}")
        if part not in ("train", "val", "all"):
            raise ValueError(f"part={part!r} is not allowed; allowed: 'train', 'val', 'all'")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} must be a positive integer")
        images, labels, self.names, self.keywords, self.item_styles = [], [], [], [], []
        for style in styles:
            data = load_emoji(style, cache_dir)
            keep = np.ones(len(data["ids"]), dtype=bool)
            if part != "all":
                train, val = split(int(data["num_emoji"]), seed=split_seed)
                keep = np.isin(data["ids"], train if part == "train" else val)
            images.append(data["images"][keep])
            labels.append(data["labels"][keep])
            for name, short, sub in zip(data["names"][keep], data["short_names"][keep], data["subcategories"][keep]):
                self.names.append(str(name).lower())
                self.keywords.append(_keywords(str(short), str(sub), self.names[-1]))
                self.item_styles.append(style)
        self.images = _resize(np.concatenate(images), size)
        self.labels = np.concatenate(labels)
        self.size, self.part, self.style_in_caption = size, part, style_in_caption

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int, rng: np.random.Generator) -> str:
        """The name, a random subset of the keywords, and the style if ``style_in_caption``."""
        keywords = self.keywords[index]
        count = rng.integers(0, len(keywords) + 1)
        parts = [self.names[index], *(keywords[k] for k in rng.permutation(len(keywords))[:count])]
        if self.style_in_caption:
            parts.append(f"{self.item_styles[index]} style")
        return ", ".join(parts)

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        indices = check_indices(indices, len(self))
        captions = [self.caption(i, rng) for i in indices]
        return Batch(to_unit_range(self.images[indices]), captions, torch.from_numpy(self.labels[indices]))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 64, 64, 3) -> (N, size, size, 3) with Lanczos; unchanged at 64."""
    if size == SIZE:
        return images
    resized = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for row, image in enumerate(images):
        resized[row] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
    return resized
