"""AUTOMATIC1111's prompt language: emphasis, long prompts in token windows, ``BREAK``, prompt editing and
alternation, and ``<lora:name:weight>`` tags.

Behaviour follows AUTOMATIC1111's ``modules/prompt_parser.py``, ``modules/sd_hijack_clip.py`` and
``modules/extra_networks.py`` (stable-diffusion-webui 1.10), learned from their code and doctests:

- ``parse_attention``: ``(a)`` x1.1, ``((a))`` x1.21, ``[a]`` /1.1, ``(a:1.3)``; ``\\(`` ``\\)`` ``\\[`` ``\\]``
  ``\\\\`` escapes; brackets left open weigh the rest of the prompt; ``BREAK`` marks a window break; neighbours of
  equal weight merge. Weights multiply in AUTOMATIC1111's order, so they agree to the last bit.
- ``prompt_schedule``: ``[from:to:when]``, ``[to:when]``, ``[from::when]`` (nested), ``[a|b|c]``: the texts a
  prompt takes over ``steps`` steps, as ``(last_step, text)`` pairs. ``when`` with a decimal point is a fraction
  of the steps, without one a step number (AUTOMATIC1111's default since 1.6; before, ``when < 1`` was a
  fraction). The text of 0-based sampling step ``i`` is the first pair with ``i <= last_step``.
- ``token_windows`` / ``encode_prompts``: a prompt's tokens in windows of ``max_length - 2`` (75 for CLIP), a
  window cut moved back to just after the last comma within ``COMMA_BACKTRACK`` (20) tokens, ``BREAK`` closing
  a window; each window is encoded with its special tokens, the token states multiplied by their weights and the
  window's mean restored (``z * mean(z0) / mean(z)``); windows concatenate along the sequence, and prompts
  encoded together get empty-prompt windows up to the same count.
- ``extract_loras``: ``<lora:name>``, ``<lora:name:w>`` (and ``<lora:name:w:w>``) tags taken out of the text.
- ``StepConditioned``: a denoiser wrapper that gives each sampling step its conditioning, sigma by sigma.

Differences from AUTOMATIC1111 (docs/prompts.md): the emphasis mean is restored per prompt and window (AUTOMATIC1111
takes it over all texts encoded in one call, which for one prompt without editing is the same); a prompt and
its negative of different window counts are padded with empty-prompt windows (AUTOMATIC1111's "Pad
prompt/negative prompt" option; by default it runs them as separate U-Net calls); step numbers count sampler
steps, not network evaluations (AUTOMATIC1111 counts a second-order sampler's two evaluations as two steps); and
extra-network tags other than ``lora`` are refused instead of ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from unnoise.models.text import TextEmbedding, Window

COMMA_BACKTRACK = 20  # AUTOMATIC1111's "comma_padding_backtrack" default
BREAK = ("BREAK", -1.0)  # parse_attention's marker of a window break, as AUTOMATIC1111 writes it
EMPHASIS, DEEMPHASIS = 1.1, 1 / 1.1

# one piece of an emphasis prompt: escapes, brackets, a closing weight, a run of text, a lone colon
_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# AUTOMATIC1111's extra-network tag, ``<kind:arguments>``
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


# -- emphasis ------------------------------------------------------------------------------------------------------


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, weight) pairs, AUTOMATIC1111's ``parse_prompt_attention``; ``BREAK`` is ``("BREAK", -1)``.

    >>> parse_attention("a (b) [c] (d:1.5)")
    [('a ', 1.0), ('b', 1.1), (' ', 1.0), ('c', 0.9090909090909091), (' ', 1.0), ('d', 1.5)]
    """
    pieces: list[list[Any]] = []
    rounds: list[int] = []
    squares: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            pieces.append([part[1:], 1.0])
        elif part == "(":
            rounds.append(len(pieces))
        elif part == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt={text!r} is not allowed; its weight {weight!r} is not a number") from None
            weigh(rounds.pop(), factor)
        elif part == ")" and rounds:
            weigh(rounds.pop(), EMPHASIS)
        elif part == "]" and squares:
            weigh(squares.pop(), DEEMPHASIS)
        else:
            for i, chunk in enumerate(_BREAK.split(part)):
                if i > 0:
                    pieces.append(list(BREAK))
                pieces.append([chunk, 1.0])
    for start in rounds:
        weigh(start, EMPHASIS)
    for start in squares:
        weigh(start, DEEMPHASIS)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece, weight) for piece, weight in merged]


# -- prompt editing and alternation --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Edit:
    """``[before:after:when]``; ``step`` is ``when`` resolved against the number of steps."""

    before: list | None
    after: list
    when: str
    step: int = 0


@dataclasses.dataclass
class _Alternation:
    options: list[list]


class _NotConstruct(Exception):
    """A bracket does not start a construct here (at the top level it is then a literal character)."""


class _Unparsable(Exception):
    """The prompt is outside the editing grammar: it is used as written, at every step (as AUTOMATIC1111 does)."""


_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_NUMBER = r"[+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)"
_WHEN = re.compile(rf"\s*({_NUMBER})\s*\]")


def _sequence(s: str, i: int, top: bool) -> tuple[list, int]:
    """Text, emphasis and constructs from ``i`` to the first delimiter that closes the enclosing construct."""
    nodes: list = []
    while i < len(s):
        c = s[i]
        if c in "([":
            try:
                node, i = _bracket(s, i)
                nodes.extend(node) if isinstance(node, list) else nodes.append(node)
                continue
            except _NotConstruct:
                if not top:
                    raise
                nodes.append(c)  # a stray bracket is text at the top level
                i += 1
                continue
        if c in ")]:":
            if not top:
                return nodes, i
            nodes.append(c)
            i += 1
            continue
        if c == "|":
            if top:
                raise _Unparsable
            return nodes, i
        m = _PLAIN.match(s, i)
        if m is None:  # a backslash at the end or before a line break
            if top:
                raise _Unparsable
            raise _NotConstruct
        nodes.append(m.group(0))
        i = m.end()
    return nodes, i


def _at(s: str, i: int) -> str | None:
    return s[i] if i < len(s) else None


def _bracket(s: str, i: int) -> tuple[Any, int]:
    """The construct that opens at ``s[i]``: emphasis (kept as text), an edit or an alternation."""
    if s[i] == "(":
        inner, j = _sequence(s, i + 1, False)
        if _at(s, j) == ")":
            return ["(", *inner, ")"], j + 1
        if _at(s, j) == ":":
            weight, k = _sequence(s, j + 1, False)
            if _at(s, k) == ")":
                return ["(", *inner, ":", *weight, ")"], k + 1
        raise _NotConstruct
    first, j = _sequence(s, i + 1, False)
    c = _at(s, j)
    if c == "]":
        return ["[", *first, "]"], j + 1
    if c == "|":
        options = [first]
        while _at(s, j) == "|":
            option, j = _sequence(s, j + 1, False)
            options.append(option)
        if _at(s, j) != "]":
            raise _NotConstruct
        return _Alternation(options), j + 1
    if c == ":":
        m = _WHEN.match(s, j + 1)
        if m is not None:
            return _Edit(None, first, m.group(1)), m.end()
        second, k = _sequence(s, j + 1, False)
        m = _WHEN.match(s, k + 1) if _at(s, k) == ":" else None
        if m is not None:
            return _Edit(first, second, m.group(1)), m.end()
    raise _NotConstruct


def _walk(nodes: list) -> Any:
    for node in nodes:
        yield node
        if isinstance(node, _Edit):
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternation):
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            out.append(_render(node.before or [], step) if step <= node.step else _render(node.after, step))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The texts ``prompt`` takes over ``steps`` steps: ``(last_step, text)`` pairs, AUTOMATIC1111's
    ``get_learned_conditioning_prompt_schedules``. A prompt outside the grammar (a ``|`` outside brackets) is
    one text throughout.

    >>> prompt_schedule("a [b:c:0.5]", 4)
    [(2, 'a b'), (4, 'a c')]
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not allowed; expected an integer >= 1")
    try:
        nodes, _ = _sequence(prompt, 0, True)
    except _Unparsable:
        return [(steps, prompt)]
    points = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            value = float(node.when)
            node.step = min(steps, int(value * steps if "." in node.when else value))
            if node.step >= 1:
                points.add(node.step)
        elif isinstance(node, _Alternation):
            points.update(range(1, steps + 1))
    return [(point, _render(nodes, point)) for point in sorted(points)]


def text_at_step(schedule: Sequence[tuple[int, str]], step: int) -> str:
    """The text of 0-based sampling step ``step`` in a ``prompt_schedule``: the first with ``step <= last_step``."""
    for last, text in schedule:
        if step <= last:
            return text
    return schedule[-1][1]


# -- LoRA tags -----------------------------------------------------------------------------------------------------


def extract_loras(prompt: str, field: str = "prompt") -> tuple[str, dict[str, float]]:
    """``prompt`` without its ``<lora:name:weight>`` tags, and the weights by name (1.0 when a tag gives none).

    ``<lora:name:te:unet>`` is accepted when both weights agree (one scale drives the text encoder and the U-Net
    here); other extra-network tags (``<hypernet:...>``, ...) and a name tagged twice are errors naming ``field``.
    """
    loras: dict[str, float] = {}

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        tag = m.group(0)
        if kind != "lora":
            what = "hypernetworks are" if kind == "hypernet" else f"extra networks of kind {kind!r} are"
            raise ValueError(
                f"{field}: {tag} is not supported: {what} not available here; only <lora:name:weight> tags are "
                "(turn the prompt syntax off to pass the text as written)"
            )
        name, *weights = args.split(":")
        if not name.strip() or len(weights) > 2 or any("=" in w for w in weights):
            raise ValueError(f"{field}: {tag} is not a LoRA tag; expected <lora:name> or <lora:name:weight>")
        try:
            values = [float(w) for w in weights]
        except ValueError:
            raise ValueError(f"{field}: {tag} has a weight that is not a number") from None
        if len(values) == 2 and values[0] != values[1]:
            raise ValueError(
                f"{field}: {tag} gives the text encoder and the U-Net different weights; unnoise applies one scale "
                "to both: write <lora:name:weight>"
            )
        if name in loras:
            raise ValueError(f"{field}: the LoRA {name!r} is tagged twice; tag each LoRA once")
        loras[name] = values[0] if values else 1.0
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), loras


# -- token windows and encoding ------------------------------------------------------------------------------------


def comma_token(tokenizer: Any) -> int | None:
    """The id of a lone ``,`` (CLIP's ``,</w>``), or None if the tokenizer splits it."""
    ids = tokenizer(",", add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def token_windows(tokenizer: Any, text: str, length: int, *, comma_backtrack: int = COMMA_BACKTRACK) -> list[Window]:
    """``text`` (emphasis syntax, no editing) as windows of at most ``length`` content tokens and their weights.

    Each piece of ``parse_attention`` is tokenized alone, as AUTOMATIC1111 does. A window that fills up with a
    comma among its last ``comma_backtrack`` tokens ends after that comma and its tail moves to the next window;
    ``BREAK`` ends the window (an empty one too). An empty text is one empty window.
    """
    pieces = parse_attention(text)
    tokens = tokenizer([piece for piece, _ in pieces], add_special_tokens=False, verbose=False)["input_ids"]
    comma = comma_token(tokenizer)
    windows: list[Window] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        windows.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for piece_ids, (piece, weight) in zip(tokens, pieces, strict=True):
        if (piece, weight) == BREAK:
            close()
            continue
        for token in piece_ids:
            if token == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == length and last_comma != -1 and length - last_comma <= comma_backtrack:
                cut = last_comma + 1
                tail_ids, tail_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = tail_ids, tail_weights
            if len(ids) == length:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not windows:
        close()
    return windows


def is_plain(tokenizer: Any, text: str, length: int) -> bool:
    """True if the prompt language leaves ``text`` as it is: no syntax that changes it, and one window."""
    if parse_attention(text) != [(text, 1.0)]:
        return False
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) <= length


def encode_prompts(encoder: Any, texts: Sequence[str]) -> TextEmbedding:
    """Encode ``texts`` (emphasis and ``BREAK``, after ``prompt_schedule`` and ``extract_loras``) with a text
    encoder, every text in the same number of windows; texts that the syntax leaves alone and that fit one window
    go through ``encoder.encode`` unchanged, so plain prompts get exactly the plain encoder's output."""
    texts = list(texts)
    length = encoder.window_length
    if all(is_plain(encoder.tokenizer, text, length) for text in texts):
        return encoder.encode(texts)
    return encoder.encode_windows([token_windows(encoder.tokenizer, text, length) for text in texts])


# -- conditioning that changes with the step -----------------------------------------------------------------------


def step_of_sigma(sigmas: Tensor, sigma: Tensor | float) -> int:
    """The 0-based step of the grid ``sigmas`` (descending) whose interval ``(sigmas[i + 1], sigmas[i]]`` holds
    ``sigma``: a grid point starts its step, a second-order sampler's intermediate sigma belongs to its step."""
    value = float(sigma.max()) if isinstance(sigma, Tensor) else float(sigma)
    starts = sigmas[:-1].double()
    step = int((starts >= value).sum()) - 1
    return min(max(step, 0), len(starts) - 1)


class StepConditioned(nn.Module):
    """A denoiser whose conditioning follows the sampling step: ``D(x, sigma, **conds[k])`` where ``k =
    segment_of_step[step_of_sigma(sigmas, sigma)]``, with ``before(k)`` called first (the pipeline swaps its
    guidance's unconditional branch there). Prompt editing and alternation run through any sampler this way."""

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        sigmas: Tensor,
        segment_of_step: Sequence[int],
        conds: Sequence[dict[str, Any]],
        before: Callable[[int], None] | None = None,
    ):
        super().__init__()
        if len(segment_of_step) < len(sigmas) - 1:
            raise ValueError(f"segment_of_step covers {len(segment_of_step)} steps; the grid has {len(sigmas) - 1}")
        self.denoiser, self.sigmas = denoiser, sigmas.detach().cpu()
        self.segment_of_step, self.conds, self.before = list(segment_of_step), list(conds), before

    def forward(self, x: Tensor, sigma: Tensor | float, **_: Any) -> Tensor:
        k = self.segment_of_step[step_of_sigma(self.sigmas, sigma)]
        if self.before is not None:
            self.before(k)
        return self.denoiser(x, sigma, **self.conds[k])
