"""Provenance in the PNG ``parameters`` chunk: what the safety stage did to an image, as extra ``Key: value`` pairs.

``Watermark`` says which mark the image carries, or why it carries none (never claimed when not embedded);
``Image filter`` says whether the image filter passed it, flagged it (with the reason) or was off. The pairs go on
the settings line that ``unnoise.png`` writes, so AUTOMATIC1111 and ``parse_parameters`` read them (as ``extra``).
"""

from __future__ import annotations

from PIL import Image

from unnoise.png import format_parameters, parse_parameters
from unnoise.safety.image_filter import ImageVerdict

WATERMARK = "Watermark"
IMAGE_FILTER = "Image filter"
PROVENANCE_KEYS = (WATERMARK, IMAGE_FILTER)  # not generation settings: `--from-png` need not warn about them
WATERMARK_SCHEME = "unnoise DWT-DCT v1"


def watermark_note(payload: int | None, why_not: str | None = None) -> str:
    """``unnoise DWT-DCT v1 payload 0x...`` when embedded, else ``none (...)`` with the reason."""
    if payload is not None:
        return f"{WATERMARK_SCHEME} payload 0x{payload:08x}"
    return f"none ({why_not or 'watermarking is off'})"


def image_filter_note(verdict: ImageVerdict | None) -> str:
    if verdict is None:
        return "off"
    return f"flagged ({verdict.reason})" if verdict.flagged else "passed"


def add_provenance(image: Image.Image, fields: dict[str, str]) -> None:
    """Add (or replace) ``fields`` on the settings line of ``image.info["parameters"]``; no-op without parameters."""
    text = image.info.get("parameters")
    if text is None:
        return
    params = parse_parameters(text)
    params["extra"] = {**params["extra"], **fields}
    image.info["parameters"] = format_parameters(params)


def read_provenance(text: str) -> dict[str, str]:
    """The provenance fields of a ``parameters`` text."""
    extra = parse_parameters(text)["extra"]
    return {k: extra[k] for k in PROVENANCE_KEYS if k in extra}
