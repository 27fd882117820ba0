"""unnoise.eval units: MNIST features, sample plans and shards, reference caching, the real-vs-real floor, scoring."""

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from unnoise.data.captions import TEMPLATES, caption
from unnoise.data.mnist import MNIST
from unnoise.eval import (
    Measurements,
    MNISTFeatures,
    digit_plan,
    load_reference,
    prompt_plan,
    real_vs_real_floor,
    score,
)
from unnoise.eval.images import to_uint8
from unnoise.eval.measure import parse_metrics
from unnoise.eval.reference import RealSet, check_spec, load_statistics
from unnoise.eval.samples import folder_batches, generated_batches, shard
from unnoise.metrics import FeatureStatistics, frechet_distance
from unnoise.models.classifier import load_classifier


@pytest.fixture(scope="module")
def features():
    return MNISTFeatures.load()


def write_digits(folder, part="val", count=30, *, prompts=False):
    """``count`` real MNIST digits (32x32) as PNGs; with ``prompts``, a parameters chunk with a digit caption."""
    folder.mkdir(parents=True, exist_ok=True)
    data = MNIST(part)
    for i in range(count):
        image = Image.fromarray(data.images[i])
        info = None
        if prompts:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", caption(int(data.labels[i]), i % len(TEMPLATES)))
        image.save(folder / f"{i:05d}.png", pnginfo=info)
    return folder


class Counting:
    """A feature extractor that counts its calls."""

    def __init__(self, inner, name=None):
        self.inner, self.calls = inner, 0
        self.name = name or inner.name
        self.dim = inner.dim

    def __call__(self, images):
        self.calls += 1
        return self.inner(images)


# -- features ------------------------------------------------------------------------------------------------------


def test_mnist_features_match_the_classifier_and_pil_grayscale(features):
    digits = torch.from_numpy(MNIST("val").images[:8])[:, None]
    gray = digits.float() / 127.5 - 1
    classifier = load_classifier()
    feats, predicted = features.features_and_predictions(digits)
    torch.testing.assert_close(feats, classifier.features(gray[:, :, 2:30, 2:30]))
    assert torch.equal(predicted, classifier.predict(gray))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    as_pil = torch.from_numpy(np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb]))[:, None]
    from_rgb = torch.from_numpy(rgb).permute(0, 3, 1, 2)
    torch.testing.assert_close(features(from_rgb), features(as_pil))
    assert features.name.startswith("mnist-classifier-") and features.dim == 128


def test_mnist_features_missing_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="unnoise train-classifier"):
        MNISTFeatures.load(tmp_path)


def test_to_uint8_keeps_grayscale_and_stacks_rgb():
    gray = [Image.new("L", (4, 4), 7)] * 2
    assert to_uint8(gray).shape == (2, 1, 4, 4)
    mixed = to_uint8([Image.new("L", (4, 4), 7), Image.new("RGB", (4, 4), (1, 2, 3))])
    assert mixed.shape == (2, 3, 4, 4) and mixed[1, :, 0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="one size"):
        to_uint8([Image.new("L", (4, 4)), Image.new("L", (5, 5))])


# -- plans and shards ----------------------------------------------------------------------------------------------


def test_digit_plan_has_equal_shares_of_digits_and_templates():
    plan = digit_plan(180, seed=5)
    assert len(plan) == 180 and np.bincount(plan.labels).tolist() == [18] * 10
    sevens = [p for p, label in zip(plan.prompts, plan.labels) if label == 7]
    assert sorted(set(sevens)) == sorted(caption(7, t) for t in range(len(TEMPLATES)))
    assert all(sevens.count(caption(7, t)) == 2 for t in range(len(TEMPLATES)))
    with pytest.raises(ValueError, match="multiple of 10"):
        digit_plan(25)


def test_prompt_plan_shares_and_shards_cover_everything():
    plan = prompt_plan(["a", "b", "c"], 8)
    assert plan.prompts == ("a", "a", "b", "b", "b", "c", "c", "c") and plan.labels is None
    parts = [shard(8, r, 3) for r in range(3)]
    assert [i for part in parts for i in part] == list(range(8))


def test_generated_batches_one_pass_per_batch_one_request_per_prompt_run():
    passes = []

    class FakePipe:
        def generate(self, requests):
            passes.append([(r.prompt, r.num_images, r.seed, r.steps) for r in requests])
            return [[Image.new("L", (32, 32), (r.seed + i) % 256) for i in range(r.num_images)] for r in requests]

    plan = prompt_plan(["a", "b"], 6, seed=10)  # a a a b b b
    batches = list(generated_batches(FakePipe(), plan, range(1, 6), batch_size=3, steps=3))
    assert passes == [[("a", 2, 11, 3), ("b", 1, 13, 3)], [("b", 2, 14, 3)]]
    assert [b.prompts for b in batches] == [["a", "a", "b"], ["b", "b"]]
    pixels = torch.cat([b.images for b in batches])[:, 0, 0, 0].tolist()
    assert pixels == [11, 12, 13, 14, 15]  # image k has seed 10 + k


def test_folder_batches_read_prompts_and_digit_labels(tmp_path):
    folder = write_digits(tmp_path / "d", count=12, prompts=True)
    files = sorted(folder.iterdir())
    batches = list(folder_batches(files, range(2, 12), batch_size=4))
    labels = np.concatenate([b.labels for b in batches])
    assert labels.tolist() == MNIST("val").labels[2:12].tolist()
    assert batches[0].prompts[0] == caption(int(labels[0]), 2)


# -- references, cache, floor --------------------------------------------------------------------------------------


def test_reference_features_are_cached_by_content_and_feature_space(tmp_path, features):
    folder = write_digits(tmp_path / "ref", count=20)
    counting = Counting(features)
    first = load_reference(str(folder), counting, cache_dir=tmp_path / "cache", batch_size=8)
    assert not first.from_cache and counting.calls == 3 and first.count == 20
    second = load_reference(str(folder), counting, cache_dir=tmp_path / "cache")
    assert second.from_cache and counting.calls == 3 and second.content_hash == first.content_hash
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_allclose(second.sigma, first.sigma)
    other_space = load_reference(str(folder), Counting(features, "other"), cache_dir=tmp_path / "cache")
    assert not other_space.from_cache and other_space.content_hash != first.content_hash
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "00000.png")  # changed data: a new key
    changed = load_reference(str(folder), counting, cache_dir=tmp_path / "cache")
    assert not changed.from_cache and changed.content_hash != first.content_hash
    # the cache file is FeatureStatistics' format and serves as a reference itself
    cache_file = next((tmp_path / "cache" / "eval").glob(f"{features.name}-{first.content_hash}.npz"))
    stats = FeatureStatistics.load(cache_file)
    assert stats.count == 20 and stats.feature_space == features.name
    again = load_reference(str(cache_file), counting)
    assert again.features is not None and again.count == 20


def test_statistics_only_npz_serves_fid_but_not_kid(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 4))
    np.savez(tmp_path / "fid.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    ref = load_statistics(tmp_path / "fid.npz", "any")
    generated = Measurements(rng.normal(size=(40, 4)).astype(np.float32))
    out = score(generated, ("fid",), ref, None)
    stats = FeatureStatistics.from_features(generated.features)
    assert out["fid"] == pytest.approx(frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma))
    with pytest.raises(ValueError, match="only statistics"):
        score(generated, ("kid",), ref, None)
    np.savez(tmp_path / "other.npz", mu=ref.mu, sigma=ref.sigma, feature_space=np.str_("inception-v3-fid-clean"))
    with pytest.raises(ValueError, match="feature space 'inception-v3-fid-clean'"):
        load_statistics(tmp_path / "other.npz", "mnist-classifier-x")


def real_set(name, feats):
    stats = FeatureStatistics.from_features(feats)
    return RealSet(name, "f", stats.mean, stats.cov, len(feats), feats, name)


def test_real_vs_real_floor_uses_disjoint_subsets_at_the_same_n():
    rng = np.random.default_rng(1)
    reference, held_out = real_set("ref", rng.normal(size=(300, 3))), real_set("held", rng.normal(size=(70, 3)))
    floor = real_vs_real_floor(reference, held_out, 20, seed=0)
    assert (floor.n, floor.subsets, floor.held_out) == (20, 3, "held")
    order = np.random.default_rng(0).permutation(70)
    fids = []
    for i in range(3):
        s = FeatureStatistics.from_features(held_out.features[order[20 * i : 20 * (i + 1)]])
        fids.append(frechet_distance(s.mean, s.cov, reference.mu, reference.sigma))
    assert floor.mean == pytest.approx(np.mean(fids)) and floor.std == pytest.approx(np.std(fids))
    everything = real_vs_real_floor(reference, held_out, 1000)
    assert (everything.n, everything.subsets) == (70, 1)
    with pytest.raises(ValueError, match="is the reference itself"):
        real_vs_real_floor(reference, reference, 20)


def test_check_spec_and_metric_names(tmp_path):
    assert check_spec("mnist-val") == "mnist-val"
    with pytest.raises(ValueError, match="reference='nope' is not allowed \\(not found\\); allowed: mnist-train"):
        check_spec("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="an empty folder"):
        check_spec(str(tmp_path / "empty"))
    assert parse_metrics("fid, adherence") == ("fid", "adherence")
    with pytest.raises(ValueError, match="'fdi' is not a metric; allowed: fid, kid, pr, adherence, is, clip"):
        parse_metrics("fid,fdi")


def test_adherence_from_labels_and_predictions():
    labels = np.repeat(np.arange(10), 2)
    predictions = labels.copy()
    predictions[[0, 5]] = [9, 0]
    m = Measurements(np.zeros((20, 2), np.float32), labels=labels, predictions=predictions)
    a = score(m, ("adherence",), real_set("r", np.eye(3)), None)["adherence"]
    assert a["overall"] == 0.9 and a["per_digit"][0] == 0.5 and a["per_digit"][2] == 0.5 and a["per_digit"][1] == 1
    assert np.asarray(a["confusion"]).sum() == 20 and a["confusion"][0][9] == 1
    unknown = Measurements(m.features, labels=np.full(20, -1), predictions=predictions)
    with pytest.raises(ValueError, match="adherence needs digit prompts; 20 of 20"):
        score(unknown, ("adherence",), real_set("r", np.eye(3)), None)
