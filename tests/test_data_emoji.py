import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from unnoise.data import emoji
from unnoise.data.emoji import Emoji, load_emoji

# A tiny package laid out like npm emoji-datasource-<style>@16.0.0, listed out of sort_order on purpose.
FIELDS = ("name", "short_names", "category", "subcategory", "image", "sort_order")
ENTRIES = [
    dict(zip(FIELDS, ("THUMBS UP SIGN", ["+1", "thumbsup"], "People & Body", "hand-fingers-closed", "1f44d.png", 3))),
    dict(zip(FIELDS, ("GRINNING FACE", ["grinning"], "Smileys & Emotion", "face-smiling", "1f600.png", 1))),
    dict(zip(FIELDS, ("MALE SIGN", ["male_sign"], "Symbols", "gender", "2642-fe0f.png", 2)), has_img=False),
    dict(zip(FIELDS, ("Egypt Flag", ["flag-eg"], "Flags", "country-flag", "1f1ea.png", 5))),
    dict(zip(FIELDS, ("CAT FACE", ["cat"], "Animals & Nature", "animal-mammal", "1f431.png", 4))),
]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _pixels(entry, style):
    """A distinct RGBA image per emoji and style; pixel (0, 0) is (200, 100, 0) at alpha 128."""
    seed = entry["sort_order"] + 10 * emoji.STYLES.index(style)
    rgba = np.random.default_rng(seed).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 0, 128)
    rgba[0, 1] = (10, 20, 30, 0)
    rgba[0, 2] = (10, 20, 30, 255)
    return rgba


def _add(tar, name, blob):
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))


def _fake_tarball(path, style="google"):
    entries = []
    for e in ENTRIES:
        e = dict(e)
        has_img = e.pop("has_img", True)
        entries.append({**e, **{f"has_img_{s}": has_img for s in emoji.STYLES}})
    with tarfile.open(path, "w:gz") as tar:
        for e in ENTRIES:
            if e.get("has_img", True):
                image = Image.fromarray(_pixels(e, style))
                if e["name"] == "CAT FACE":  # the packages also hold LA and palette PNGs
                    image = image.convert("LA")
                _add(tar, f"package/img/{style}/64/{e['image']}", _png(image))
        _add(tar, f"package/img/{style}/64/1f44d-1f3fb.png", _png(Image.new("RGBA", (64, 64))))  # a skin tone
        _add(tar, f"package/img/{style}/sheets/64.png", _png(Image.new("RGBA", (8, 8))))
        _add(tar, "package/emoji.json", json.dumps(entries).encode())
    return path


def _install_fake(cache, monkeypatch, style="google"):
    """Put a fake tarball where ``load_emoji`` looks and pin its hash."""
    tarball = _fake_tarball(cache / emoji.tarball_name(style), style)
    monkeypatch.setitem(emoji.TARBALL_SHA256, style, hashlib.sha256(tarball.read_bytes()).hexdigest())
    return tarball


def test_convert_orders_filters_and_composites_on_white(tmp_path):
    arrays = emoji.convert_tarball(_fake_tarball(tmp_path / "fake.tgz"), "google")
    assert list(arrays["names"]) == ["GRINNING FACE", "THUMBS UP SIGN", "CAT FACE", "Egypt Flag"]  # sort_order
    np.testing.assert_array_equal(arrays["ids"], [0, 2, 3, 4])  # MALE SIGN (id 1) has no image
    assert int(arrays["num_emoji"]) == 5
    np.testing.assert_array_equal(arrays["labels"], [0, 1, 3, 9])
    assert list(arrays["short_names"]) == ["grinning", "+1,thumbsup", "cat", "flag-eg"]
    images = arrays["images"]
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    # By hand: 200 * 128/255 + 255 * 127/255 = 227.39, 100 * 128/255 + 127 = 177.20, 0 + 127 = 127.
    np.testing.assert_array_equal(images[0, 0, 0], [227, 177, 127])
    np.testing.assert_array_equal(images[0, 0, 1], [255, 255, 255])  # fully transparent: white
    np.testing.assert_array_equal(images[0, 0, 2], [10, 20, 30])  # opaque: unchanged
    gray = _pixels(ENTRIES[4], "google")  # LA: the gray level is the luma of the colors
    luma = np.asarray(Image.fromarray(gray[..., :3]).convert("L"), dtype=np.float64)
    expected = np.round(luma * gray[..., 3] / 255 + 255 * (1 - gray[..., 3] / 255))
    np.testing.assert_array_equal(images[2], np.repeat(expected[..., None], 3, axis=2))


def test_convert_rejects_a_missing_image(tmp_path):
    tarball = tmp_path / "broken.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        _add(tar, "package/emoji.json", json.dumps([{**ENTRIES[1], "has_img_google": True}]).encode())
    with pytest.raises(ValueError, match="no image img/google/64/1f600.png"):
        emoji.convert_tarball(tarball, "google")


def test_load_converts_once_and_drops_the_tarball(tmp_path, monkeypatch):
    tarball = _install_fake(tmp_path, monkeypatch)
    first = load_emoji("google", cache_dir=tmp_path)
    assert not tarball.exists() and (tmp_path / "emoji-datasource-google-16.0.0.npz").exists()
    again = load_emoji("google", cache_dir=tmp_path)  # from the .npz alone
    assert first.keys() == again.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])


def test_sha256_mismatch_rejects_corrupt_tarball(tmp_path):
    tarball = _fake_tarball(tmp_path / emoji.tarball_name("twitter"), "twitter")
    with pytest.raises(ValueError, match="sha256 mismatch") as err:
        load_emoji("twitter", cache_dir=tmp_path)
    message = str(err.value)
    assert emoji.TARBALL_SHA256["twitter"] in message and str(tarball) in message
    assert "emoji-datasource-twitter@16.0.0" in message and "delete it" in message
    assert tarball.exists() and not list(tmp_path.glob("*.npz"))


def test_missing_npm_names_npm_and_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="npm was not found on PATH.*emoji-datasource-apple@16.0.0.*Node.js"):
        load_emoji("apple", cache_dir=tmp_path)


def test_parts_split_emoji_alike_in_every_style(tmp_path, monkeypatch):
    for style in ("google", "twitter"):
        _install_fake(tmp_path, monkeypatch, style)
    both = dict(styles=("google", "twitter"), cache_dir=tmp_path)
    train, val, full = Emoji(**both, part="train"), Emoji(**both, part="val"), Emoji(**both, part="all")
    assert len(full) == 8 and len(train) + len(val) == 8 and len(val) == 2  # one of the 5 emoji in val
    assert val.names[0] == val.names[1] and val.item_styles == ["google", "twitter"]
    assert set(train.names).isdisjoint(val.names)
    assert full.item_styles == ["google"] * 4 + ["twitter"] * 4
    assert not np.array_equal(full.images[0], full.images[4])  # the styles differ
    assert Emoji.num_classes == 10 and Emoji.channels == 3


def test_batch_captions_are_drawn_from_the_rng(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch)
    ds = Emoji(part="all", cache_dir=tmp_path, style_in_caption=True)
    assert ds.keywords[1] == ("+1", "thumbsup", "hand fingers closed")
    batch = ds.batch(np.array([1, 1, 1, 1, 1, 1, 1, 1, 3]), np.random.default_rng(0))
    assert batch.images.shape == (9, 3, 64, 64) and batch.labels.tolist() == [1] * 8 + [9]
    for index, text in zip([1] * 8 + [3], batch.captions):
        name, *keywords, style = text.split(", ")
        assert name == ds.names[index] and style == "google style"
        assert set(keywords) <= set(ds.keywords[index]) and len(set(keywords)) == len(keywords)
    assert len(set(batch.captions[:8])) > 1
    again = ds.batch(np.array([1, 1, 1, 1, 1, 1, 1, 1, 3]), np.random.default_rng(0))
    assert again.captions == batch.captions
    np.testing.assert_allclose(batch.images[0].numpy(), ds.images[1].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_resize_with_lanczos(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch)
    small = Emoji(part="all", size=32, cache_dir=tmp_path)
    full = Emoji(part="all", cache_dir=tmp_path)
    assert small.images.shape == (4, 32, 32, 3) and small.size == 32
    expected = Image.fromarray(full.images[2]).resize((32, 32), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(small.images[2], np.asarray(expected))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(styles=("facebook",)), "styles="),
        (dict(styles=("google", "google")), "styles="),
        (dict(styles=()), "styles="),
        (dict(part="test"), "part='test'"),
        (dict(size=0), "size=0"),
    ],
)
def test_rejects_bad_arguments(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        Emoji(cache_dir=tmp_path, **bad)


def test_real_google_package():
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    try:
        ds = Emoji("google", part="all")  # fetches npm emoji-datasource-google@16.0.0 once, then reads the cache
    except RuntimeError as e:  # npm could not reach the registry; a sha256 mismatch is a ValueError and fails
        pytest.skip(f"npm could not download the package: {e}")
    assert len(ds) == 1911 and ds.images.shape == (1911, 64, 64, 3)
    assert ds.names[0] == "grinning face" and ds.keywords[0] == ("grinning", "face smiling")
    assert np.bincount(ds.labels, minlength=10).tolist() == [169, 386, 5, 159, 131, 218, 85, 264, 224, 270]
    corners = ds.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all(axis=-1).mean() > 0.8  # transparent backgrounds became white
    val = Emoji("google", part="val")
    assert len(val) == 191 and set(val.names) < set(ds.names)
