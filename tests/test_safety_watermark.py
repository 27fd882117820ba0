"""The invisible watermark: survives PNG, JPEG q>=80 and 0.9x-1.1x resizing on 256 px and larger images (bit accuracy
reported), is not found in unmarked images or with another key, is refused (never claimed) for small images; the
safety stage records it in the parameters chunk; ``unnoise watermark detect|embed``."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_safety_prompt import run_safety_cli

from unnoise.pipeline.png import format_parameters, parse_parameters, save_png
from unnoise.safety import PROVENANCE_INFO, SafetyChecker, SafetyConfig, WatermarkTooSmall, detect, embed
from unnoise.safety.watermark import DEFAULT_PAYLOAD, MIN_SIDE, _crc16, bit_accuracy

PAYLOAD = 0xC0FFEE42


def natural(size: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A photo-like test image: smooth colour fields at several scales, a few flat disks, mid-grey mean."""
    g = np.random.default_rng(seed)
    image = np.zeros((size, size, 3))
    for cells, amplitude in ((4, 80), (16, 40), (64, 20), (size, 8)):
        x = torch.from_numpy(g.normal(size=(1, 3, cells, cells)))
        image += amplitude * F.interpolate(x, size=(size, size), mode="bicubic")[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[:size, :size]
    for _ in range(6):
        cx, cy, r = g.uniform(0, size, 3)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < (r / 3) ** 2] = g.uniform(0, 255, 3)
    return Image.fromarray(np.clip(image + 128, 0, 255).astype(np.uint8)).convert(mode)


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def jpeg(image, quality):
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def resized(image, factor):
    w, h = image.size
    return image.resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)


ATTACKS = {
    "png": png,
    "jpeg q90": lambda i: jpeg(i, 90),
    "jpeg q80": lambda i: jpeg(i, 80),
    "resize 0.9x": lambda i: resized(i, 0.9),
    "resize 1.1x": lambda i: resized(i, 1.1),
    "resize 0.9x + jpeg q80": lambda i: jpeg(resized(i, 0.9), 80),
}


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_watermark_survives(size, attack, record_property):
    image = natural(size, seed=size)
    attacked = ATTACKS[attack](embed(image, PAYLOAD))
    payload_accuracy, raw_accuracy = bit_accuracy(attacked, PAYLOAD)
    record_property("bit_accuracy", raw_accuracy)
    print(f"{size}px {attack}: raw bit accuracy {raw_accuracy:.3f}, payload+CRC bits {payload_accuracy:.3f}")
    found = detect(attacked)
    assert found.detected and found.payload == PAYLOAD and payload_accuracy == 1.0
    assert raw_accuracy >= 0.8  # the 16-fold vote corrects the rest


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_watermark_is_invisible_and_keeps_mode_and_info(mode):
    image = natural(MIN_SIDE, seed=1, mode=mode)
    image.info["parameters"] = "a cat\nSteps: 2, Sampler: Euler, Seed: 3"
    marked = embed(image)
    assert marked.mode == mode and marked.size == image.size and marked.info["parameters"] == image.info["parameters"]
    a, b = np.asarray(image, np.float64), np.asarray(marked, np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr > 42 and np.abs(a - b).max() <= 12
    if mode == "RGBA":
        assert np.array_equal(a[..., 3], b[..., 3])
    assert detect(marked).payload == DEFAULT_PAYLOAD and detect(marked).detected


def test_no_watermark_is_found_where_there_is_none():
    for seed in range(5):
        found = detect(natural(256, seed=100 + seed))
        assert not found.detected and found.agreement < 0.7
        assert "no watermark found" in found.describe()
    assert not detect(embed(natural(256), key=1), key=2).detected  # another key reads noise
    assert _crc16(0x12345678) != _crc16(0x12345679)


def test_small_images_are_refused_not_claimed():
    with pytest.raises(WatermarkTooSmall, match=r"image is 32x32; .* so none was embedded"):
        embed(Image.new("L", (32, 32)))
    with pytest.raises(WatermarkTooSmall):
        embed(Image.new("RGB", (1024, 200)))
    assert detect(Image.new("L", (32, 32))).describe().endswith("at 32x32 it is too small to have been marked")
    with pytest.raises(ValueError, match=r"payload=-1 is not allowed"):
        embed(natural(256), -1)


def parameters(size):
    return format_parameters(dict(prompt="a seven", steps=2, sampler="euler", guidance_scale=3.0, seed=7,
                                  width=size, height=size, model="m", model_hash="0123456789"))  # fmt: skip


def test_finish_watermarks_and_records_provenance():
    checker = SafetyChecker(SafetyConfig())
    small, large = Image.new("L", (32, 32), 128), natural(256)
    small.info["parameters"], large.info["parameters"] = parameters(32), parameters(256)
    out_small, out_large = checker.finish([small, large])
    assert np.array_equal(np.asarray(out_small), np.asarray(small))
    assert out_small.info[PROVENANCE_INFO] == {
        "Watermark": "none (32x32 is below the 256 px minimum side)",
        "Image filter": "off",
    }
    assert out_large.info[PROVENANCE_INFO]["Watermark"] == "unnoise DWT-DCT v1 payload 0x554e4e31"
    assert detect(out_large).detected
    assert parse_parameters(out_large.info["parameters"])["seed"] == 7  # the settings are kept
    off = SafetyChecker(SafetyConfig(watermark=False)).finish([large])[0]
    assert off.info[PROVENANCE_INFO]["Watermark"] == "none (watermarking is off)"
    assert not detect(off).detected


def test_watermark_commands(capsys, tmp_path):
    source = natural(256)
    source.info["parameters"] = parameters(256)
    save_png(source, tmp_path / "in.png")
    status, out, _ = run_safety_cli(capsys, "watermark", "embed", str(tmp_path / "in.png"), str(tmp_path / "out.png"),
                             "--payload", "0xC0FFEE42")  # fmt: skip
    assert status == 0 and out.strip() == str(tmp_path / "out.png")
    status, out, _ = run_safety_cli(capsys, "watermark", "detect", str(tmp_path / "out.png"))
    assert status == 0
    assert "watermark found: payload 0xc0ffee42, confidence 1.000, CRC ok" in out
    assert "its parameters record Watermark: unnoise DWT-DCT v1 payload 0xc0ffee42" in out
    jpeg(Image.open(tmp_path / "out.png"), 85).save(tmp_path / "out.jpg")
    status, out, _ = run_safety_cli(capsys, "watermark", "detect", str(tmp_path / "out.jpg"))
    assert status == 0 and "payload 0xc0ffee42" in out
    status, out, _ = run_safety_cli(capsys, "watermark", "detect", str(tmp_path / "in.png"))
    assert status == 1 and "no watermark found" in out
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    status, _, err = run_safety_cli(capsys, "watermark", "embed", str(tmp_path / "small.png"), str(tmp_path / "x.png"))
    assert status == 2 and "argument file: image is 32x32" in err
    (tmp_path / "bad.png").write_text("not an image")
    status, _, err = run_safety_cli(capsys, "watermark", "detect", str(tmp_path / "bad.png"))
    assert status == 2 and "cannot read" in err
    status, _, err = run_safety_cli(capsys, "watermark", "embed", str(tmp_path / "in.png"), "o.png", "--payload", "x")
    assert status == 2 and "'x' is not an integer" in err
