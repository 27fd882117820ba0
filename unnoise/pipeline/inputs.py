"""A pipeline call's arguments: validation with errors that name the argument, and reading images and masks."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from unnoise.checks import is_int, is_number
from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS

ImageInput = Image.Image | str | Path
SEED_LIMIT = 2**63  # seeds of a request's images, seed .. seed + n - 1, lie below it (torch generators take 64 bits)


@dataclasses.dataclass
class Request:
    """One generation request as a caller states it; None takes the model's default (``pipeline.json``).

    ``image`` makes it img2img (``strength`` of the grid is run), ``mask`` too makes it inpainting (white is
    repainted); ``latents`` is unit initial noise of shape (num_images, C, height/f, width/f), as diffusers' argument.
    ``loras`` maps adapter names (loaded with ``Pipeline.load_lora`` or files of ``Pipeline.lora_dir``) to scales;
    adapters it leaves out are off for this request. ``original_size``, ``crops_coords_top_left``, ``target_size``
    and the refiner's ``aesthetic_score`` / ``negative_aesthetic_score`` are SDXL's size conditioning (Podell et al.
    2023), refused by models without it.
    Images ``i`` get seed ``seed + i`` (random when None), so an image is the same alone and in any batch.
    """

    prompt: str
    _: dataclasses.KW_ONLY
    negative_prompt: str | None = None
    num_images: int = 1
    steps: int | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    spacing: str | None = None
    image: ImageInput | None = None
    strength: float = 0.8
    mask: ImageInput | None = None
    latents: Tensor | None = None
    loras: dict[str, float] | None = None  # LoRA adapters by name and scale, exactly these; None: the pipeline's
    # SDXL micro-conditioning, (height, width) pairs as diffusers names them; None: (height, width) and (0, 0)
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None  # SDXL refiner: 6.0 by default (the negative branch gets 2.5)
    negative_aesthetic_score: float | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True, eq=False)
class ResolvedRequest:
    """A request checked against a pipeline, with the model's defaults filled in and its image and mask read."""

    prompt: str
    negative_prompt: str | None
    num_images: int
    steps: int
    sampler: str
    guidance_scale: float
    guidance_rescale: float
    guidance_interval: tuple[float, float] | None
    seed: int
    width: int
    height: int
    spacing: str
    strength: float
    image: Tensor | None  # (1, 3, H, W) in [-1, 1]
    mask: Tensor | None  # (1, 1, H, W), 1 = repaint, binarized at 0.5 as diffusers does
    latents: Tensor | None
    loras: tuple[tuple[str, float], ...] = ()  # the adapters that run, by name, with their scales (none at 0)
    time_ids: tuple[float, ...] | None = None  # SDXL: the conditional branch's size (and aesthetic) conditioning
    negative_time_ids: tuple[float, ...] | None = None

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys share one sampler pass: one grid, one latent shape, one guidance."""
        img2img = self.image is not None
        return (
            self.width, self.height, self.steps, self.sampler, self.spacing, self.guidance_scale,
            self.guidance_rescale, self.guidance_interval, img2img, self.mask is not None,
            self.strength if img2img else None, self.loras,
        )  # fmt: skip


# The names of the batch key's entries, for the message when requests cannot share a pass.
BATCH_KEY_FIELDS = ("width", "height", "steps", "sampler", "spacing", "guidance_scale", "guidance_rescale",
                    "guidance_interval", "image", "mask", "strength", "loras")  # fmt: skip


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    shown = repr(value) if not isinstance(value, Tensor) else f"tensor of shape {tuple(value.shape)}"
    return ValueError(f"{name}={shown} is not allowed; {allowed}")


def resolve_request(pipe: Any, request: Request) -> ResolvedRequest:
    """Check ``request`` against the pipeline ``pipe``, read its image and mask, fill in the model's defaults.

    A bad value raises ``ValueError("field=value is not allowed; ...")``, naming the field as ``Request`` does.
    """
    if not isinstance(request, Request):
        raise TypeError(f"expected an unnoise.pipeline.Request, got {type(request).__name__}")
    args = {name: getattr(request, name) for name in Request.field_names()}
    if not isinstance(args["prompt"], str):
        raise _fail("prompt", args["prompt"], "expected a str")
    if args["negative_prompt"] is not None and not isinstance(args["negative_prompt"], str):
        raise _fail("negative_prompt", args["negative_prompt"], "expected a str or None")
    n = args["num_images"]
    if not is_int(n) or n < 1:
        raise _fail("num_images", n, "expected an integer >= 1")
    steps, sampler, spacing, scale = _sampling(pipe, args)
    rescale = args["guidance_rescale"]
    if not is_number(rescale) or not 0 <= rescale <= 1:
        raise _fail("guidance_rescale", rescale, "expected a number in [0, 1]")
    seed = secrets.randbelow(2**32) if args["seed"] is None else args["seed"]
    if not is_int(seed) or not 0 <= seed <= SEED_LIMIT - n:
        raise _fail("seed", seed, "expected an integer from 0 to 2**63 - num_images (seeds seed .. seed + "
                    "num_images - 1 must be below 2**63), or None for a random one")  # fmt: skip
    strength = args["strength"]
    if not is_number(strength) or not 0 < strength <= 1:
        raise _fail("strength", strength, "expected a number in (0, 1]")
    image, mask, width, height = _images(pipe, args)
    if image is not None and int(steps * strength) < 1:
        raise _fail("strength", strength, f"with steps={steps} it runs int(steps * strength) = 0 steps; raise either")
    f = pipe.vae_factor
    latents = _latents(args["latents"], (n, pipe.vae.config.latent_channels, height // f, width // f))
    return ResolvedRequest(
        args["prompt"], args["negative_prompt"], n, steps, sampler, scale, float(rescale),
        _interval(args["guidance_interval"]), seed, width, height, spacing, float(strength), image, mask, latents,
        _loras(pipe, args["loras"]), *_time_ids(pipe, args, width, height),
    )  # fmt: skip


MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                      "negative_aesthetic_score")  # fmt: skip
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' refiner defaults


def _time_ids(pipe: Any, args: dict[str, Any], width: int, height: int) -> tuple[tuple | None, tuple | None]:
    """SDXL's time ids of the conditional and unconditional branches: original size, crop top-left, then target
    size (base) or aesthetic score (refiner), as diffusers' SDXL pipelines build them; (None, None) elsewhere."""
    count = pipe.time_id_count
    if count is None:
        given = [name for name in MICRO_CONDITIONING if args[name] is not None]
        if given:
            raise _fail(given[0], args[given[0]], "this model has no size conditioning (an SDXL U-Net has)")
        return None, None
    pairs = {}
    for name, default in (("original_size", (height, width)), ("crops_coords_top_left", (0, 0)),
                          ("target_size", (height, width))):  # fmt: skip
        value = default if args[name] is None else args[name]
        ok = isinstance(value, tuple | list) and len(value) == 2 and all(is_int(v) and v >= 0 for v in value)
        if not ok:
            raise _fail(name, value, "expected a (height, width) pair of integers >= 0, or None")
        pairs[name] = tuple(int(v) for v in value)
    scores = []
    for name, default in (("aesthetic_score", AESTHETIC_SCORE), ("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE)):
        value = default if args[name] is None else args[name]
        if not is_number(value):
            raise _fail(name, value, "expected a finite number, or None")
        scores.append(float(value))
    head = (*pairs["original_size"], *pairs["crops_coords_top_left"])
    if count == 6:
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if args[name] is not None:
                raise _fail(name, args[name], "this model takes a target size, not an aesthetic score (a refiner does)")
        ids = tuple(float(v) for v in (*head, *pairs["target_size"]))
        return ids, ids
    if args["target_size"] is not None:
        raise _fail("target_size", args["target_size"], "this model (a refiner) takes an aesthetic score instead")
    return tuple(float(v) for v in (*head, scores[0])), tuple(float(v) for v in (*head, scores[1]))


def _loras(pipe: Any, loras: Any) -> tuple[tuple[str, float], ...]:
    """The adapters that run, sorted by name, without those at scale 0: the request's, else the pipeline's."""
    if loras is None:
        return tuple(sorted((n, s) for n, s in pipe.loras.items() if s != 0))
    if not isinstance(loras, dict):
        raise _fail("loras", loras, "expected a mapping of LoRA names to scales, or None")
    available = pipe.available_loras()
    for name, scale in loras.items():
        if name not in available:
            listed = ", ".join(sorted(available)) or "none (load one with load_lora or set lora_dir)"
            raise _fail("loras", loras, f"{name!r} is not a known LoRA; available: {listed}")
        if not is_number(scale):
            raise _fail(f"loras[{name!r}]", scale, "expected a finite number")
    return tuple(sorted((n, float(s)) for n, s in loras.items() if s != 0))


def _sampling(pipe: Any, args: dict[str, Any]) -> tuple[int, str, str, float]:
    """(steps, sampler, spacing, guidance scale), the model's defaults where the call gives None."""
    defaults, num_train_timesteps = pipe.config.sampling, pipe.num_train_timesteps
    steps = defaults.steps if args["steps"] is None else args["steps"]
    if not is_int(steps) or not 1 <= steps <= num_train_timesteps:
        raise _fail("steps", steps, f"expected an integer from 1 to the {num_train_timesteps} training timesteps")
    sampler = defaults.sampler if args["sampler"] is None else args["sampler"]
    if sampler not in SAMPLERS:
        raise _fail("sampler", sampler, f"allowed: {', '.join(SAMPLERS)}")
    spacing = defaults.spacing if args["spacing"] is None else args["spacing"]
    if spacing not in SPACINGS:
        raise _fail("spacing", spacing, f"allowed: {', '.join(SPACINGS)}")
    scale = defaults.guidance_scale if args["guidance_scale"] is None else args["guidance_scale"]
    if not is_number(scale):
        raise _fail("guidance_scale", scale, "expected a finite number")
    return steps, sampler, spacing, float(scale)


def _interval(interval: Any) -> tuple[float, float] | None:
    if interval is None:
        return None
    ok = isinstance(interval, tuple | list) and len(interval) == 2 and all(is_number(v) for v in interval)
    if not ok or not 0 <= interval[0] < interval[1]:
        raise _fail(
            "guidance_interval", interval, "expected (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, or None"
        )
    return float(interval[0]), float(interval[1])


def _latents(latents: Any, shape: tuple[int, ...]) -> Tensor | None:
    if latents is None:
        return None
    if not isinstance(latents, Tensor) or tuple(latents.shape) != shape or not latents.is_floating_point():
        raise _fail("latents", latents, f"expected a float tensor of shape {shape} (num_images, C, height/f, width/f)")
    if not torch.isfinite(latents).all():
        raise _fail("latents", latents, "expected finite values")
    return latents


def _size(name: str, value: Any, factor: int) -> int:
    if not is_int(value) or value < factor or value % factor:
        raise _fail(name, value, f"expected a positive multiple of {factor} (the latent factor of this model)")
    return value


def _images(pipe: Any, args: dict[str, Any]) -> tuple[Tensor | None, Tensor | None, int, int]:
    """(image in [-1, 1], binarized mask, width, height); an image of another size is resized to width x height."""
    factor = pipe.latent_factor
    if args["image"] is None:
        if args["mask"] is not None:
            raise _fail("mask", args["mask"], "a mask needs an image to inpaint (pass image=...)")
        width, height = pipe.default_size
        width = _size("width", width if args["width"] is None else args["width"], factor)
        height = _size("height", height if args["height"] is None else args["height"], factor)
        return None, None, width, height
    image = read_image("image", args["image"], "RGB")
    mask = read_image("mask", args["mask"], "L") if args["mask"] is not None else None
    if mask is not None and mask.size != image.size:
        sizes = f"{mask.size[0]}x{mask.size[1]} differs from the image's {image.size[0]}x{image.size[1]}"
        raise _fail("mask", args["mask"], f"its size {sizes}")
    if (args["width"] is None and image.width % factor) or (args["height"] is None and image.height % factor):
        size = f"{image.width}x{image.height}"
        raise _fail("image", args["image"], f"its size {size} is not a multiple of {factor}; pass width and height")
    width = _size("width", image.width if args["width"] is None else args["width"], factor)
    height = _size("height", image.height if args["height"] is None else args["height"], factor)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        mask = mask.resize((width, height), Image.Resampling.NEAREST) if mask is not None else None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    mask_t = None
    if mask is not None:
        mask_t = (torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None] / 255 >= 0.5).float()
    return pixels, mask_t, width, height


def read_image(name: str, value: Any, mode: str) -> Image.Image:
    """A PIL image in ``mode`` from a PIL image or a path; ValueError naming ``name`` if it cannot be read."""
    if isinstance(value, Image.Image):
        return value.convert(mode)
    if not isinstance(value, str | Path):
        raise _fail(name, value, "expected a PIL image or the path of an image file")
    try:
        with Image.open(Path(value)) as img:
            return img.convert(mode)
    except (OSError, UnidentifiedImageError) as error:
        raise _fail(name, str(value), f"it is not a readable image file ({type(error).__name__})") from None
