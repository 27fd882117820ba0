"""A resolved request as bytes and back, for a job queue that other processes read: one safetensors blob whose
metadata holds the fields as JSON and whose tensors are the request's tensors and images. Reading it runs no code
(no pickle), so a job store is only as trusted as any other data, and the round trip is exact: tensors bit for bit,
images pixel for pixel, numbers as Python wrote them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from unnoise.pipeline.hires import Hires, HiresPlan
from unnoise.pipeline.inputs import Overlay, ResolvedRequest

FORMAT = "unnoise.resolved-request/1"
TENSORS = ("image", "mask", "latents", "init_latents")  # fields holding a tensor or None
TUPLES = ("guidance_interval", "time_ids", "negative_time_ids", "cache_range")  # JSON lists that are tuples
IMAGE_MODES = ("L", "RGB", "RGBA")  # the overlay images' modes: uint8 arrays that PIL reads back as such


def request_to_bytes(request: ResolvedRequest) -> bytes:
    """``request`` as bytes that ``request_from_bytes`` reads back equal."""
    tensors: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if field.name in TENSORS:
            if value is not None:
                tensors[field.name] = value.detach().to("cpu").contiguous()
            fields[field.name] = value is not None
        elif field.name == "overlay":
            fields[field.name] = None if value is None else _overlay_fields(value, tensors)
        elif field.name == "hires":
            fields[field.name] = None if value is None else dataclasses.asdict(value)
        else:
            fields[field.name] = value
    return save_tensors(tensors, metadata={"format": FORMAT, "request": json.dumps(fields)})


def request_from_bytes(data: bytes) -> ResolvedRequest:
    """The request ``request_to_bytes`` wrote; ValueError naming the problem for anything else."""
    try:
        tensors = load_tensors(data)
        metadata = _metadata(data)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"the stored request is not a safetensors blob: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"the stored request has format={metadata.get('format')!r}; expected {FORMAT!r}")
    fields = json.loads(metadata["request"])
    for name in TENSORS:
        fields[name] = tensors[name] if fields[name] else None
    for name in TUPLES:
        if fields[name] is not None:
            fields[name] = tuple(fields[name])
    fields["loras"] = tuple((name, scale) for name, scale in fields["loras"])
    if fields["overlay"] is not None:
        o = fields["overlay"]
        box = tuple(o["box"]) if o["box"] is not None else None
        fields["overlay"] = Overlay(_image(tensors["overlay.original"]), _image(tensors["overlay.mask"]), box,
                                    o["blend"])  # fmt: skip
    if fields["hires"] is not None:
        h = fields["hires"]
        fields["hires"] = HiresPlan(Hires(**h["hires"]), h["steps"], h["grid_steps"], tuple(h["upscale_to"]),
                                    tuple(h["box"]))  # fmt: skip
    return ResolvedRequest(**fields)


def _overlay_fields(overlay: Overlay, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    for name in ("original", "mask"):
        image = getattr(overlay, name)
        if image.mode not in IMAGE_MODES:
            raise ValueError(f"overlay.{name} has mode {image.mode!r}; expected one of {IMAGE_MODES}")
        tensors[f"overlay.{name}"] = torch.from_numpy(np.array(image))
    return {"box": overlay.box, "blend": overlay.blend}


def _image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.numpy())  # uint8 of rank 2, or with 3 or 4 channels: "L", "RGB", "RGBA"


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header: an 8-byte little-endian length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})
