"""Per-category blocklist matched on word boundaries of normalized text, with misspellings of long terms.

A term is a sequence of words; it matches the same sequence of words in the prompt, each word equal to the term's
word or to its plural or possessive ("rapist" matches "rapists" and "rapist's" but never "therapist"). A prompt word
that the encoder's vocabulary does not know and that is one edit (insertion, deletion, substitution or swap of two
neighbours: Damerau-Levenshtein) away from a one-word term of five or more letters matches that term too, so
"sucide" and "herion" are caught while real words ("heroine" next to "heroin") are not.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable
from pathlib import Path

from unnoise.safety.normalize import words

FUZZY_MIN_LETTERS = 5


@dataclasses.dataclass(frozen=True)
class Match:
    """A blocklist hit: the category, the listed term, and the prompt's words that matched it."""

    category: str
    term: str
    matched: str


class Blocklist:
    """Terms per category (``{category: [term, ...]}``), a vocabulary of known words and words never fuzzy-matched."""

    def __init__(self, terms: dict[str, list[str]], *, vocabulary: Iterable[str] = (), allow: Iterable[str] = ()):
        self.terms = {category: [tuple(words(t.casefold())) for t in listed] for category, listed in terms.items()}
        for category, listed in self.terms.items():
            for raw, term in zip(terms[category], listed, strict=True):
                if not term:
                    raise ValueError(f"blocklist term {raw!r} of category {category!r} has no letters")
        self.known = frozenset(vocabulary) | frozenset(a.casefold() for a in allow)

    @classmethod
    def load(cls, path: str | Path, *, vocabulary: Iterable[str] = ()) -> Blocklist:
        """Read a TOML file: ``[category] terms = [...]`` tables and an optional ``[allow] words = [...]``."""
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        allow = data.pop("allow", {}).get("words", [])
        for category, table in data.items():
            if not isinstance(table, dict) or not isinstance(table.get("terms"), list):
                raise ValueError(f"{path}: [{category}] must hold `terms = [...]`, a list of strings")
        return cls({c: t["terms"] for c, t in data.items()}, vocabulary=vocabulary, allow=allow)

    def match(self, text: str) -> Match | None:
        """The first term found in ``text`` (already normalized), exact matches before misspellings."""
        found = words(text)
        forms = [_forms(w) for w in found]
        return self._scan(found, forms, fuzzy=False) or self._scan(found, forms, fuzzy=True)

    def _scan(self, found: list[str], forms: list[set[str]], *, fuzzy: bool) -> Match | None:
        for category, listed in self.terms.items():
            for term in listed:
                for i in range(len(found) - len(term) + 1):
                    window = range(i, i + len(term))
                    if all(self._same(t, found[j], forms[j], fuzzy) for t, j in zip(term, window, strict=True)):
                        return Match(category, " ".join(term), " ".join(found[j] for j in window))
        return None

    def _same(self, term_word: str, word: str, forms: set[str], fuzzy: bool) -> bool:
        """``word`` is ``term_word`` (or its plural or possessive), or with ``fuzzy`` an unknown word one edit away."""
        if term_word in forms:
            return True
        if not fuzzy or len(term_word) < FUZZY_MIN_LETTERS or len(word) < FUZZY_MIN_LETTERS:
            return False
        word = word.removesuffix("'s")
        if word in self.known or _singular(word) in self.known:
            return False
        return abs(len(term_word) - len(word)) <= 1 and _one_edit(word, term_word)


def _forms(word: str) -> set[str]:
    """The forms a term word may take to match ``word``: itself, without a possessive, without a plural ending."""
    base = word.removesuffix("'s").removesuffix("'")
    forms = {word, base}
    if base.endswith("es"):
        forms.add(base[:-2])
    if base.endswith("s"):
        forms.add(base[:-1])
    return forms


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") else word


def _one_edit(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` differ by exactly one insertion, deletion, substitution or adjacent swap."""
    if a == b:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k, (x, y) in enumerate(zip(short, long, strict=False)) if x != y), len(short))
    return short[i:] == long[i + 1 :]
