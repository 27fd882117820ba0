"""Pixel operations of img2img and inpainting, as AUTOMATIC1111 performs them (its ``images.py``, ``masking.py`` and
``processing.py``): flattening and channel conversion, the three resize modes, mask blur, the crop region of
"only masked" inpainting, the "fill" masked content and the overlay that pastes the original back.

Each is a small function of PIL images, so that the pipeline, the CLI and the server share one version.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

# AUTOMATIC1111's resize_mode 0..3: just resize, crop and resize, resize and fill, just resize (latent upscale).
RESIZE_MODES = ("resize", "crop", "fill", "latent")
# AUTOMATIC1111's inpainting_fill 0..3: what lies under the mask before sampling.
INPAINTING_FILLS = ("fill", "original", "latent_noise", "latent_nothing")
BACKGROUND = (255, 255, 255)  # AUTOMATIC1111's img2img_background_color, under transparent pixels of an init image
_MODES = {1: "L", 3: "RGB"}


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def flatten(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """An RGB image with transparent pixels composited onto ``background`` (AUTOMATIC1111's ``images.flatten``)."""
    if not has_alpha(image):
        return image.convert("RGB")
    canvas = Image.new("RGBA", image.size, (*background, 255))
    canvas.alpha_composite(image.convert("RGBA"))
    return canvas.convert("RGB")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """``image`` flattened onto white and converted to a VAE's input channels: "L" for 1, "RGB" for 3."""
    if channels not in _MODES:
        raise ValueError(f"channels={channels!r} is not allowed; a VAE takes 1 (grayscale) or 3 (RGB) channels")
    return flatten(image).convert(_MODES[channels])


def to_tensor(image: Image.Image) -> Tensor:
    """An "L" or "RGB" image as a (1, C, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None] / 127.5 - 1


def mask_from_image(image: Image.Image) -> Image.Image:
    """The "L" mask of an image (white = repaint); a mask with a non-opaque alpha channel is that channel, at 255
    where alpha > 128 (AUTOMATIC1111's ``create_binary_mask``: a sketch drawn on a transparent layer)."""
    if has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda a: 255 if a > 128 else 0)
    return image.convert("L")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "resize") -> Image.Image:
    """``image`` at ``width`` x ``height`` with Lanczos, as AUTOMATIC1111's ``resize_image`` modes 0..2: "resize"
    stretches; "crop" scales to cover and crops the centre; "fill" scales to fit and fills the two margins by
    stretching the image's edge rows (or columns)."""
    if mode not in RESIZE_MODES[:3]:
        raise ValueError(f"mode={mode!r} is not allowed; allowed: {', '.join(RESIZE_MODES[:3])}")
    if mode == "resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill" and ratio != src_ratio:
        lanczos = Image.Resampling.LANCZOS
        if ratio < src_ratio:  # margins above and below: the first and last rows, stretched
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), lanczos, box=(0, 0, width, 0)), (0, 0))
                out.paste(resized.resize((width, fill), lanczos, box=(0, src_h, width, src_h)), (0, fill + src_h))
        else:  # margins left and right: the first and last columns
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), lanczos, box=(0, 0, 0, height)), (0, 0))
                out.paste(resized.resize((fill, height), lanczos, box=(src_w, 0, src_w, height)), (fill + src_w, 0))
    return out


def gaussian_kernel(sigma: float) -> np.ndarray:
    """AUTOMATIC1111's mask-blur kernel: OpenCV's ``getGaussianKernel`` of size ``2 * int(2.5 * sigma + 0.5) + 1``."""
    radius = int(2.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur_mask(mask: Image.Image, blur: float) -> Image.Image:
    """``mask`` ("L") blurred along x and then y with ``gaussian_kernel(blur)``, borders mirrored without repeating
    the edge (OpenCV's default), as AUTOMATIC1111's ``mask_blur``; 0 returns it unchanged. Computed in float and
    rounded once per axis, where OpenCV uses fixed point: at most one level apart."""
    if blur == 0:
        return mask
    out = np.asarray(mask, dtype=np.float64)
    kernel = gaussian_kernel(blur)
    radius = len(kernel) // 2
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        taps = [np.take(padded, range(i, i + n), axis=axis) * w for i, w in enumerate(kernel)]
        out = np.clip(np.rint(np.sum(taps, axis=0)), 0, 255)
    return Image.fromarray(out.astype(np.uint8))


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) that "only masked" inpainting repaints: the bounding box of the mask's nonzero
    pixels, ``padding`` pixels wider on each side (within the image), then grown to the aspect ratio of
    ``width`` x ``height`` and shifted inside the image (AUTOMATIC1111's ``get_crop_region_v2`` and
    ``expand_crop_region``). None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if padding:
        x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
        x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), mask.height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, by: int, size: int) -> tuple[int, int]:
    """The span [lo, hi) grown by ``by`` (half each side), shifted back inside [0, size), clipped if still too long."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's "fill" masked content: the masked area painted with ever less blurred copies of the unmasked
    colours (radii 256, 64, 16, 4, 2, 0), so sampling starts from the surroundings' colours, not the old content."""
    mode = image.mode
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB").convert(mode)


def overlay_mask(mask: Image.Image) -> Image.Image:
    """The weight of the generated pixels when the whole picture is inpainted: the blurred mask doubled and clipped,
    so the generated image shows fully wherever the mask is at least half on (AUTOMATIC1111's ``mask_for_overlay``)."""
    doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled)


def paste_back(
    generated: Image.Image,
    original: Image.Image,
    mask: Image.Image,
    box: tuple[int, int, int, int] | None = None,
    *,
    blend: bool = True,
) -> Image.Image:
    """The original pixels pasted back over ``generated`` where ``mask`` ("L", the generated image's weight, the
    size of ``original``) is below 255, blending in between: ``out = g * m / 255 + o * (1 - m / 255)``, rounded.

    With ``box`` (only-masked inpainting) ``generated`` covers that box of ``original``: it is scaled to the box
    (crop and resize) and put there first. ``blend=False`` returns that without blending (the original outside the
    box), or ``generated`` itself without a box.
    """
    if box is not None:
        x1, y1, x2, y2 = box
        canvas = original.copy()
        canvas.paste(resize_image(generated.convert(original.mode), x2 - x1, y2 - y1, "crop"), (x1, y1))
        generated = canvas
    if not blend:
        return generated
    g = np.asarray(generated.convert(original.mode), dtype=np.float64)
    o = np.asarray(original, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64) / 255
    if g.ndim == 3:
        m = m[..., None]
    return Image.fromarray(np.rint(g * m + o * (1 - m)).astype(np.uint8), mode=original.mode)
