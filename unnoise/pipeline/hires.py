"""Hires fix (AUTOMATIC1111's ``enable_hr``): generate at the request's size, upscale, then run img2img at the
larger size with the same prompt, seeds and sampler. ``Request.hires`` asks for it; ``Pipeline.generate`` runs both
passes. The upscalers are AUTOMATIC1111's latent modes (``shared.latent_upscale_modes``: interpolate the latents)
and its pixel ones (decode, resize, encode again).
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from PIL import Image
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Hires:
    """A second pass at ``scale`` times the size (or at ``width`` x ``height``: AUTOMATIC1111's hr_resize_x/y; one
    of them keeps the aspect ratio, both crop the centre), ``steps`` steps (None or 0: the first pass's) of img2img
    at ``strength`` from the first pass upscaled by ``upscaler`` (a name of ``UPSCALERS``)."""

    scale: float = 2.0
    upscaler: str = "latent"
    steps: int | None = None
    strength: float = 0.7
    width: int | None = None
    height: int | None = None


@dataclasses.dataclass(frozen=True)
class Upscaler:
    """An upscaler: ``mode`` interpolates latents (``torch.nn.functional.interpolate``), else ``resample`` resizes
    the decoded image with PIL."""

    a1111_name: str
    mode: str | None = None
    antialias: bool = False
    resample: Image.Resampling | None = None


UPSCALERS = {
    "latent": Upscaler("Latent", "bilinear"),
    "latent-antialiased": Upscaler("Latent (antialiased)", "bilinear", antialias=True),
    "latent-bicubic": Upscaler("Latent (bicubic)", "bicubic"),
    "latent-bicubic-antialiased": Upscaler("Latent (bicubic antialiased)", "bicubic", antialias=True),
    "latent-nearest": Upscaler("Latent (nearest)", "nearest"),
    "latent-nearest-exact": Upscaler("Latent (nearest-exact)", "nearest-exact"),
    "lanczos": Upscaler("Lanczos", resample=Image.Resampling.LANCZOS),
    "nearest": Upscaler("Nearest", resample=Image.Resampling.NEAREST),
}
# AUTOMATIC1111's names -> ours; its "None" resizes the image with Lanczos, as its Lanczos upscaler does
A1111_UPSCALERS = {u.a1111_name: name for name, u in UPSCALERS.items()} | {"None": "lanczos"}


@dataclasses.dataclass(frozen=True)
class HiresPlan:
    """A checked ``Hires`` for a first pass of a given size: the size it is upscaled to, and the box of that kept
    for the second pass (its size is the output's)."""

    hires: Hires
    steps: int  # the steps run
    grid_steps: int  # the steps of the grid whose last ``steps`` run
    upscale_to: tuple[int, int]  # (width, height)
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) in upscaled pixels, multiples of the VAE factor

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def hires_grid_steps(steps: int, strength: float) -> int:
    """The grid whose last ``steps`` steps the second pass runs: ``int(steps / min(strength, 0.999))``, as
    AUTOMATIC1111's ``setup_img2img_steps`` for a given step count (its hires steps are the steps run)."""
    return int(steps / min(strength, 0.999))


def target_size(hires: Hires, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) to upscale to, (width, height) wanted) as AUTOMATIC1111's ``calculate_target_resolution``:
    the scale, or hr_resize_x/y with the other side following the aspect ratio, or both: cover them, crop later."""
    rx, ry = hires.width or 0, hires.height or 0
    if not rx and not ry:
        size = int(width * hires.scale), int(height * hires.scale)
        return size, size
    if not ry:
        return (rx, rx * height // width), (rx, rx * height // width)
    if not rx:
        return (ry * width // height, ry), (ry * width // height, ry)
    if width / height < rx / ry:
        return (rx, rx * height // width), (rx, ry)
    return (ry * width // height, ry), (rx, ry)


def crop_box(upscale_to: tuple[int, int], wanted: tuple[int, int], factor: int) -> tuple[int, int, int, int]:
    """The centre box of the upscaled image that is kept, in whole latent pixels (AUTOMATIC1111's truncate_x/y)."""
    (w, h), f = upscale_to, factor
    tx, ty = (w - wanted[0]) // f, (h - wanted[1]) // f
    return tx // 2 * f, ty // 2 * f, w - (tx + 1) // 2 * f, h - (ty + 1) // 2 * f


def upscale_latents(latents: Tensor, plan: HiresPlan, factor: int) -> Tensor:
    """Latents (B, C, h, w) interpolated to the plan's size by its latent upscaler, then cropped to its box."""
    upscaler = UPSCALERS[plan.hires.upscaler]
    w, h = plan.upscale_to
    antialias = {"antialias": True} if upscaler.antialias else {}
    out = F.interpolate(latents, size=(h // factor, w // factor), mode=upscaler.mode, **antialias)
    x1, y1, x2, y2 = (v // factor for v in plan.box)
    return out[..., y1:y2, x1:x2]


def upscale_image(image: Image.Image, plan: HiresPlan) -> Image.Image:
    """A decoded first-pass image resized to the plan's size by its pixel upscaler, then cropped to its box."""
    resized = image.resize(plan.upscale_to, UPSCALERS[plan.hires.upscaler].resample)
    return resized.crop(plan.box) if plan.box != (0, 0, *plan.upscale_to) else resized
