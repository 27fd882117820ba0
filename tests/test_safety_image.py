"""The CLIP concept image filter with a tiny random CLIPModel saved in the test: scores are CLIP's cosine similarities,
flags follow the per-concept thresholds; the actions (withhold, blur, flag); the safety stage returns every image with
its verdict and records it in the parameters chunk."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import tiny_clip
from transformers import CLIPModel, CLIPProcessor

from unnoise.pipeline.png import format_parameters
from unnoise.safety import (
    PROVENANCE_INFO,
    CLIPConceptFilter,
    Concept,
    ImageVerdict,
    SafetyChecker,
    SafetyConfig,
    apply_action,
    image_verdict,
    load_concepts,
)
from unnoise.safety.prompt_filter import DATA


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tiny_clip(folder)
    return folder


def images():
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_scores_are_clip_cosine_similarities(clip_folder):
    concepts = [Concept("abc", "sexual", 0.5), Concept("xyz", "violence", 0.5)]
    image_filter = CLIPConceptFilter.from_folder(clip_folder, concepts)
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    pictures = images()
    inputs = processor(text=["abc", "xyz"], images=pictures, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    expected = out.image_embeds @ out.text_embeds.T  # both unit norm
    assert torch.allclose(image_filter.scores(pictures), expected, atol=1e-5)


def test_flags_follow_per_concept_thresholds(clip_folder):
    scores = CLIPConceptFilter.from_folder(clip_folder, [Concept("abc", "sexual", 0.0)]).scores(images())[:, 0]
    cut = float(scores.median())  # images above the median score are flagged
    image_filter = CLIPConceptFilter.from_folder(clip_folder, [Concept("abc", "sexual", cut), Concept("q", "hate", 2)])
    verdicts = image_filter.check(images())
    assert [v.flagged for v in verdicts] == [bool(s >= cut) for s in scores]
    flagged = next(v for v in verdicts if v.flagged)
    assert flagged.concept == "abc" and flagged.category == "sexual" and flagged.score >= cut
    assert flagged.reason.startswith("image matches concept 'abc' (sexual): ")
    assert image_filter.check([]) == []


def test_shipped_concepts_load():
    concepts = load_concepts(DATA / "image_concepts.toml")
    assert {c.category for c in concepts} >= {"sexual", "violence", "shocking", "self-harm", "hate"}


def test_actions_never_black_out_silently():
    image = images()[0]
    flagged = ImageVerdict(True, "why", "abc", "sexual", 0.9)
    assert apply_action(image, ImageVerdict(False), "withhold") is image
    assert apply_action(image, flagged, "flag") is image
    assert apply_action(image, flagged, "withhold") is None
    image.info["parameters"] = "p"
    blurred = apply_action(image, flagged, "blur")
    assert blurred.size == image.size and blurred.info["parameters"] == "p"
    assert np.asarray(blurred, np.float64).std() < 0.3 * np.asarray(image, np.float64).std()
    with pytest.raises(ValueError, match="image_action='hide' is not allowed"):
        apply_action(image, flagged, "hide")
    with pytest.raises(ValueError, match="image_action='hide' is not allowed"):
        SafetyConfig(image_action="hide")


@pytest.mark.filterwarnings("ignore::unnoise.models.text.PromptTruncatedWarning")  # shipped concepts, tiny tokenizer
def test_safety_stage_returns_every_image_with_its_verdict(clip_folder):
    config = SafetyConfig(prompt_filter=False, clip_model=clip_folder, image_action="blur")
    checker = SafetyChecker.from_config(config)
    # a threshold below any cosine flags every image, one above passes them all
    checker.image_filter = CLIPConceptFilter(checker.image_filter.embedder, [Concept("abc", "sexual", -1.0)])
    pictures = images()
    for picture in pictures:
        picture.info["parameters"] = format_parameters(dict(prompt="p", steps=1, seed=1, width=48, height=40))
    out = checker.finish(pictures)
    assert len(out) == 3 and all(image_verdict(i).flagged for i in out)
    assert out[0].info[PROVENANCE_INFO]["Image filter"].startswith("flagged (image matches concept")
    assert np.array_equal(np.asarray(out[0]), np.asarray(pictures[0]))  # too small to watermark; pixels untouched
    delivered = checker.deliver(out[0])
    assert delivered is not None and not np.array_equal(np.asarray(delivered), np.asarray(out[0]))
    checker.image_filter = CLIPConceptFilter(checker.image_filter.embedder, [Concept("abc", "sexual", 1.01)])
    passed = checker.finish(pictures)[0]
    assert not image_verdict(passed).flagged and checker.deliver(passed) is passed
    assert passed.info[PROVENANCE_INFO]["Image filter"] == "passed"
    no_filter = SafetyChecker.from_config(SafetyConfig(prompt_filter=False))
    assert no_filter.image_filter is None and not no_filter.check_image(pictures[0]).flagged
    assert image_verdict(out[0]).reason.startswith("image matches concept")
