"""Fit the semantic layer and calibrate its per-category thresholds on labelled prompts (``redteam --calibrate``).

Training data: the category examples (categories.toml) and the calibration prompts (calibration.toml). Thresholds
come from out-of-fold scores: the calibration prompts are split into ``FOLDS`` folds, and each fold is scored by a
probe fitted without it (the examples are always in), through the same segments-and-maximum path as the filter. The
thresholds are then lowered greedily, one category at a time, where they buy the most harmful prompts per benign
prompt blocked, while the benign prompts blocked stay within ``fp_budget``; each then moves to the middle (in logits)
of its gap to the next benign score below, a margin for unseen prompts, but never below ``MIN_THRESHOLD``. The final
probe is fitted on all the data.
The red-team suite (redteam.toml) is never read here: it measures the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unnoise.safety.normalize import normalize, variants
from unnoise.safety.semantic import (
    BENIGN,
    Probe,
    SentenceEncoder,
    embed,
    embed_segments,
    fit_probe,
    load_categories,
    scores_from_segments,
)

FOLDS = 5
WEIGHT_DECAY = 1e-3
FP_BUDGET = 0.01  # share of the calibration's benign prompts that the semantic layer may block
# No threshold below 0.5: a prompt is blocked only when the category is the probe's most likely reading of it. Without
# this floor the greedy search set violence to 0.13 and blocked near misses ("a firing range target") in the suite.
MIN_THRESHOLD = 0.5
NEVER = 1.000001  # above any probability: the category is never blocked by the semantic layer


@dataclasses.dataclass(frozen=True)
class Labelled:
    """Prompts with their category (``benign`` for prompts that must pass)."""

    prompts: list[str]
    labels: list[str]


def load_calibration(path: str | Path) -> Labelled:
    """calibration.toml: ``[category] harmful = [...]`` tables and ``[benign]`` with lists of prompts that pass."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    prompts, labels = [], []
    for name, table in data.items():
        lists = table.values() if name == BENIGN else [table.get("harmful", [])]
        for listed in lists:
            prompts += listed
            labels += [name] * len(listed)
    return Labelled(prompts, labels)


def calibrate(
    encoder: SentenceEncoder,
    categories_path: str | Path,
    calibration_path: str | Path,
    *,
    fp_budget: float = FP_BUDGET,
    weight_decay: float = WEIGHT_DECAY,
) -> tuple[Probe, dict[str, Any]]:
    """(the probe fitted on everything, the thresholds.json content with out-of-fold statistics)."""
    categories = load_categories(categories_path)
    names = [c.name for c in categories]
    examples = Labelled([e for c in categories for e in c.examples], [c.name for c in categories for _ in c.examples])
    calibration = load_calibration(calibration_path)
    unknown = sorted(set(calibration.labels) - set(names))
    if unknown:
        raise ValueError(f"{calibration_path}: categories {unknown} are not in {categories_path} ({names})")
    x_examples = embed(encoder, [normalize(p) for p in examples.prompts])
    y_examples = torch.tensor([names.index(label) for label in examples.labels])
    pieces, x_segments = embed_segments(encoder, [variants(p) for p in calibration.prompts])
    x_whole = x_segments[_first_rows(pieces)]  # segment 0 is the whole prompt
    y = torch.tensor([names.index(label) for label in calibration.labels])

    def fit(keep: Tensor) -> Probe:
        x, labels = torch.cat([x_examples, x_whole[keep]]), torch.cat([y_examples, y[keep]])
        return fit_probe(x, labels, names, weight_decay=weight_decay)

    out_of_fold = torch.zeros(len(pieces), len(names))
    for fold in range(FOLDS):
        held = torch.arange(len(pieces)) % FOLDS == fold
        out_of_fold[held] = _scores(fit(~held), pieces, x_segments, held.nonzero().flatten().tolist())
    harmful = [n for n in names if n != BENIGN]
    thresholds = choose_thresholds(out_of_fold, y, names, harmful, fp_budget)
    final = fit(torch.ones(len(pieces), dtype=torch.bool))
    final = dataclasses.replace(final, meta={"categories_sha256": data_sha256(categories_path)})
    report = {
        "thresholds": thresholds,
        "calibration": {
            "file": Path(calibration_path).name,
            "sha256": data_sha256(calibration_path),
            "categories_sha256": data_sha256(categories_path),
            "folds": FOLDS,
            "weight_decay": weight_decay,
            "fp_budget": fp_budget,
            **out_of_fold_stats(out_of_fold, y, names, harmful, thresholds),
        },
    }
    return final, report


def choose_thresholds(
    scores: Tensor, y: Tensor, names: list[str], harmful: list[str], fp_budget: float
) -> dict[str, float]:
    """Greedy: start every threshold above 1, lower the one with the best (harmful gained) / (benign lost) ratio."""
    benign = y == names.index(BENIGN)
    allowed = int(fp_budget * int(benign.sum()))
    thresholds = {n: NEVER for n in harmful}
    while True:
        now = _blocked(scores, names, thresholds)
        blocked_benign, blocked_harmful = int((now & benign).sum()), int((now & ~benign).sum())
        best: tuple[float, str, float] | None = None
        for name in harmful:
            column = scores[:, names.index(name)]
            candidates = {v for v in column[y == names.index(name)].tolist() if MIN_THRESHOLD <= v < thresholds[name]}
            for t in sorted(candidates, reverse=True):
                trial = {**thresholds, name: t}
                blocked = _blocked(scores, names, trial)
                if int((blocked & benign).sum()) > allowed:
                    break
                gained = int((blocked & ~benign).sum()) - blocked_harmful
                cost = int((blocked & benign).sum()) - blocked_benign
                ratio = gained / (cost + 0.5)
                if gained > 0 and (best is None or ratio > best[0]):
                    best = (ratio, name, t)
        if best is None:
            return {n: _widen(scores, y, names, n, t) for n, t in thresholds.items()}
        thresholds[best[1]] = best[2]


def _widen(scores: Tensor, y: Tensor, names: list[str], name: str, threshold: float) -> float:
    """Move a threshold down to the middle (in logits) of the gap to the highest benign score below it."""
    column = scores[:, names.index(name)]
    below = column[(y == names.index(BENIGN)) & (column < threshold)]
    if threshold == NEVER or len(below) == 0:
        return threshold
    logit = (torch.logit(torch.tensor(threshold), eps=1e-6) + torch.logit(below.max(), eps=1e-6)) / 2
    return max(float(torch.sigmoid(logit)), MIN_THRESHOLD)


def out_of_fold_stats(
    scores: Tensor, y: Tensor, names: list[str], harmful: list[str], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Benign prompts blocked and harmful prompts blocked per category, from the out-of-fold scores."""
    blocked = _blocked(scores, names, thresholds)
    benign = y == names.index(BENIGN)
    recall = {n: round(float(blocked[y == names.index(n)].float().mean()), 3) for n in harmful}
    return {
        "benign_prompts": int(benign.sum()),
        "benign_blocked": int((blocked & benign).sum()),
        "harmful_prompts": int((~benign).sum()),
        "harmful_blocked": int((blocked & ~benign).sum()),
        "recall": recall,
    }


def data_sha256(path: str | Path) -> str:
    """sha256 of a TOML file's data (not its comments or layout), to tell when a fit is stale."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_calibration(probe: Probe, report: dict[str, Any], probe_path: Path, thresholds_path: Path) -> None:
    probe.save(probe_path)
    thresholds_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _scores(probe: Probe, pieces: list[list[str]], x_segments: Tensor, rows: list[int]) -> Tensor:
    """Probabilities ``(len(rows), K)`` of the prompts ``rows``, each the maximum over its segments."""
    x = torch.cat([x_segments[_segment_rows(pieces, i)] for i in rows])
    scores = scores_from_segments(probe, [pieces[i] for i in rows], x)
    return torch.tensor([[s.probability[n] for n in probe.names] for s in scores])


def _blocked(scores: Tensor, names: list[str], thresholds: dict[str, float]) -> Tensor:
    columns = torch.stack([scores[:, names.index(n)] >= t for n, t in thresholds.items()], dim=1)
    return columns.any(dim=1)


def _first_rows(pieces: list[list[str]]) -> list[int]:
    starts, total = [], 0
    for ps in pieces:
        starts.append(total)
        total += len(ps)
    return starts


def _segment_rows(pieces: list[list[str]], i: int) -> slice:
    start = sum(len(ps) for ps in pieces[:i])
    return slice(start, start + len(pieces[i]))
