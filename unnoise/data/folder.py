"""Any folder of images as an ``ImageDataset``, captioned by ``.txt`` sidecars or ``metadata.jsonl`` files.

Images are found recursively (suffixes in ``IMAGE_SUFFIXES``, any case; names starting with "." are passed over) and
kept in sorted path order. Each is decoded once at construction: EXIF rotation applied, transparency composited on
white, the central square (side = the shorter side) resized to ``size`` x ``size`` with Lanczos, which is "resize
the shorter side, then center-crop" in one resampling. A file that fails to decode is skipped, listed in
``skipped`` as (path, reason) and reported in one warning.

Captions, in order of precedence (the most specific source wins):

1. ``<stem>.txt`` beside the image (``cat.png`` -> ``cat.txt``), stripped of surrounding whitespace;
2. a ``metadata.jsonl`` (Hugging Face ``imagefolder``: one ``{"file_name": ..., "text": ...}`` per line, with
   ``file_name`` relative to the folder of that ``metadata.jsonl``, which may sit in any subfolder): its ``"text"``,
   else its ``"caption"``;
3. otherwise the empty string "", which a text-conditioned model reads as "no caption".

Memory: when all images fit in ``max_memory_bytes`` (N * size * size * channels bytes, 2 GiB by default: e.g. 160k
images at 64 x 64 RGB), they are kept as one uint8 array and a batch is an array lookup. Otherwise only the paths are
kept and each batch decodes its images again; the construction still decodes every file once, so that unreadable
files are found before training starts rather than in the middle of it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from unnoise.data.base import Batch, check_indices, to_unit_range

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA = "metadata.jsonl"
MAX_MEMORY_BYTES = 2 << 30


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA (..., 4) -> uint8 RGB (..., 3) over a white background: ``round(c * a/255 + 255 * (1 - a/255))``."""
    if rgba.dtype != np.uint8 or rgba.shape[-1] != 4:
        raise ValueError(f"rgba must be uint8 (..., 4), got {rgba.dtype} {rgba.shape}")
    color, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    # (x + 127) // 255 rounds x / 255 to nearest exactly: x is an integer, so x / 255 never ends in .5.
    return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def load_image(path: str | os.PathLike, size: int, *, channels: int = 3, center_crop: bool = True) -> np.ndarray:
    """One image file as uint8 (size, size, 3) for RGB or (size, size) for grayscale, as the module doc describes."""
    with Image.open(path) as image:
        image.draft(None, (size, size))  # JPEG: decode at a reduced scale that still covers ``size``
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"pixel mode {image.mode!r} (16-bit or float) is not supported; convert it to 8 bits")
        if image.has_transparency_data:
            image = Image.fromarray(composite_on_white(np.asarray(image.convert("RGBA"))))
        image = image.convert("RGB" if channels == 3 else "L")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side) if center_crop else (0, 0, width, height)
        return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=box))


def find_images(root: Path) -> list[Path]:
    """The image files below ``root``, recursively and sorted, leaving out hidden files and folders."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        found += [Path(folder, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def read_metadata(root: Path) -> dict[Path, str]:
    """Captions of every ``metadata.jsonl`` below ``root``: image path -> its "text", else its "caption"."""
    captions = {}
    for metadata in sorted(root.rglob(METADATA)):
        if any(part.startswith(".") for part in metadata.relative_to(root).parts):
            continue
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metadata}:{number} is not valid JSON ({e}); each line must be one object") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise ValueError(f'{metadata}:{number} must be an object with a string "file_name", got {line!r}')
            text = entry["text"] if entry.get("text") is not None else entry.get("caption")
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{metadata}:{number}: the caption must be a string, got {type(text).__name__}")
            captions[Path(os.path.normpath(metadata.parent / entry["file_name"]))] = text.strip()
    return captions


def read_captions(root: Path, paths: list[Path]) -> list[str]:
    """One caption per image: its ``.txt`` sidecar, else its ``metadata.jsonl`` entry, else ""."""
    metadata = read_metadata(root)
    unmatched = set(metadata) - {Path(os.path.normpath(p)) for p in paths}
    if unmatched:
        warnings.warn(
            f"{len(unmatched)} {METADATA} entries under {root} name no image file found, e.g. {min(unmatched)}",
            stacklevel=3,
        )
    captions = []
    for path in paths:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            captions.append(sidecar.read_text(encoding="utf-8").strip())
        else:
            captions.append(metadata.get(Path(os.path.normpath(path)), ""))
    return captions


class ImageFolder:
    """The images below ``root`` as an ``ImageDataset`` of ``channels`` (1 or 3) x ``size`` x ``size``.

    No labels (``num_classes`` is None); every image has a caption, "" where none is given. With ``flip``, each
    image of a batch is mirrored left-right with probability 1/2, drawn from the batch's ``rng``. With
    ``center_crop=False`` the whole image is resized to a square, changing its aspect ratio.
    """

    num_classes = None

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        size: int,
        channels: int = 3,
        flip: bool = False,
        center_crop: bool = True,
        max_memory_bytes: int = MAX_MEMORY_BYTES,
    ):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} must be a positive integer")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not allowed; allowed: 1 (grayscale), 3 (RGB)")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        self.size, self.channels, self.flip, self.center_crop = size, channels, flip, center_crop
        paths = find_images(self.root)
        if not paths:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ValueError(f"no image files in {self.root} (searched recursively for {suffixes}); add some images")
        captions = read_captions(self.root, paths)
        in_memory = len(paths) * size * size * channels <= max_memory_bytes
        self.paths, self.captions, self.skipped, pixels = [], [], [], []
        for path, text in zip(paths, captions):
            try:
                image = self._load(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, DecompressionBombError
                self.skipped.append((path, f"{type(e).__name__}: {e}"))
                continue
            self.paths.append(path)
            self.captions.append(text)
            if in_memory:
                pixels.append(image)
        self._report_skipped(len(paths))
        self.images = np.stack(pixels) if in_memory else None
        self._shape = (size, size, 3) if channels == 3 else (size, size)

    def _load(self, path: Path) -> np.ndarray:
        return load_image(path, self.size, channels=self.channels, center_crop=self.center_crop)

    def _report_skipped(self, total: int) -> None:
        if not self.skipped:
            return
        path, reason = self.skipped[0]
        if not self.paths:
            raise ValueError(
                f"none of the {total} image files in {self.root} could be read, e.g. {path}: {reason}; "
                "replace or remove the broken files"
            )
        warnings.warn(
            f"skipped {len(self.skipped)} of {total} image files in {self.root} that could not be read, e.g. "
            f"{path}: {reason}; the full list is in .skipped",
            stacklevel=3,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        indices = check_indices(indices, len(self))
        if self.images is not None:
            pixels = self.images[indices]  # a copy: flipping below leaves the data set alone
        else:
            pixels = np.empty((len(indices), *self._shape), dtype=np.uint8)
            for row, i in enumerate(indices):
                pixels[row] = self._reload(self.paths[i])
        if self.flip:
            flips = rng.random(len(indices)) < 0.5
            pixels[flips] = pixels[flips, :, ::-1]  # axis 2 is the width for (B, H, W) and (B, H, W, C)
        return Batch(to_unit_range(pixels), [self.captions[i] for i in indices])

    def _reload(self, path: Path) -> np.ndarray:
        try:
            return self._load(path)
        except Exception as e:
            raise OSError(f"{path} could be read when the data set was made but not now: {e}") from e
