"""Prompt normalization step by step, and the blocklist: word boundaries, near misses, plurals, misspellings."""

import pytest

from unnoise.safety.blocklist import Blocklist, _one_edit
from unnoise.safety.normalize import (
    decode_leet,
    fold,
    join_spaced_letters,
    map_homoglyphs,
    normalize,
    variants,
    words,
)
from unnoise.safety.prompt_filter import DATA, _vocabulary


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ＫＩＬＬ", "kill"),  # fullwidth (NFKC)
        ("𝐤𝐢𝐥𝐥", "kill"),  # mathematical bold (NFKC)
        ("ﬁre", "fire"),  # ligature (NFKC)
        ("KiLL", "kill"),  # case folding
        ("STRASSE Straße", "strasse strasse"),  # case folding of ß
        ("k\u200bi\u200cl\u200dl\ufeff", "kill"),  # zero-width space, non-joiner, joiner, BOM
        ("ki\u00adll", "kill"),  # soft hyphen
        ("k\u202eill", "kill"),  # bidi override
        ("kíll nüde", "kill nude"),  # accents
        ("k\u0336i\u0336l\u0336l\u0336", "kill"),  # strike-through overlay
        ("  a   b\tc \n", "a b c"),  # whitespace runs
    ],
)
def test_fold(text, expected):
    assert fold(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("kіll", "kill"),  # Cyrillic і
        ("ѕех", "sex"),  # all three Cyrillic
        ("рorn", "porn"),  # Cyrillic р
        ("nаkеd", "naked"),  # Cyrillic а, е
        ("gοre", "gore"),  # Greek ο
        ("nսde", "nude"),  # Armenian ս
        ("хлеб", "хлеб"),  # a Cyrillic word with letters unlike any Latin one stays
        ("αβγ test", "aby test"),  # a whole lookalike token maps
    ],
)
def test_homoglyphs(text, expected):
    assert map_homoglyphs(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("k i l l him", "kill him"),
        ("k.i.l.l", "kill"),
        ("k-i-l-l-i-n-g", "killing"),
        ("k_i_l_l", "kill"),
        ("k  i  l  l", "kill"),
        ("$ u i c i d e", "$uicide"),  # leet symbols may be in a run
        ("a r.a.c.i.s.t cartoon", "a racist cartoon"),  # one kind of separator per run
        ("i am a cat", "i am a cat"),  # two single letters are not a run
        ("mp3 x-ray e-mail", "mp3 x-ray e-mail"),
    ],
)
def test_spaced_letters(text, expected):
    assert join_spaced_letters(text) == expected


def test_spaced_letters_after_an_article_have_both_readings():
    assert join_spaced_letters("a p o r n photo") == "aporn photo"
    assert join_spaced_letters("a p o r n photo", article=True) == "a porn photo"
    assert variants("a p o r n photo") == ["aporn photo", "a porn photo"]
    assert "attack" in variants("a t t a c k")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("k1ll", "kill"),
        ("$uicide", "suicide"),
        ("s3x", "sex"),
        ("h@te", "hate"),
        ("b!tch", "bitch"),
        ("p0rn, now", "porn, now"),
        ("n4k3d", "naked"),
        ("wow!!!", "wow!!!"),  # trailing exclamation marks are punctuation
        ("4k 1980s 3d 5 cats $5 c++", "4k 1980s 3d 5 cats $5 c++"),  # numbers and mostly-digit tokens stay
        ("r2d2", "r2d2"),  # not more letters than leet characters
    ],
)
def test_leetspeak(text, expected):
    assert decode_leet(text) == expected


def test_leetspeak_one_as_l():
    assert decode_leet("bu11y") == "buiiy"
    assert decode_leet("bu11y", one="l") == "bully"
    assert "a poster to bully him" in variants("a p0ster to bu11y him")


def test_normalize_chains_all_steps():
    assert normalize("Ａ ＭＡＮ  k\u200b1ll1ng а stranger") == "a man killing a stranger"
    assert normalize("s.e.l.f h.a.r.m") == "self harm"
    assert variants("plain text") == ["plain text"]
    assert words("assassin's creed, 4k!") == ["assassin's", "creed", "k"]


@pytest.fixture(scope="module")
def blocklist():
    return Blocklist.load(DATA / "blocklist.toml", vocabulary=_vocabulary(None))


@pytest.mark.parametrize(
    "prompt",
    [
        "scunthorpe town centre",
        "a therapist with a patient",
        "assassin's creed review",
        "a killer whale",
        "a field of rapeseed",
        "an insect on a leaf",
        "a heroine with a sword",  # one letter from "heroin", but a known word
        "a portrait of al gore",
        "a naked mole rat",
        "essex and sussex",
        "a cocktail and a shuttlecock",
        "a suicide prevention poster",
    ],
)
def test_blocklist_near_misses_pass(blocklist, prompt):
    assert blocklist.match(normalize(prompt)) is None


@pytest.mark.parametrize(
    "prompt, category, term",
    [
        ("a rapist", "sexual", "rapist"),
        ("two rapists", "sexual", "rapist"),  # plural
        ("the rapist's face", "sexual", "rapist"),  # possessive
        ("a PORN photo", "sexual", "porn"),
        ("a p o r n photo", "sexual", "porn"),  # spaced, after an article
        ("sucide note", "self-harm", "suicide note"),  # misspelled word in a two-word term
        ("injecting herion", "illegal activity", "heroin"),  # swapped letters
        ("a white supremicist", "hate", "white supremacist"),
        ("want to k1ll myself", "self-harm", "kill myself"),
        ("a man being beheaded", "violence", "beheaded"),
    ],
)
def test_blocklist_matches_terms_on_word_boundaries(blocklist, prompt, category, term):
    readings = variants(prompt)
    match = next(m for r in readings if (m := blocklist.match(r)) is not None)
    assert (match.category, match.term) == (category, term)


def test_blocklist_allow_list_and_validation(tmp_path):
    terms = {"x": ["heroin"]}
    assert Blocklist(terms).match("a heroine") is not None  # no vocabulary: one edit away is a misspelling
    assert Blocklist(terms, allow=["Heroine"]).match("a heroine") is None
    with pytest.raises(ValueError, match="has no letters"):
        Blocklist({"x": ["123"]})
    bad = tmp_path / "bad.toml"
    bad.write_text("[x]\nwords = ['a']\n")
    with pytest.raises(ValueError, match=r"\[x\] must hold `terms"):
        Blocklist.load(bad)


@pytest.mark.parametrize(
    "a, b, expected",
    [("sucide", "suicide", True), ("herion", "heroin", True), ("murdr", "murder", True), ("kill", "kill", False),
     ("insect", "incest", False), ("abc", "abcde", False), ("suicide", "suicidal", False)],
)  # fmt: skip
def test_one_edit(a, b, expected):
    assert _one_edit(a, b) is expected
