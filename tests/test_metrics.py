"""Metrics on features against plain reference implementations: FID (scipy), KID, precision/recall, IS, CLIP score,
and streaming statistics (batches, merge, save/load, all_reduce over two processes)."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import free_port, tiny_tokenizer
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from unnoise.metrics import (
    CLIPEmbedder,
    FeatureStatistics,
    clip_score,
    fid_from_features,
    fid_from_statistics,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from unnoise.models.text import PromptTruncatedWarning


def features(n: int, d: int, seed: int, *, rank: int | None = None, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features; with ``rank``, confined to a random ``rank``-dim subspace."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(rank or d, d))
    return rng.normal(size=(n, rank or d)) @ mix + shift + rng.normal(size=d)


def frechet_scipy(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """pytorch-fid's ``calculate_frechet_distance``: scipy's sqrtm of the product, eps offset if not finite."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


# ---------------------------------------------------------------------------------------------------- Fréchet


@pytest.mark.parametrize(
    "a, b",
    [
        ((300, 24, dict()), (200, 24, dict(shift=0.5))),  # full rank
        ((10, 32, dict()), (12, 32, dict(shift=0.3))),  # fewer samples than dims: both covariances singular
        ((100, 24, dict(rank=6)), (100, 24, dict(rank=9))),  # features in low-dimensional subspaces
        ((100, 24, dict(rank=6)), (300, 24, dict(shift=1.0))),  # one singular, one full rank
    ],
)
def test_frechet_distance_matches_scipy_sqrtm(a, b):
    (n1, d, kw1), (n2, _, kw2) = a, b
    x, y = features(n1, d, seed=1, **kw1), features(n2, d, seed=2, **kw2)
    expected = frechet_scipy(*moments(x), *moments(y))
    assert frechet_distance(*moments(x), *moments(y)) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(x, y) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(expected, 1e-5)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=8), rng.normal(size=8), rng.uniform(0, 3, 8), rng.uniform(0, 3, 8)
    a[:2] = 0  # singular
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    x = features(50, 8, seed=3)
    assert abs(frechet_distance(*moments(x), *moments(x))) < 1e-10


def test_frechet_distance_accepts_float32_rounding_of_singular_covariance():
    x, y = features(10, 32, seed=1), features(12, 32, seed=2)
    (mu1, s1), (mu2, s2) = moments(x), moments(y)
    expected = frechet_distance(mu1, s1, mu2, s2)
    got = frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2.astype(np.float32), s2.astype(np.float32))
    assert got == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_rejects_bad_input_naming_it():
    mu, sigma = moments(features(40, 4, seed=0))
    bad_psd = sigma - 2 * np.abs(np.linalg.eigvalsh(sigma)).max() * np.eye(4)
    cases = [
        ((mu, sigma, mu[:3], sigma), "mu2"),
        ((mu, sigma, mu, sigma[:3, :3]), "sigma2"),
        ((np.full(4, np.nan), sigma, mu, sigma), "mu1"),
        ((mu, sigma, mu, np.where(np.eye(4) > 0, np.inf, sigma)), "sigma2"),
        ((mu, sigma + np.triu(np.ones((4, 4)), 1), mu, sigma), "sigma1 is not symmetric"),
        ((mu, bad_psd, mu, sigma), "sigma1 is not positive semidefinite"),
        ((mu, sigma, mu, bad_psd), "sigma2 is not positive semidefinite"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            frechet_distance(*args)


# ---------------------------------------------------------------------------------------------------- statistics


def test_streaming_statistics_equal_one_shot_and_merge_equals_concatenation():
    x = features(103, 12, seed=4, shift=3.0)
    stats = FeatureStatistics(12)
    for i, batch in enumerate(np.array_split(x, [1, 40, 41, 90])):  # uneven batches, two of a single row
        stats.update(torch.from_numpy(batch).float() if i == 2 else batch)  # numpy float64 or torch float32
    x32 = x.copy()
    x32[40] = x32[40].astype(np.float32)  # the float32 batch rounds its row
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, x32.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x32, rowvar=False), rtol=1e-10, atol=1e-10)
    assert (stats.cov == stats.cov.T).all()

    a, b = FeatureStatistics.from_features(x[:30]), FeatureStatistics.from_features(x[30:])
    merged = a.merge(b)
    np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


def test_statistics_save_load_round_trip_without_pickles(tmp_path):
    x = features(50, 6, seed=5)
    stats = FeatureStatistics.from_features(x, feature_space="inception-v3-fid-clean")
    stats.save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["count", "feature_space", "mu", "sigma"]
    loaded = FeatureStatistics.load(tmp_path / "ref.npz")
    assert (loaded.count, loaded.feature_space) == (50, "inception-v3-fid-clean")
    np.testing.assert_allclose(loaded.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(loaded.cov, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-13)
    # loaded accumulators keep merging: reference stats plus new features equal the statistics of all of them
    y = features(20, 6, seed=6)
    loaded.merge(FeatureStatistics.from_features(y, feature_space="inception-v3-fid-clean"))
    np.testing.assert_allclose(loaded.cov, np.cov(np.concatenate([x, y]), rowvar=False), rtol=1e-10, atol=1e-12)
    assert fid_from_statistics(loaded, loaded) == pytest.approx(0, abs=1e-9)

    np.savez(tmp_path / "pytorch_fid.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    with pytest.raises(ValueError, match="count"):
        FeatureStatistics.load(tmp_path / "pytorch_fid.npz")


def test_statistics_refuse_mismatches():
    stats = FeatureStatistics(4, feature_space="a")
    with pytest.raises(ValueError, match="feats has 3 features"):
        stats.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.update(np.zeros((1, 4))).cov
    with pytest.raises(ValueError, match="feature space 'b'"):
        stats.merge(FeatureStatistics(4, feature_space="b"))
    other = FeatureStatistics.from_features(features(5, 4, seed=0), feature_space="b")
    with pytest.raises(ValueError, match="do not compare"):
        fid_from_statistics(FeatureStatistics.from_features(features(5, 4, seed=1), feature_space="a"), other)
    with pytest.raises(RuntimeError, match="init_process_group"):
        stats.all_reduce()


def test_all_reduce_over_two_processes_equals_single_process(tmp_path):
    x = features(37, 10, seed=7, shift=2.0)
    np.save(tmp_path / "feats.npy", x)
    worker = Path(__file__).with_name("_metrics_dist_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(worker), str(tmp_path / "feats.npy"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # every rank holds the statistics of all features
        stats = FeatureStatistics.load(tmp_path / f"rank{rank}.npz")
        assert stats.count == 37
        np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- KID


def kid_reference(x: np.ndarray, y: np.ndarray, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """Plain loops: unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 over the subsets RandomState(seed) draws."""
    rng = np.random.RandomState(seed)
    d = x.shape[1]
    mmds = []
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)]
        xx = yy = xy = 0.0
        for i in range(size):
            for j in range(size):
                xy += (a[i] @ b[j] / d + 1) ** 3
                if i != j:
                    xx += (a[i] @ a[j] / d + 1) ** 3
                    yy += (b[i] @ b[j] / d + 1) ** 3
        mmds.append((xx + yy) / (size * (size - 1)) - 2 * xy / size**2)
    return float(np.mean(mmds)), float(np.std(mmds))


def test_kid_matches_plain_reference():
    x, y = features(30, 5, seed=8), features(25, 5, seed=9, shift=0.5)
    mean, std = kid(x, y, subsets=7, subset_size=12, seed=3)
    assert (mean, std) == pytest.approx(kid_reference(x, y, 7, 12, 3), rel=1e-10)
    # the subset size is capped by the smaller set; the default seed is torch-fidelity's
    assert tuple(kid(torch.from_numpy(x), y, subsets=3)) == pytest.approx(kid_reference(x, y, 3, 25, 2020), rel=1e-10)
    with pytest.raises(ValueError, match="real has 5 features per row but generated has 4"):
        kid(x, y[:, :4])


# ---------------------------------------------------------------------------------------------------- precision/recall


def precision_recall_reference(real: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    """Plain loops: radius = distance to the k-th nearest other sample of the same set."""

    def radii(x):
        return [sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def covered(queries, centers, r):
        inside = [any(np.linalg.norm(q - c) <= rc for c, rc in zip(centers, r)) for q in queries]
        return sum(inside) / len(queries)

    return covered(gen, real, radii(real)), covered(real, gen, radii(gen))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_plain_reference(k):
    real = features(40, 6, seed=10)
    gen = np.concatenate([features(25, 6, seed=11, shift=0.8), features(10, 6, seed=12, shift=6.0)])
    expected = precision_recall_reference(real, gen, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # neither trivially 0 nor 1
    assert tuple(precision_recall(real, gen, k=k, batch_size=7)) == pytest.approx(expected, abs=1e-12)
    assert tuple(precision_recall(torch.from_numpy(real), gen, k=k)) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_needs_more_samples_than_k():
    with pytest.raises(ValueError, match="generated has 3 samples; k=3"):
        precision_recall(features(10, 2, seed=0), features(3, 2, seed=1), k=3)


# ---------------------------------------------------------------------------------------------------- Inception Score


def inception_score_reference(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """The original code (Salimans et al. 2016, openai/improved-gan): consecutive splits, exp of mean KL."""
    scores = []
    for i in range(splits):
        part = probs[(i * probs.shape[0] // splits) : ((i + 1) * probs.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_original_code():
    logits = np.random.default_rng(13).normal(scale=3, size=(53, 11))
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert tuple(inception_score(probs)) == pytest.approx(inception_score_reference(probs, 10), rel=1e-12)
    assert tuple(inception_score(probs, splits=3)) == pytest.approx(inception_score_reference(probs, 3), rel=1e-12)
    one_hot = np.eye(10)[np.arange(40) % 10]  # confident and uniform over classes: IS = number of classes
    assert inception_score(one_hot, splits=4) == pytest.approx((10.0, 0.0))
    with pytest.raises(ValueError, match="probabilities"):
        inception_score(logits)


# ---------------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_formula():
    image = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    text = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    expected = 100 * (1.0 + 2**-0.5 + 0.0) / 3  # cosines 1, 1/sqrt(2), -1 -> clipped to 0
    assert clip_score(image, text) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="pair row by row"):
        clip_score(image, text[:2])
    with pytest.raises(ValueError, match="text_embeds has an all-zero row"):
        clip_score(image, np.zeros((3, 2)))


def tiny_clip(folder: Path) -> None:
    """A random CLIPModel with small towers and its processor, saved to ``folder``."""
    tokenizer = tiny_tokenizer(folder)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def test_clip_embedder_matches_transformers(tmp_path):
    tiny_clip(tmp_path)
    embedder = CLIPEmbedder.from_folder(tmp_path)
    model, processor = CLIPModel.from_pretrained(tmp_path), CLIPProcessor.from_pretrained(tmp_path)
    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "dog", "seven"]
    inputs = processor(text=prompts, images=list(images.permute(0, 2, 3, 1).numpy()), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    image_embeds, text_embeds = embedder.embed_images(images), embedder.embed_texts(prompts)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert embedder.score(images, prompts) == pytest.approx(float(100 * cos.clamp_min(0).mean()), rel=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(image_embeds), out.image_embeds, atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(text_embeds), out.text_embeds, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedder.embed_texts(["abcdefghijklmnopqrstuvwxyz"])
    assert any(issubclass(w.category, PromptTruncatedWarning) for w in caught)
