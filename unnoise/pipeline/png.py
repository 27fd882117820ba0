"""Generation parameters in AUTOMATIC1111's text format, stored in a PNG ``parameters`` tEXt chunk.

The text is the prompt, then a ``Negative prompt: ...`` line (left out when there is none), then one line of
``Key: value`` pairs separated by ", " (``Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512,
Model hash: 0123456789``). Values holding ``,``, ``:`` or a newline are JSON-quoted, as AUTOMATIC1111 does.
``parse_parameters`` reads this back into the keyword arguments of ``Pipeline.__call__``, so an image can be
regenerated from its file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from unnoise.core.samplers import SAMPLER_INFO
from unnoise.pipeline.hires import A1111_UPSCALERS, UPSCALERS, Hires
from unnoise.pipeline.prompts import extract_loras
from unnoise.safety.provenance import PROVENANCE_KEYS

# Our sampler names -> AUTOMATIC1111's, from the sampler records; those with none there (ddpm) are written as ours.
A1111_SAMPLERS = {name: info.a1111_name for name, info in SAMPLER_INFO.items() if info.a1111_name is not None}
# Our grid spacings -> AUTOMATIC1111's "Schedule type" (the others have no counterpart there).
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential"}

# (key in the parsed dict, label in the text, parser); written in this order, after prompt and negative prompt.
_FIELDS: list[tuple[str, str, Any]] = [
    ("steps", "Steps", int),
    ("sampler", "Sampler", lambda v: _SAMPLERS_BACK.get(v, v)),
    ("schedule_type", "Schedule type", str),
    ("guidance_scale", "CFG scale", float),
    ("seed", "Seed", int),
    ("size", "Size", str),
    ("model_hash", "Model hash", str),
    ("model", "Model", str),
    ("strength", "Denoising strength", float),
    ("guidance_rescale", "Guidance rescale", float),
    ("guidance_interval", "Guidance interval", lambda v: tuple(json.loads(v))),
    ("cache_interval", "Cache interval", int),
    ("prompt_syntax", "Prompt syntax", lambda v: _lookup(_ON_OFF, v)),
    ("cache_range", "Cache range", lambda v: tuple(json.loads(v))),
    ("spacing", "Spacing", str),
    ("batch_size", "Batch size", int),
    ("batch_pos", "Batch pos", int),
    ("lora_hashes", "Lora hashes", lambda v: _parse_lora_hashes(v)),
    ("original_size", "Original size", lambda v: tuple(json.loads(v))),
    ("crops_coords_top_left", "Crop top left", lambda v: tuple(json.loads(v))),
    ("target_size", "Target size", lambda v: tuple(json.loads(v))),
    ("aesthetic_score", "Aesthetic score", float),
    ("negative_aesthetic_score", "Negative aesthetic score", float),
    ("resize_mode", "Resize mode", lambda v: _lookup(_RESIZE_MODES, v)),
    ("mask_blur", "Mask blur", float),
    ("mask_invert", "Mask mode", lambda v: _lookup(_MASK_MODES, v)),
    ("inpainting_fill", "Masked content", lambda v: _lookup(_MASKED_CONTENT, v)),
    ("inpaint_full_res", "Inpaint area", lambda v: _lookup(_INPAINT_AREAS, v)),
    ("inpaint_full_res_padding", "Masked area padding", int),
    ("paste_back", "Paste back", lambda v: _lookup(_YES_NO, v)),
    ("hires_scale", "Hires upscale", float),
    ("hires_resize", "Hires resize", lambda v: _parse_size(v, "Hires resize")),
    ("hires_steps", "Hires steps", int),
    ("hires_upscaler", "Hires upscaler", lambda v: A1111_UPSCALERS.get(v, v)),
]
# AUTOMATIC1111's texts for img2img and inpainting settings (its UI's choices); ours where it writes none.
_RESIZE_MODES = {"resize": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill",
                 "latent": "Just resize (latent upscale)"}  # fmt: skip
_MASK_MODES = {False: "Inpaint masked", True: "Inpaint not masked"}
_MASKED_CONTENT = {"fill": "fill", "original": "original", "latent_noise": "latent noise",
                   "latent_nothing": "latent nothing"}  # fmt: skip
_INPAINT_AREAS = {False: "Whole picture", True: "Only masked"}
_YES_NO = {True: "yes", False: "no"}
_ON_OFF = {True: "on", False: "off"}
_PAIRS = (
    "guidance_interval",
    "cache_range",
    "original_size",
    "crops_coords_top_left",
    "target_size",
)  # written as JSON lists
# The parsed keys that are keyword arguments of Pipeline.__call__ (with the image's own seed).
CALL_KEYS = ("prompt", "negative_prompt", "steps", "sampler", "guidance_scale", "seed", "width", "height", "spacing")
CALL_KEYS += ("guidance_rescale", "guidance_interval", "strength", "loras", "original_size", "crops_coords_top_left")
CALL_KEYS += ("target_size", "aesthetic_score", "negative_aesthetic_score", "resize_mode", "mask_blur", "mask_invert")
CALL_KEYS += ("inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "paste_back", "cache_interval")
CALL_KEYS += ("cache_range", "prompt_syntax")
HIRES_KEYS = ("hires_scale", "hires_resize", "hires_steps", "hires_upscaler")  # parsed keys that make ``hires``
_SAMPLERS_BACK = {v: k for k, v in A1111_SAMPLERS.items()}
_BY_LABEL = {label: (key, parse) for key, label, parse in _FIELDS}
# AUTOMATIC1111's pattern for one "Key: value" pair of the last line (modules/infotext_utils.py).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _lookup(table: dict[Any, str], text: str) -> Any:
    """The key of ``table`` whose text is ``text``; ValueError naming the texts allowed."""
    for key, value in table.items():
        if value == text:
            return key
    raise ValueError(f"expected one of {', '.join(table.values())}")


def _parse_size(text: str, label: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None:
        raise ValueError(f"parameters field {label!r} has value {text!r}; expected WIDTHxHEIGHT")
    return int(match[1]), int(match[2])


def _parse_lora_hashes(text: str) -> dict[str, str]:
    """``"name: hash, name: hash"`` (AUTOMATIC1111's "Lora hashes") as a dict."""
    pairs = [part.split(":", 1) for part in text.split(",") if part.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError("expected 'name: hash' pairs separated by ','")
    return {name.strip(): value.strip() for name, value in pairs}


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_parameters(params: dict[str, Any]) -> str:
    """AUTOMATIC1111-format text for ``params`` (keys as ``parse_parameters`` returns them; None values left out)."""
    values = dict(params)
    if values.get("width") is not None and values.get("height") is not None:
        values["size"] = f"{values['width']}x{values['height']}"
    if values.get("sampler") is not None:
        values["sampler"] = A1111_SAMPLERS.get(values["sampler"], values["sampler"])
    if values.get("spacing") in A1111_SCHEDULES:
        values["schedule_type"] = A1111_SCHEDULES[values["spacing"]]
    for key in _PAIRS[:2]:
        if values.get(key) is not None:
            values[key] = json.dumps([float(v) for v in values[key]])
    for key in _PAIRS[2:]:
        if values.get(key) is not None:
            values[key] = json.dumps([int(v) for v in values[key]])
    for key, table in (("resize_mode", _RESIZE_MODES), ("mask_invert", _MASK_MODES), ("paste_back", _YES_NO),
                       ("prompt_syntax", _ON_OFF),
                       ("inpainting_fill", _MASKED_CONTENT), ("inpaint_full_res", _INPAINT_AREAS)):  # fmt: skip
        if values.get(key) is not None:
            values[key] = table[values[key]]
    for key in ("mask_blur", "hires_scale"):
        if values.get(key) is not None:
            values[key] = _number(values[key])
    if values.get("hires_resize") is not None:
        values["hires_resize"] = "{}x{}".format(*values["hires_resize"])
    if values.get("hires_upscaler") in UPSCALERS:
        values["hires_upscaler"] = UPSCALERS[values["hires_upscaler"]].a1111_name
    loras = values.get("loras") or {}  # name -> scale, written as AUTOMATIC1111 does: prompt tags and their hashes
    hashes = values.get("lora_hashes") or {}
    values["lora_hashes"] = ", ".join(f"{name}: {h}" for name, h in hashes.items()) if hashes else None
    pairs = [f"{label}: {_quote(values[key])}" for key, label, _ in _FIELDS if values.get(key) is not None]
    pairs += [f"{label}: {_quote(value)}" for label, value in (values.get("extra") or {}).items()]
    tags = "".join(f" <lora:{name}:{_number(scale)}>" for name, scale in loras.items())
    lines = [(values.get("prompt") or "") + tags]
    if values.get("negative_prompt"):
        lines.append(f"Negative prompt: {values['negative_prompt']}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:g}" if float(value) == float(f"{value:g}") else repr(float(value))


def split_parameters(text: str) -> tuple[str, str | None, list[tuple[str, str]]]:
    """AUTOMATIC1111-format parameters as it splits them: (prompt, negative prompt or None, the settings line's
    (label, value) pairs in order, quoted values unquoted). A last line of fewer than 3 pairs is prompt."""
    if not isinstance(text, str):
        raise ValueError(f"parameters must be a str, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no settings line: everything is prompt (as AUTOMATIC1111 reads it)
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    pairs = [(label.strip(), _unquote(raw.strip())) for label, raw in _PAIR.findall(last)]
    return "\n".join(prompt), "\n".join(negative) if in_negative else None, pairs


def parse_parameters(text: str) -> dict[str, Any]:
    """Read AUTOMATIC1111-format parameters: prompt, negative_prompt, steps, sampler (our name), guidance_scale, ...

    Known labels become ``Pipeline.__call__`` keyword arguments (``width``/``height`` from ``Size``, ``spacing``
    from ``Spacing`` or else ``Schedule type``, ``loras`` from the prompt's ``<lora:name:weight>`` tags, which are
    removed from ``prompt``); ``model_hash``, ``model`` and ``lora_hashes`` describe the weights, ``batch_size``
    and ``batch_pos`` the batch the image was made in (``call_arguments`` turns all this into a call); labels we
    do not know are kept, as text, in ``extra``.
    """
    prompt, negative, pairs = split_parameters(text)
    result: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    extra: dict[str, str] = {}
    for label, value in pairs:
        if label not in _BY_LABEL:
            extra[label] = value
            continue
        key, parse = _BY_LABEL[label]
        try:
            result[key] = parse(value)
        except (ValueError, TypeError) as error:
            raise ValueError(f"parameters field {label!r} has value {value!r}, which does not parse: {error}") from None
    if result.get("prompt_syntax", True):  # the prompt language's LoRA tags; with it off they are plain text
        text_prompt, loras = extract_loras(prompt)
        result["prompt"] = "\n".join(line.strip() for line in text_prompt.split("\n"))  # as split_parameters
        if loras:
            result["loras"] = loras
    _settle_size_and_spacing(result)
    result["extra"] = extra
    return result


def _settle_size_and_spacing(result: dict[str, Any]) -> None:
    size = result.pop("size", None)
    if size is not None:
        result["width"], result["height"] = _parse_size(size, "Size")
    schedule = result.pop("schedule_type", None)
    if "spacing" not in result and schedule is not None:
        result["spacing"] = {v: k for k, v in A1111_SCHEDULES.items()}.get(schedule)


def call_arguments(params: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``Pipeline.__call__`` arguments that regenerate the batch an image came from, and its index in that batch.

    Image i of a batch equals the image generated alone with seed ``seed + i`` up to float rounding (the batch
    size changes which kernels run: at most 1/255, in a few pixels); regenerating the whole batch is bit-exact.
    """
    kwargs = {key: params[key] for key in CALL_KEYS if params.get(key) is not None}
    hires = {key: params[key] for key in HIRES_KEYS if key in params}
    if hires:  # AUTOMATIC1111's hires fix: its "Denoising strength" is the second pass's
        width, height = hires.get("hires_resize", (0, 0))
        kwargs["hires"] = Hires(
            scale=hires.get("hires_scale", 2.0), upscaler=hires.get("hires_upscaler", "latent"),
            steps=hires.get("hires_steps"), strength=kwargs.pop("strength", 0.7), width=width or None,
            height=height or None,
        )  # fmt: skip
    pos = params.get("batch_pos") or 0
    if params.get("batch_size"):
        kwargs["num_images"] = params["batch_size"]
    if "seed" in kwargs:
        kwargs["seed"] -= pos
    return kwargs, pos


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as a PNG whose ``parameters`` tEXt chunk holds ``image.info["parameters"]`` (if any)."""
    info = PngImagePlugin.PngInfo()
    parameters = image.info.get("parameters")
    if parameters is not None:
        info.add_text("parameters", parameters)
    image.save(Path(path), format="PNG", pnginfo=info)


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """``parse_parameters`` of the ``parameters`` chunk of the PNG at ``path``; ValueError if it has none."""
    with Image.open(Path(path)) as image:
        text = image.info.get("parameters")
    if text is None:
        raise ValueError(f"{path} has no 'parameters' text chunk; it was not written by unnoise or AUTOMATIC1111")
    return parse_parameters(text)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Images (B, 1 or 3, H, W) in [-1, 1] to 8-bit PIL images ("L" or "RGB"), rounded as diffusers does."""
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"pixels have shape {tuple(pixels.shape)}; expected (batch, 1 or 3, height, width)")
    array = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if array.shape[-1] == 1:
        return [Image.fromarray(np.ascontiguousarray(a[..., 0])) for a in array]
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def make_grid(images: list[Image.Image]) -> Image.Image:
    """The images in a near-square grid, row by row (all the size of the first)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new(images[0].mode if images[0].mode == "L" else "RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def add_provenance(image: Image.Image, fields: dict[str, str]) -> None:
    """Add (or replace) ``fields`` on the settings line of ``image.info["parameters"]``; no-op without parameters."""
    text = image.info.get("parameters")
    if text is None:
        return
    params = parse_parameters(text)
    params["extra"] = {**params["extra"], **fields}
    image.info["parameters"] = format_parameters(params)


def read_provenance(text: str) -> dict[str, str]:
    """The provenance fields (``unnoise.safety.PROVENANCE_KEYS``) of a ``parameters`` text."""
    extra = parse_parameters(text)["extra"]
    return {k: extra[k] for k in PROVENANCE_KEYS if k in extra}
