"""Captions for MNIST digits, for text-conditioned training: varied phrasings of the same label."""

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


def caption(label: int, template: int) -> str:
    """The caption of ``label`` (0-9) under template number ``template``."""
    if not (isinstance(label, (int, np.integer)) and 0 <= label <= 9):
        raise ValueError(f"label={label!r} must be an integer digit 0-9")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template={template!r} must lie in [0, {len(TEMPLATES)})")
    return TEMPLATES[template].format(d=int(label), w=DIGIT_WORDS[int(label)])


def random_captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per label, each with a template drawn uniformly by ``rng`` (so epochs see varied text)."""
    picks = rng.integers(0, len(TEMPLATES), size=len(labels))
    return [caption(int(label), int(t)) for label, t in zip(labels, picks)]
