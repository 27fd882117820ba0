"""Prompt normalization for the filters: undo the cheap tricks that hide a word from a list or an encoder.

``normalize(text)`` applies, in order: Unicode NFKC (fullwidth and mathematical letters, ligatures), case folding,
removal of invisible format characters (zero-width spaces and joiners, soft hyphens, bidi marks: category Cf) and of
combining marks (accents, strike-through overlays), homoglyphs (a Cyrillic or Greek letter that looks like a Latin
one, in a word that is otherwise Latin), spaced-out letters ("k i l l", "k.i.l.l" -> "kill") and leetspeak
("k1ll", "$uicide") inside words that are mostly letters, so "4k", "1980s" and "3d" stay as they are.
Each step is a small function so that the tests can check it alone.
"""

from __future__ import annotations

import re
import unicodedata

# Cyrillic and Greek lowercase letters (after case folding) drawn like a Latin letter, and a few IPA/Latin extensions.
HOMOGLYPHS = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "и": "u", "к": "k", "м": "m", "н": "h", "о": "o", "п": "n",
    "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ь": "b", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g", "ү": "y", "ց": "g", "օ": "o", "ս": "u", "զ": "q",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j", "σ": "o", "ς": "c",
    # Latin lookalikes outside a-z
    "ı": "i", "ȷ": "j", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ß": "ss", "æ": "ae", "œ": "oe",
}  # fmt: skip
# Digits and symbols used as letters. "1" and "|" read as "i" (k1ll, su1cide); "l" is rarer in practice.
LEET = {
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e", "£": "l", "¡": "i",
}  # fmt: skip

# A run of at least three single characters joined by one kind of separator: "k i l l", "k.i.l.l", "k-i-l-l".
_CHAR = r"(?:[^\W_]|[$@!|€£])"  # a letter, a digit or a leet symbol
_SPACED = re.compile(rf"(?<!{_CHAR}){_CHAR}(?P<sep>\s+|[.\-_*·•/~+])(?:{_CHAR}(?P=sep))+{_CHAR}(?!{_CHAR})")
_ARTICLE = re.compile(r"^([ai])\s+")  # "a p o r n" may be "a porn" as well as "aporn"
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def normalize(text: str) -> str:
    """All steps: NFKC, case folding, invisible characters, marks, homoglyphs, spaced-out letters, leetspeak."""
    return variants(text)[0]


def variants(text: str) -> list[str]:
    """``normalize(text)`` first, then the other readings of ambiguous tricks, if any: "1" and "|" as "l" instead of
    "i" ("bu11y"), and a spaced-out run that starts with "a" or "i" read as that word and the rest ("a p o r n")."""
    text = map_homoglyphs(fold(text))
    readings = [join_spaced_letters(text), join_spaced_letters(text, article=True)]
    out = [decode_leet(r) for r in readings] + [decode_leet(r, one="l") for r in readings]
    return list(dict.fromkeys(out))


def fold(text: str) -> str:
    """NFKC, case folding, then without format characters (zero-width, soft hyphen, bidi) and combining marks."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    decomposed = unicodedata.normalize("NFD", text)
    text = unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))
    return re.sub(r"\s+", " ", text).strip()


def map_homoglyphs(text: str) -> str:
    """Replace lookalike letters in each token that becomes pure Latin (plus digits and symbols) once replaced."""

    def fix(match: re.Match[str]) -> str:
        token = match[0]
        mapped = "".join(HOMOGLYPHS.get(c, c) for c in token)
        return mapped if mapped != token and _latin(mapped) else token

    return re.sub(r"\S+", fix, text)


def join_spaced_letters(text: str, *, article: bool = False) -> str:
    """Join spaced-out letters: "k i l l" or "k.i.l.l" -> "kill" (three or more single characters, one kind of
    separator); with ``article``, a run that starts with "a" or "i" keeps it as a word ("a p o r n" -> "a porn")."""

    def join(match: re.Match[str]) -> str:
        run, sep = match[0], match["sep"]
        head = _ARTICLE.match(run) if article and sep.isspace() else None
        if head is not None and len(run.split()) > 3:
            return head[1] + " " + run[head.end() :].replace(sep, "")
        return run.replace(sep, "")

    return _SPACED.sub(join, text)


def decode_leet(text: str, *, one: str = "i") -> str:
    """Leetspeak inside a token that has at least two letters and at least as many letters as leet characters;
    ``one`` is the letter that "1" and "|" stand for."""
    table = {**LEET, "1": one, "|": one}

    def fix(match: re.Match[str]) -> str:
        token, bang = match[1], match[2]  # a trailing "!!!" is punctuation, not "iii"
        letters = sum(c.isalpha() for c in token)
        leet = sum(c in LEET for c in token)
        if leet == 0 or letters < 2 or letters < leet:
            return token + bang
        # Only leet characters touching a letter are letters: "k1ll", "$ex", but not "$5".
        chars = list(token)
        for i, c in enumerate(chars):
            if c in LEET and _touches_letter(chars, i):
                chars[i] = table[c]
        return "".join(chars) + bang

    return re.sub(r"(\S+?)(!*)(?=\s|$)", fix, text)


def words(text: str) -> list[str]:
    """The words of normalized text (letters, with an inner apostrophe kept: "assassin's")."""
    return _WORD.findall(text)


def _touches_letter(chars: list[str], i: int) -> bool:
    """True if a letter (or a leet character that touches one) is next to ``chars[i]`` on either side."""
    for step in (-1, 1):
        j = i + step
        while 0 <= j < len(chars) and chars[j] in LEET:
            j += step
        if 0 <= j < len(chars) and chars[j].isalpha():
            return True
    return False


def _latin(text: str) -> bool:
    return all(not c.isalpha() or ("a" <= c <= "z") for c in text)
