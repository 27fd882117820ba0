"""Semantic layer of the prompt filter: MiniLM sentence embeddings scored against learned category prototypes.

Each category (and ``benign``) gets a prototype vector ``w_c`` fitted by multinomial logistic regression on
labelled sentences (the category examples and the calibration prompts, ``calibrate.py``), so a prompt's logit for a
category is a scaled cosine similarity to its prototype: ``scale * <e, w_c> + b_c`` with ``e`` the unit-norm
embedding. Plain nearest-example similarity was tried first and blocked about half as many held-out harmful prompts
at the same false-positive rate (docs/safety.md). The probability of a category is the softmax over all of them.

A prompt is split into segments: each normalized reading of the whole prompt (``normalize.variants``) and, when it
has several, each clause (text between ``, ; . ! ?`` or a newline), long ones in windows of ``WINDOW_WORDS`` words, so
a harmful clause hidden among benign tags is judged on its own. A prompt's score for a category is its highest
probability over segments.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from unnoise.models.lora import lora_disabled
from unnoise.models.text import PromptTruncatedWarning, TextEmbedding

BENIGN = "benign"
WINDOW_WORDS = 40  # about 55 MiniLM tokens: fits max_length 77 with room for obfuscated words
ENCODE_BATCH = 64
SCALE = 10.0  # logit scale on the unit-norm embedding; the weight decay is relative to it


class SentenceEncoder(Protocol):
    """What the layer needs of a text encoder: unit-norm pooled sentence embeddings (``MiniLMEncoder``)."""

    def encode(self, prompts: Sequence[str]) -> TextEmbedding: ...


@dataclasses.dataclass(frozen=True)
class Category:
    """One category: its one-line description and the example sentences its prototype is fitted on."""

    name: str
    description: str
    examples: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Scores:
    """One prompt's scores: per category (``benign`` included) the best probability and the segment that gave it."""

    probability: dict[str, float]
    segment: dict[str, str]


def load_categories(path: str | Path) -> list[Category]:
    """Read ``[name] description = "..." examples = [...]`` tables; ``[benign]`` is required (the contrast)."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    categories = []
    for name, table in data.items():
        examples = table.get("examples") if isinstance(table, dict) else None
        if not isinstance(examples, list) or not examples or not all(isinstance(e, str) and e for e in examples):
            raise ValueError(f"{path}: [{name}] needs `examples = [...]`, a non-empty list of non-empty strings")
        categories.append(Category(name, str(table.get("description", "")), tuple(examples)))
    if BENIGN not in {c.name for c in categories}:
        raise ValueError(f"{path}: a [{BENIGN}] table of contrast examples is required")
    return categories


def segments(text: str) -> list[str]:
    """The whole text and, if it has more than one, its clauses; each cut into windows of ``WINDOW_WORDS`` words."""
    clauses = [c.strip() for c in re.split(r"[,;.!?\n]+", text) if c.strip()]
    pieces = [text.strip()] + (clauses if len(clauses) > 1 else [])
    out: list[str] = []
    for piece in pieces:
        ws = piece.split()
        if len(ws) <= WINDOW_WORDS:
            out.append(piece)
            continue
        step = WINDOW_WORDS // 2
        out += [" ".join(ws[i : i + WINDOW_WORDS]) for i in range(0, len(ws) - step, step)]
    return list(dict.fromkeys(p for p in out if p)) or [text]


@dataclasses.dataclass(frozen=True)
class Probe:
    """Category prototypes: ``weight`` (D, K) and ``bias`` (K) for ``names``; logits ``SCALE * e @ weight + bias``."""

    names: tuple[str, ...]
    weight: Tensor
    bias: Tensor
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def probabilities(self, embeddings: Tensor) -> Tensor:
        """Softmax over the categories, ``(N, K)``, for unit-norm embeddings ``(N, D)``."""
        return torch.softmax(SCALE * embeddings.float() @ self.weight + self.bias, dim=1)

    def save(self, path: str | Path) -> None:
        meta = {**self.meta, "names": json.dumps(list(self.names)), "scale": str(SCALE)}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
        if float(meta.get("scale", "nan")) != SCALE or "names" not in meta:
            raise ValueError(f"{path} is not a probe written by this version (scale {meta.get('scale')}, not {SCALE})")
        names = tuple(json.loads(meta.pop("names")))
        meta.pop("scale")
        return cls(names, tensors["weight"], tensors["bias"], meta)


def fit_probe(
    embeddings: Tensor, labels: Tensor, names: Sequence[str], *, weight_decay: float, iterations: int = 300
) -> Probe:
    """Multinomial logistic regression with L2 weight decay (L-BFGS from zeros: deterministic)."""
    x = embeddings.float()
    weight = torch.zeros(x.shape[1], len(names), requires_grad=True)
    bias = torch.zeros(len(names), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(SCALE * x @ weight + bias, labels)
        loss = loss + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Probe(tuple(names), weight.detach(), bias.detach())


class SemanticScorer:
    """Scores normalized prompts with a sentence encoder and a ``Probe``."""

    def __init__(self, encoder: SentenceEncoder, probe: Probe):
        self.encoder, self.probe = encoder, probe

    def score(self, prompts: Sequence[Sequence[str]]) -> list[Scores]:
        """Scores of each prompt, given as its normalized readings (``normalize.variants``)."""
        pieces, embeddings = embed_segments(self.encoder, prompts)
        return scores_from_segments(self.probe, pieces, embeddings)


def embed(encoder: SentenceEncoder, texts: Sequence[str]) -> Tensor:
    """Unit-norm float32 embeddings ``(N, D)``, in batches; a window longer than the encoder keeps its start.

    LoRA adapters on a shared encoder (the pipeline's) are off here: the probe was fitted on the base encoder's
    embeddings. ``lora_disabled`` acts on this thread only, so a generation elsewhere keeps its adapters."""
    chunks = []
    with warnings.catch_warnings(), lora_disabled():
        warnings.simplefilter("ignore", PromptTruncatedWarning)  # windows overlap: the tail is in the next one
        for i in range(0, len(texts), ENCODE_BATCH):
            chunks.append(encoder.encode(list(texts[i : i + ENCODE_BATCH])).pooled.float().cpu())
    return torch.cat(chunks)


def embed_segments(encoder: SentenceEncoder, prompts: Sequence[Sequence[str]]) -> tuple[list[list[str]], Tensor]:
    """Each prompt's segments (over all its readings) and the embeddings of all of them, in order, in one pass."""
    pieces = [list(dict.fromkeys(s for reading in readings for s in segments(reading))) for readings in prompts]
    return pieces, embed(encoder, [p for ps in pieces for p in ps])


def scores_from_segments(probe: Probe, pieces: list[list[str]], embeddings: Tensor) -> list[Scores]:
    """Per text, the highest probability of each category over its segments (``embeddings`` row per segment)."""
    probabilities = probe.probabilities(embeddings)
    results, start = [], 0
    for ps in pieces:
        block = probabilities[start : start + len(ps)]
        start += len(ps)
        values, rows = block.max(dim=0)
        results.append(
            Scores(
                {name: float(v) for name, v in zip(probe.names, values.tolist(), strict=True)},
                {name: ps[r] for name, r in zip(probe.names, rows.tolist(), strict=True)},
            )
        )
    return results
