"""Provenance: what the safety stage did to an image, as ``Key: value`` pairs for its PNG parameters.

``Watermark`` says which mark the image carries, or why it carries none (never claimed when not embedded);
``Image filter`` says whether the image filter passed it, flagged it (with the reason) or was off. The safety stage
leaves the pairs in ``image.info[PROVENANCE_INFO]``; the pipeline, which owns the parameters text, writes them on
its settings line (``unnoise.pipeline.png.add_provenance``), where AUTOMATIC1111 reads them too.
"""

from __future__ import annotations

from unnoise.safety.image_filter import ImageVerdict

WATERMARK = "Watermark"
IMAGE_FILTER = "Image filter"
PROVENANCE_KEYS = (WATERMARK, IMAGE_FILTER)  # not generation settings: `--from-png` need not warn about them
WATERMARK_SCHEME = "unnoise DWT-DCT v1"
PROVENANCE_INFO = "provenance"  # image.info key of the pairs, until the pipeline writes them into its parameters


def watermark_note(payload: int | None, why_not: str | None = None) -> str:
    """``unnoise DWT-DCT v1 payload 0x...`` when embedded, else ``none (...)`` with the reason."""
    if payload is not None:
        return f"{WATERMARK_SCHEME} payload 0x{payload:08x}"
    return f"none ({why_not or 'watermarking is off'})"


def image_filter_note(verdict: ImageVerdict | None) -> str:
    if verdict is None:
        return "off"
    return f"flagged ({verdict.reason})" if verdict.flagged else "passed"
