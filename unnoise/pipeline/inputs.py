"""A pipeline call's arguments: validation with errors that name the argument, and reading images and masks."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from unnoise.checks import is_int, is_number
from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS
from unnoise.pipeline import images
from unnoise.pipeline.hires import UPSCALERS, Hires, HiresPlan, crop_box, hires_grid_steps, target_size
from unnoise.pipeline.prompts import extract_loras

ImageInput = Image.Image | str | Path
SEED_LIMIT = 2**63  # seeds of a request's images, seed .. seed + n - 1, lie below it (torch generators take 64 bits)


@dataclasses.dataclass
class Request:
    """One generation request as a caller states it; None takes the model's default (``pipeline.json``).

    ``image`` makes it img2img (``strength`` of the grid is run), ``mask`` too makes it inpainting (white is
    repainted; the original pixels are pasted back outside it unless ``paste_back=False``). Images are flattened
    onto white and converted to the VAE's channels; ``unnoise.pipeline.images`` has the resize modes, mask blur,
    masked content and "only masked" inpainting, ``unnoise.pipeline.hires`` the hires fix. ``latents`` is unit
    initial noise of shape (num_images, C, height/f, width/f), as diffusers' argument.
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
    # img2img and inpainting as AUTOMATIC1111 (``unnoise.pipeline.images``); non-default values need an image / mask
    resize_mode: str = "resize"  # when the image is not width x height: resize, crop, fill or latent
    mask_blur: float = 4  # std of the mask's Gaussian blur, in pixels
    mask_invert: bool = False  # repaint where the mask is black
    inpainting_fill: str = "original"  # under the mask before sampling: fill, original, latent_noise, latent_nothing
    inpaint_full_res: bool = False  # "only masked": inpaint the mask's box (+ padding) at width x height
    inpaint_full_res_padding: int = 32
    paste_back: bool = True  # the original pixels outside the (blurred) mask, as AUTOMATIC1111's overlay
    hires: Hires | None = None  # a second, upscaled img2img pass (AUTOMATIC1111's hires fix); text-to-image only
    latents: Tensor | None = None
    loras: dict[str, float] | None = None  # LoRA adapters by name and scale, exactly these; None: the pipeline's
    # AUTOMATIC1111's prompt language (docs/prompts.md), incl. <lora:name:w> tags; None: the pipeline's setting
    prompt_syntax: bool | None = None
    # feature caching (DeepCache, ``UNet.caching``): a full U-Net call every ``cache_interval`` calls, between them
    # only the outermost level on the cached inner output; 1: none. ``cache_range``: the (sigma_lo, sigma_hi) where
    # calls may reuse; None: everywhere
    cache_interval: int = 1
    cache_range: tuple[float, float] | None = None
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
class Overlay:
    """Inpainting's paste-back: ``images.paste_back(generated, original, mask, box, blend=blend)``."""

    original: Image.Image  # the init image as the output's canvas (flattened, the VAE's channels, resized)
    mask: Image.Image  # "L", the size of original: the generated pixels' weight (the blurred mask)
    box: tuple[int, int, int, int] | None  # "only masked": where the generated image goes in original
    blend: bool  # paste_back


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
    inpainting_fill: str = "original"  # the latent fills are applied in Pipeline._start, "fill" already to image
    overlay: Overlay | None = None  # inpainting: how the generated image goes back into the original
    hires: HiresPlan | None = None
    init_latents: Tensor | None = None  # (num_images, C, h, w): img2img from these instead of image (hires fix)
    run_steps: int | None = None  # img2img: the steps run at the grid's end; None: int(steps * strength)
    resize_mode: str = "resize"  # the rest are recorded in the PNG parameters
    mask_blur: float = 0.0
    mask_invert: bool = False
    inpaint_full_res_padding: int | None = None  # None: the whole picture is inpainted
    prompt_syntax: bool = True  # prompts in AUTOMATIC1111's language; ``loras`` includes the prompt's tags
    cache_interval: int = 1
    cache_range: tuple[float, float] | None = None

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys share one sampler pass: one grid, one latent shape, one guidance."""
        img2img = self.image is not None or self.init_latents is not None
        return (
            self.width, self.height, self.steps, self.sampler, self.spacing, self.guidance_scale,
            self.guidance_rescale, self.guidance_interval, img2img, self.mask is not None,
            self.strength if img2img else None, self.loras, self.hires, self.cache_interval, self.cache_range,
        )  # fmt: skip


# The names of the batch key's entries, for the message when requests cannot share a pass.
BATCH_KEY_FIELDS = ("width", "height", "steps", "sampler", "spacing", "guidance_scale", "guidance_rescale",
                    "guidance_interval", "image", "mask", "strength", "loras", "hires", "cache_interval",
                    "cache_range")  # fmt: skip


def _embedded_guidance(args: dict[str, Any]) -> None:
    """A U-Net with a guidance embedding (``time_cond_proj_dim``) makes no unconditional pass: no negative prompt and
    none of the settings that act on one."""
    why = "this model takes the guidance scale as an input (U-Net time_cond_proj_dim) and makes no unconditional pass"
    if args["negative_prompt"]:
        raise _fail("negative_prompt", args["negative_prompt"], f"{why}; allowed: '' or None")
    if args["guidance_rescale"]:
        raise _fail("guidance_rescale", args["guidance_rescale"], f"{why}; allowed: 0")
    if args["guidance_interval"] is not None:
        raise _fail("guidance_interval", args["guidance_interval"], f"{why}; allowed: None")


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    if isinstance(value, Tensor):
        shown = f"tensor of shape {tuple(value.shape)}"
    elif isinstance(value, Image.Image):  # not PIL's repr, with its object address
        shown = f"<{value.width}x{value.height} {value.mode} image>"
    else:
        shown = repr(value)
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
    found = _images(pipe, args)
    image, mask, width, height = found.image, found.mask, found.width, found.height
    if image is not None and int(steps * strength) < 1:
        raise _fail("strength", strength, f"with steps={steps} it runs int(steps * strength) = 0 steps; raise either")
    f = pipe.vae_factor
    latents = _latents(args["latents"], (n, pipe.vae.config.latent_channels, height // f, width // f))
    if getattr(pipe, "guidance_embedded", False):
        _embedded_guidance(args)
    return ResolvedRequest(
        args["prompt"], args["negative_prompt"], n, steps, sampler, scale, float(rescale),
        _interval(args["guidance_interval"], "guidance_interval"),
        seed, width, height, spacing, float(strength), image, mask, latents,
        _loras(pipe, args["loras"], _prompt_loras(pipe, args)), *_time_ids(pipe, args, width, height),
        **found.settings, prompt_syntax=_syntax(pipe, args),
        hires=_hires(pipe, args["hires"], image is not None, steps, width, height),
        cache_interval=_cache_interval(args["cache_interval"]),
        cache_range=_interval(args["cache_range"], "cache_range"),
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


def _syntax(pipe: Any, args: dict[str, Any]) -> bool:
    syntax = pipe.prompt_syntax if args["prompt_syntax"] is None else args["prompt_syntax"]
    if not isinstance(syntax, bool):
        raise _fail("prompt_syntax", syntax, "expected True, False or None (the pipeline's setting)")
    return syntax


def _prompt_loras(pipe: Any, args: dict[str, Any]) -> dict[str, float]:
    """The ``<lora:name:weight>`` tags of the prompt (none without the prompt language). As AUTOMATIC1111 reads
    them from the prompt only, a tag in the negative prompt is an error rather than text."""
    if not _syntax(pipe, args):
        return {}
    _, tags = extract_loras(args["prompt"])
    if args["negative_prompt"] is not None and extract_loras(args["negative_prompt"], "negative_prompt")[1]:
        raise _fail("negative_prompt", args["negative_prompt"], "LoRA tags are read from the prompt only")
    available = pipe.available_loras()
    for name in tags:
        if name not in available:
            listed = ", ".join(sorted(available)) or "none (load one with load_lora or set lora_dir)"
            raise _fail("prompt", args["prompt"], f"its tag names {name!r}, not a known LoRA; available: {listed}")
    return tags


def _loras(pipe: Any, loras: Any, tags: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """The adapters that run, sorted by name, without those at scale 0: the request's, else the pipeline's, with
    the prompt's tags added (a tag sets its adapter's scale over the pipeline's; one also in ``loras`` is an
    error)."""
    if loras is None:
        merged = {n: s for n, s in pipe.loras.items() if n not in tags} | tags
        return tuple(sorted((n, float(s)) for n, s in merged.items() if s != 0))
    if not isinstance(loras, dict):
        raise _fail("loras", loras, "expected a mapping of LoRA names to scales, or None")
    both = sorted(set(loras) & set(tags))
    if both:
        raise _fail("loras", loras, f"{both[0]!r} is also tagged in the prompt; give each LoRA in one place")
    loras = loras | tags
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


def _interval(interval: Any, name: str) -> tuple[float, float] | None:
    if interval is None:
        return None
    ok = isinstance(interval, tuple | list) and len(interval) == 2 and all(is_number(v) for v in interval)
    if not ok or not 0 <= interval[0] < interval[1]:
        raise _fail(name, interval, "expected (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, or None")
    return float(interval[0]), float(interval[1])


def _cache_interval(interval: Any) -> int:
    if not is_int(interval) or interval < 1:
        raise _fail("cache_interval", interval, "expected an integer >= 1 (1: no feature caching)")
    return interval


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


@dataclasses.dataclass
class _Images:
    """What ``_images`` read: the tensors that are sampled from, the size, and ``ResolvedRequest``'s other fields."""

    image: Tensor | None  # (1, C, H, W) in [-1, 1]
    mask: Tensor | None  # (1, 1, H, W), binarized
    width: int
    height: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


# Fields that describe the init image / the mask, with the default that needs neither.
IMAGE_FIELDS = {"resize_mode": "resize"}
MASK_FIELDS = {"mask_blur": 4, "mask_invert": False, "inpainting_fill": "original", "inpaint_full_res": False,
               "inpaint_full_res_padding": 32, "paste_back": True}  # fmt: skip


def _image_settings(args: dict[str, Any]) -> None:
    """Check the image and mask fields' values, and that those set to other than their defaults have their input."""
    for name, allowed in (("resize_mode", images.RESIZE_MODES), ("inpainting_fill", images.INPAINTING_FILLS)):
        if args[name] not in allowed:
            raise _fail(name, args[name], f"allowed: {', '.join(allowed)}")
    if not is_number(args["mask_blur"]) or args["mask_blur"] < 0:
        raise _fail("mask_blur", args["mask_blur"], "expected a number >= 0 (the blur's standard deviation in pixels)")
    for name in ("mask_invert", "inpaint_full_res", "paste_back"):
        if not isinstance(args[name], bool):
            raise _fail(name, args[name], "expected True or False")
    padding = args["inpaint_full_res_padding"]
    if not is_int(padding) or padding < 0:
        raise _fail("inpaint_full_res_padding", padding, "expected an integer >= 0 (pixels)")
    if padding != MASK_FIELDS["inpaint_full_res_padding"] and not args["inpaint_full_res"]:
        raise _fail("inpaint_full_res_padding", padding, "it pads the box of inpaint_full_res=True, which is not set")
    for fields, needed in ((IMAGE_FIELDS, "image"), (MASK_FIELDS, "mask")):
        for name, default in fields.items():
            if args[needed] is None and args[name] != default:
                raise _fail(name, args[name], f"it applies to a {needed}, and none is given (pass {needed}=...)")


def _images(pipe: Any, args: dict[str, Any]) -> _Images:
    """The image and mask read, converted, resized and masked as AUTOMATIC1111's img2img prepares them."""
    _image_settings(args)
    factor = pipe.latent_factor
    if args["image"] is None:
        if args["mask"] is not None:
            raise _fail("mask", args["mask"], "a mask needs an image to inpaint (pass image=...)")
        width, height = pipe.default_size
        width = _size("width", width if args["width"] is None else args["width"], factor)
        height = _size("height", height if args["height"] is None else args["height"], factor)
        return _Images(None, None, width, height)
    original = images.to_channels(read_image("image", args["image"]), pipe.vae.config.in_channels)
    mask = images.mask_from_image(read_image("mask", args["mask"])) if args["mask"] is not None else None
    if mask is not None and mask.size != original.size:
        sizes = f"{mask.size[0]}x{mask.size[1]} differs from the image's {original.size[0]}x{original.size[1]}"
        raise _fail("mask", args["mask"], f"its size {sizes}")
    if (args["width"] is None and original.width % factor) or (args["height"] is None and original.height % factor):
        size = f"{original.width}x{original.height}"
        raise _fail("image", args["image"], f"its size {size} is not a multiple of {factor}; pass width and height")
    width = _size("width", original.width if args["width"] is None else args["width"], factor)
    height = _size("height", original.height if args["height"] is None else args["height"], factor)
    mode, resized = args["resize_mode"], original.size != (width, height)
    settings: dict[str, Any] = {"resize_mode": mode}
    if mode == "latent" and resized:  # encoded at its own size, the latents interpolated (Pipeline._start)
        if mask is not None or original.width % pipe.vae_factor or original.height % pipe.vae_factor:
            f = pipe.vae_factor
            why = "without a mask" if mask is not None else f"to an image whose sides are multiples of {f}"
            raise _fail("resize_mode", mode, f"a latent resize applies {why}; use resize, crop or fill")
        return _Images(images.to_tensor(original), None, width, height, settings)
    image = images.resize_image(original, width, height, mode) if resized else original
    if mask is None:
        return _Images(images.to_tensor(image), None, width, height, settings)
    return _inpainting(args, original, image, mask, width, height, settings)


def _inpainting(
    args: dict[str, Any], original: Image.Image, image: Image.Image, mask: Image.Image, width: int, height: int,
    settings: dict[str, Any],
) -> _Images:  # fmt: skip
    """The mask inverted and blurred, "only masked" cropping or the whole picture, the masked content "fill", and
    the overlay that pastes the original back: ``image`` is ``original`` at width x height, ``mask`` its mask."""
    mask = images.blur_mask(ImageOps.invert(mask) if args["mask_invert"] else mask, args["mask_blur"])
    settings.update(mask_blur=float(args["mask_blur"]), mask_invert=args["mask_invert"])
    settings["inpainting_fill"] = args["inpainting_fill"]
    if args["inpaint_full_res"]:
        box = images.crop_region(mask, args["inpaint_full_res_padding"], width, height)
        if box is None:
            raise _fail("inpaint_full_res", True, "the mask is empty, so it has no region to inpaint")
        settings["overlay"] = Overlay(original, mask, box, args["paste_back"])
        settings["inpaint_full_res_padding"] = args["inpaint_full_res_padding"]
        image = images.resize_image(original.crop(box), width, height, "fill")
        mask = images.resize_image(mask.crop(box), width, height, "fill")
    else:
        if mask.size != (width, height):
            mask = images.resize_image(mask, width, height, args["resize_mode"])
        if args["paste_back"]:
            settings["overlay"] = Overlay(image, images.overlay_mask(mask), None, True)
    if args["inpainting_fill"] == "fill":
        image = images.fill_masked(image, mask)
    binary = (torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None] / 255 >= 0.5).float()
    return _Images(images.to_tensor(image), binary, width, height, settings)


def _hires(pipe: Any, hires: Any, img2img: bool, steps: int, width: int, height: int) -> HiresPlan | None:
    """``hires`` checked against the first pass's size and steps: what the second pass runs."""
    if hires is None:
        return None
    if not isinstance(hires, Hires):
        raise _fail("hires", hires, "expected an unnoise.pipeline.Hires, or None")
    if img2img:
        raise _fail("hires", hires, "the hires fix applies to text-to-image; an image is given")
    if hires.upscaler not in UPSCALERS:
        raise _fail("hires.upscaler", hires.upscaler, f"allowed: {', '.join(UPSCALERS)}")
    if not is_number(hires.scale) or hires.scale < 1:
        raise _fail("hires.scale", hires.scale, "expected a number >= 1")
    for name in ("width", "height"):
        value = getattr(hires, name)
        if value is not None and (not is_int(value) or value < 0):
            raise _fail(f"hires.{name}", value, "expected an integer >= 0 (0 or None: from the other side or scale)")
    second = hires.steps or steps
    if not is_int(second) or not 1 <= second <= pipe.num_train_timesteps:
        raise _fail("hires.steps", hires.steps, f"expected an integer from 1 to {pipe.num_train_timesteps}, or None")
    if not is_number(hires.strength) or not 0 < hires.strength <= 1:
        raise _fail("hires.strength", hires.strength, "expected a number in (0, 1]")
    grid = hires_grid_steps(second, hires.strength)
    if grid > pipe.num_train_timesteps:
        limit = pipe.num_train_timesteps
        raise _fail("hires.strength", hires.strength, f"with {second} hires steps its grid has int({second} / "
                    f"strength) = {grid} steps, more than the model's {limit} timesteps")  # fmt: skip
    upscale_to, wanted = target_size(hires, width, height)
    factor, f = pipe.latent_factor, pipe.vae_factor
    box = crop_box(upscale_to, wanted, f)
    plan = HiresPlan(hires, second, grid, upscale_to, box)
    if upscale_to[0] % f or upscale_to[1] % f or plan.size[0] % factor or plan.size[1] % factor:
        size = f"{width}x{height} -> {upscale_to[0]}x{upscale_to[1]}, cropped to {plan.size[0]}x{plan.size[1]}"
        raise _fail("hires", hires, f"its size ({size}) must be a multiple of {factor} (the latent factor)")
    return plan


def read_image(name: str, value: Any, mode: str | None = None) -> Image.Image:
    """A PIL image (in ``mode``, else as stored) from a PIL image or a path; ValueError naming ``name`` if it cannot be
    read."""
    if isinstance(value, Image.Image):
        return value.convert(mode) if mode is not None else value
    if not isinstance(value, str | Path):
        raise _fail(name, value, "expected a PIL image or the path of an image file")
    try:
        with Image.open(Path(value)) as img:
            img.load()
            return img.convert(mode) if mode is not None else img.copy()
    except (OSError, UnidentifiedImageError) as error:
        raise _fail(name, str(value), f"it is not a readable image file ({type(error).__name__})") from None
