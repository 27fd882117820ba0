import json
import warnings

import numpy as np
import pytest
from PIL import Image

from unnoise.data.folder import ImageFolder, composite_on_white, load_image


def _stripes(width, height):
    """An RGB image whose column x has red = 8 x and whose row y has green = 8 y: crops are easy to locate."""
    x, y = np.meshgrid(np.arange(width) * 8, np.arange(height) * 8)
    return np.stack([x, y, np.full_like(x, 99)], axis=-1).astype(np.uint8)


def _save(path, pixels, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def _quiet(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these folders are clean: any warning is a failure
        return ImageFolder(root, **kwargs)


def test_center_crop_takes_the_central_square(tmp_path):
    wide, tall = _stripes(31, 20), _stripes(20, 27)
    _save(tmp_path / "a_wide.png", wide)
    _save(tmp_path / "b_tall.png", tall)
    ds = _quiet(tmp_path, size=20)  # size = the shorter side: the resize is the identity, the crop is exact
    # By hand: wide 31 x 20 keeps columns (31 - 20) // 2 = 5 .. 24; tall 20 x 27 keeps rows (27 - 20) // 2 = 3 .. 22.
    np.testing.assert_array_equal(ds.images[0], wide[:, 5:25])
    np.testing.assert_array_equal(ds.images[1], tall[3:23, :])


def test_resize_without_crop_keeps_the_whole_image(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :16], pixels[:, 16:24], pixels[:, 24:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    _save(tmp_path / "bands.png", pixels)
    cropped = _quiet(tmp_path, size=20).images[0]
    squashed = _quiet(tmp_path, size=20, center_crop=False).images[0]
    np.testing.assert_array_equal(cropped, pixels[:, 10:30])
    # Halving the width, Lanczos reads 6 source columns each side: the outer 3 output columns see one band only.
    np.testing.assert_array_equal(squashed[:, :3], np.tile([255, 0, 0], (20, 3, 1)))
    np.testing.assert_array_equal(squashed[:, -3:], np.tile([0, 0, 255], (20, 3, 1)))


def test_jpeg_grayscale_and_transparency(tmp_path):
    _save(tmp_path / "photo.jpg", np.full((12, 16, 3), (30, 60, 90), dtype=np.uint8), quality=95)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 0), 128
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    _save(tmp_path / "sticker.png", rgba)
    rgb = _quiet(tmp_path, size=8)
    assert np.abs(rgb.images[0].astype(int) - (30, 60, 90)).max() <= 2  # JPEG is lossy
    # By hand: 200 * 128/255 + 255 * 127/255 = 227.39, 100 * 128/255 + 127 = 177.20, 0 * 128/255 + 127 = 127.
    np.testing.assert_array_equal(rgb.images[1, 0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb.images[1, 0, 1], [200, 100, 0])
    np.testing.assert_array_equal(rgb.images[1, 1:, 1:], np.tile([227, 177, 127], (7, 7, 1)))
    gray = _quiet(tmp_path, size=8, channels=1)
    assert gray.images.shape == (2, 8, 8) and gray.batch(np.array([1]), np.random.default_rng(0)).images.shape[1] == 1
    # ITU-R 601 luma of (227, 177, 127): 0.299 * 227 + 0.587 * 177 + 0.114 * 127 = 186.25.
    assert gray.images[1, 4, 4] == 186 and gray.images[1, 0, 0] == 255


def test_composite_on_white_rounds_exactly():
    rgba = np.random.default_rng(0).integers(0, 256, (1000, 4), dtype=np.uint8)
    alpha = rgba[:, 3:] / 255
    expected = np.round(rgba[:, :3] * alpha + 255 * (1 - alpha))
    np.testing.assert_array_equal(composite_on_white(rgba), expected)


def test_captions_sidecar_then_metadata_text_then_caption(tmp_path):
    pixels = _stripes(8, 8)
    for name in ["a.png", "b.png", "c.png", "d.png", "sub/e.png", "sub/f.png"]:
        _save(tmp_path / name, pixels)
    (tmp_path / "a.txt").write_text("  a from its sidecar\n")
    (tmp_path / "notes.txt").write_text("a text file with no image is not a caption")
    rows = [
        {"file_name": "a.png", "text": "a from metadata"},
        {"file_name": "b.png", "text": "b text", "caption": "b caption"},
        {"file_name": "c.png", "caption": "c caption"},
        {"file_name": "sub/e.png", "text": "e from the root metadata", "score": 3},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "f.png", "text": "f"}))
    ds = _quiet(tmp_path, size=8)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == [
        "a.png", "b.png", "c.png", "d.png", "sub/e.png", "sub/f.png"
    ]  # fmt: skip
    assert ds.captions == ["a from its sidecar", "b text", "c caption", "", "e from the root metadata", "f"]
    assert ds.batch(np.array([3, 0]), np.random.default_rng(0)).captions == ["", "a from its sidecar"]
    assert ds.num_classes is None and ds.batch(np.array([0]), np.random.default_rng(0)).labels is None


def test_metadata_errors_name_the_file_and_line(tmp_path):
    _save(tmp_path / "a.png", _stripes(4, 4))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png",\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2 is not valid JSON"):
        ImageFolder(tmp_path, size=4)
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(ValueError, match=r'metadata.jsonl:1 must be an object with a string "file_name"'):
        ImageFolder(tmp_path, size=4)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.warns(UserWarning, match="1 metadata.jsonl entries .* name no image file found, e.g. .*gone.png"):
        ImageFolder(tmp_path, size=4)


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    _save(tmp_path / "good.png", _stripes(8, 8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _save(tmp_path / "cut.jpg", _stripes(64, 64))
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:200])  # truncated
    (tmp_path / ".hidden.png").write_bytes(b"hidden files are not looked at")
    with pytest.warns(UserWarning, match=r"skipped 2 of 3 image files in .* the full list is in .skipped"):
        ds = ImageFolder(tmp_path, size=8)
    assert len(ds) == 1 and ds.paths == [tmp_path / "good.png"]
    assert [p.name for p, _ in ds.skipped] == ["broken.png", "cut.jpg"]
    assert all(reason for _, reason in ds.skipped)


def test_empty_or_unreadable_folders_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path / 'missing'} does not exist"):
        ImageFolder(tmp_path / "missing", size=8)
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=f"no image files in {tmp_path} "):
        ImageFolder(tmp_path, size=8)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match=f"none of the 1 image files in {tmp_path} could be read, e.g. .*bad.jpg"):
        ImageFolder(tmp_path, size=8)


def test_flips_come_from_the_rng(tmp_path):
    for i in range(3):
        _save(tmp_path / f"{i}.png", np.roll(_stripes(8, 8), i, axis=1))
    ds = _quiet(tmp_path, size=8, flip=True)
    indices = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    batch = ds.batch(indices, np.random.default_rng(5))
    flips = np.random.default_rng(5).random(len(indices)) < 0.5
    assert 0 < flips.sum() < len(flips)
    expected = ds.images[indices]
    expected[flips] = expected[flips, :, ::-1]
    np.testing.assert_allclose(batch.images.numpy(), expected.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(ds.images[0], np.roll(_stripes(8, 8), 0, axis=1))  # the data set is untouched
    again = ds.batch(indices, np.random.default_rng(5))
    assert torch_equal(again.images, batch.images)
    plain = _quiet(tmp_path, size=8).batch(indices, np.random.default_rng(5))
    np.testing.assert_allclose(plain.images.numpy(), ds.images[indices].transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)


def test_lazy_decoding_matches_memory(tmp_path):
    for i in range(3):
        _save(tmp_path / f"{i}.jpg", _stripes(10 + i, 9), quality=90)
    kept = _quiet(tmp_path, size=6, flip=True)
    lazy = _quiet(tmp_path, size=6, flip=True, max_memory_bytes=0)
    assert lazy.images is None and kept.images is not None
    indices = np.array([2, 0, 1, 2])
    a, b = kept.batch(indices, np.random.default_rng(1)), lazy.batch(indices, np.random.default_rng(1))
    assert torch_equal(a.images, b.images) and a.captions == b.captions
    assert lazy.batch(np.array([], dtype=np.int64), np.random.default_rng(0)).images.shape == (0, 3, 6, 6)
    (tmp_path / "1.jpg").write_bytes(b"gone bad")
    with pytest.raises(OSError, match="1.jpg could be read when the data set was made but not now"):
        lazy.batch(np.array([1]), np.random.default_rng(0))


def test_load_image_applies_exif_rotation(tmp_path):
    pixels = _stripes(6, 4)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.png", exif=exif)
    loaded = load_image(tmp_path / "rotated.png", 4, center_crop=True)
    np.testing.assert_array_equal(loaded, np.rot90(pixels, k=-1)[1:5])


@pytest.mark.parametrize("bad, match", [(dict(size=0), "size=0"), (dict(size=8, channels=2), "channels=2")])
def test_rejects_bad_arguments(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        ImageFolder(tmp_path, **bad)


def torch_equal(a, b):
    return bool((a == b).all())
