import numpy as np
import pytest

from unnoise.data.captions import DIGIT_WORDS, TEMPLATES, caption, random_captions


def test_every_template_names_the_digit():
    for label in range(10):
        for t in range(len(TEMPLATES)):
            text = caption(label, t)
            assert str(label) in text or DIGIT_WORDS[label] in text.split(), text
    assert caption(7, 0) == "a handwritten digit 7" and caption(7, 2) == "the number seven" and caption(7, 5) == "7"


def test_random_captions_are_seeded_and_varied():
    labels = np.arange(10).repeat(20)
    a = random_captions(labels, np.random.default_rng(0))
    b = random_captions(labels, np.random.default_rng(0))
    assert a == b and len(set(a)) > 50
    assert all(str(label) in c or DIGIT_WORDS[label] in c.split() for label, c in zip(labels, a))


def test_caption_errors():
    with pytest.raises(ValueError, match="label=10 must be an integer digit 0-9"):
        caption(10, 0)
    with pytest.raises(ValueError, match="template=99"):
        caption(1, 99)
