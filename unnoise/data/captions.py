"""Captions for MNIST digits, for text-conditioned training: varied phrasings of the same label, upright or upside
down (``data.upside_down``: digits rotated 180 degrees, for the LoRA of ``configs/mnist-lora-upside-down.toml``)."""

from __future__ import annotations

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d}: the digit as a numeral; {w}: as a word. Plain numerals and words are templates too, as users type them.
TEMPLATES = (
    "a handwritten digit {d}",
    "a handwritten {w}",
    "the number {w}",
    "the number {d}",
    "the digit {w}",
    "{d}",
    "{w}",
    "a black and white image of the digit {d}",
    "a hand-drawn {w}",
)

# The same phrasings for a digit rotated by 180 degrees, one for each of TEMPLATES (template t <-> t).
UPSIDE_DOWN_TEMPLATES = (
    "an upside down handwritten digit {d}",
    "an upside down handwritten {w}",
    "the number {w} upside down",
    "the number {d} upside down",
    "the digit {w}, upside down",
    "upside down {d}",
    "upside down {w}",
    "a black and white image of the digit {d} upside down",
    "a hand-drawn {w}, upside down",
)
assert len(UPSIDE_DOWN_TEMPLATES) == len(TEMPLATES)


def caption(label: int, template: int, *, upside_down: bool = False) -> str:
    """The caption of ``label`` (0-9) under template number ``template`` (of ``UPSIDE_DOWN_TEMPLATES`` when
    ``upside_down``)."""
    if not (isinstance(label, (int, np.integer)) and 0 <= label <= 9):
        raise ValueError(f"label={label!r} must be an integer digit 0-9")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template={template!r} must lie in [0, {len(TEMPLATES)})")
    templates = UPSIDE_DOWN_TEMPLATES if upside_down else TEMPLATES
    return templates[template].format(d=int(label), w=DIGIT_WORDS[int(label)])


def random_captions(labels: np.ndarray, rng: np.random.Generator, upside_down: np.ndarray | None = None) -> list[str]:
    """One caption per label, each with a template drawn uniformly by ``rng`` (so epochs see varied text); an
    upside-down phrasing where ``upside_down`` (bool per label) is set. The draws do not depend on it."""
    picks = rng.integers(0, len(TEMPLATES), size=len(labels))
    flags = np.zeros(len(labels), dtype=bool) if upside_down is None else upside_down
    return [caption(int(label), int(t), upside_down=bool(u)) for label, t, u in zip(labels, picks, flags)]
