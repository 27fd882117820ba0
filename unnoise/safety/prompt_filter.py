"""The prompt filter: normalization, a word-boundary blocklist, then MiniLM category scores against thresholds.

``PromptFilter.load()`` reads the package's data files (``unnoise/safety/data``; an operator may pass a copy):
``blocklist.toml`` (terms per category), ``semantic.safetensors`` (category prototypes fitted on
``categories.toml`` and ``calibration.toml``) and ``thresholds.json`` (per-category thresholds, editable). Both
layers see the normalized prompt. The negative prompt is not checked: it names what the image must not show.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from unnoise.safety.blocklist import Blocklist, Match
from unnoise.safety.calibrate import data_sha256
from unnoise.safety.normalize import variants
from unnoise.safety.semantic import BENIGN, Probe, Scores, SemanticScorer, SentenceEncoder

DATA = Path(str(files("unnoise.safety") / "data"))
CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity")  # I2P


class StaleCalibrationWarning(UserWarning):
    """categories.toml changed after semantic.safetensors was fitted: run ``unnoise redteam --calibrate``."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The filter's answer for one prompt. ``score`` is 1.0 for a blocklist hit, else the highest category score."""

    allowed: bool
    category: str | None
    score: float
    reason: str
    layer: str | None = None  # "blocklist" or "semantic" when blocked

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PromptFilter:
    """``check(prompt) -> Verdict``: blocked by a blocklist term or by a category score at or above its threshold."""

    def __init__(self, blocklist: Blocklist | None, scorer: SemanticScorer | None, thresholds: dict[str, float]):
        if scorer is not None:
            missing = sorted(set(scorer.probe.names) - {BENIGN} - set(thresholds))
            if missing:
                raise ValueError(f"thresholds has no value for categories {missing}; add them or recalibrate")
        self.blocklist, self.scorer, self.thresholds = blocklist, scorer, dict(thresholds)

    @classmethod
    def load(
        cls,
        data: str | Path | None = None,
        *,
        encoder: SentenceEncoder | None = None,
        blocklist: bool = True,
        semantic: bool = True,
    ) -> PromptFilter:
        """The filter from a data folder (default: the package's); ``encoder`` defaults to the bundled MiniLM.

        Pass the pipeline's ``MiniLMEncoder`` as ``encoder`` to share it (the default model uses the same weights).
        """
        folder = Path(data) if data is not None else DATA
        thresholds_file = json.loads((folder / "thresholds.json").read_text(encoding="utf-8"))
        scorer = None
        if semantic:
            if encoder is None:
                from unnoise.models.text import MiniLMEncoder

                encoder = MiniLMEncoder.from_package()
            probe = Probe.load(folder / "semantic.safetensors")
            _check_fresh(probe, folder / "categories.toml")
            scorer = SemanticScorer(encoder, probe)
        words = _vocabulary(encoder)
        terms = Blocklist.load(folder / "blocklist.toml", vocabulary=words) if blocklist else None
        return cls(terms, scorer, thresholds_file["thresholds"])

    def check(self, prompt: str) -> Verdict:
        """Judge one prompt."""
        return self.check_many([prompt])[0]

    def check_many(self, prompts: Sequence[str]) -> list[Verdict]:
        """Judge prompts; the semantic layer encodes all that the blocklist let through in one pass."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
        readings = [variants(p) for p in prompts]
        verdicts: list[Verdict | None] = [None] * len(prompts)
        if self.blocklist is not None:
            for i, texts in enumerate(readings):
                match = next((m for t in texts if (m := self.blocklist.match(t)) is not None), None)
                if match is not None:
                    verdicts[i] = _blocklist_verdict(match)
        todo = [i for i, v in enumerate(verdicts) if v is None and readings[i][0]]
        if self.scorer is not None and todo:
            for i, scores in zip(todo, self.scorer.score([readings[i] for i in todo]), strict=True):
                verdicts[i] = self._semantic_verdict(scores)
        return [v if v is not None else Verdict(True, None, 0.0, "") for v in verdicts]

    def _semantic_verdict(self, scores: Scores) -> Verdict:
        # The category that passes its threshold by the most (in ratio); if none does, the one closest to it.
        ratios = {c: scores.probability[c] / t for c, t in self.thresholds.items() if c in scores.probability}
        category = max(ratios, key=ratios.__getitem__)
        score, threshold = scores.probability[category], self.thresholds[category]
        if score < threshold:
            return Verdict(True, None, score, "")
        reason = (
            f"semantic score {score:.2f} for {category} (threshold {threshold:.2f}) on {scores.segment[category]!r}"
        )
        return Verdict(False, category, score, reason, "semantic")


def _blocklist_verdict(match: Match) -> Verdict:
    seen = f" (as {match.matched!r})" if match.matched != match.term else ""
    return Verdict(False, match.category, 1.0, f"blocklist term {match.term!r}{seen} for {match.category}", "blocklist")


def _vocabulary(encoder: SentenceEncoder | None) -> list[str]:
    """Whole words of the encoder's WordPiece vocabulary, else MiniLM's: words ``Blocklist`` knows are not typos."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None:
        return [w for w in tokenizer.get_vocab() if w.isalpha()]
    from unnoise.models.text import minilm_folder

    lines = (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").split()
    return [w for w in lines if w.isalpha()]


def _check_fresh(probe: Probe, categories: Path) -> None:
    fitted = probe.meta.get("categories_sha256")
    if categories.is_file() and fitted is not None and fitted != data_sha256(categories):
        warnings.warn(
            f"{categories} changed after the semantic layer was fitted; run `unnoise redteam --calibrate`",
            StaleCalibrationWarning,
            stacklevel=3,
        )
