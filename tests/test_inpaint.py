"""img2img and inpainting as AUTOMATIC1111 does them, on the embedded grayscale model: images converted to the VAE's
channels, the original pasted back outside the blurred mask, resize modes, masked content, "only masked"
inpainting, the fields' errors, their PNG parameters and CLI flags."""

import re

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from helpers import run_cli
from PIL import Image

from unnoise import cli
from unnoise.core.noise import randn_like
from unnoise.pipeline import Pipeline, Request, resolve_request
from unnoise.pipeline import images as ops
from unnoise.pipeline.png import call_arguments, parse_parameters, read_png_parameters, save_png

PROMPT, SIZE = "a handwritten 7", 32
FAST = dict(steps=3, sampler="euler", seed=11)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


@pytest.fixture(scope="module")
def digit(pipe) -> Image.Image:
    """A grayscale image the model itself drew: its latents are in distribution."""
    return pipe("a handwritten 3", steps=4, seed=1)[0]


def levels(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def reference_blur(mask: Image.Image, sigma: float) -> np.ndarray:
    """A Gaussian of std sigma over 2 * int(2.5 sigma + 0.5) + 1 taps, borders mirrored without the edge pixel
    (scipy's "mirror" is OpenCV's default BORDER_REFLECT_101), in float."""
    radius = int(2.5 * sigma + 0.5)
    return scipy.ndimage.gaussian_filter(np.asarray(mask, dtype=np.float64), sigma, mode="mirror", radius=radius)


# -- the two defects ---------------------------------------------------------------------------------------------


def test_img2img_and_inpainting_run_on_the_grayscale_model_from_rgb_and_rgba_images(pipe, digit):
    rgb = digit.convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))))
    on_white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    on_white.alpha_composite(rgba)  # AUTOMATIC1111 flattens an init image onto its background colour, white
    mask = box_mask(digit.size, (8, 8, 24, 24))
    for kwargs in (dict(strength=0.7), dict(mask=mask, strength=0.9)):
        out = pipe(PROMPT, image=rgb, **kwargs, **FAST)[0]
        assert out.mode == "L" and out.size == digit.size
        assert np.array_equal(np.asarray(out), np.asarray(pipe(PROMPT, image=digit, **kwargs, **FAST)[0]))
        flattened = pipe(PROMPT, image=rgba, **kwargs, **FAST)[0]
        by_hand = pipe(PROMPT, image=on_white.convert("L"), **kwargs, **FAST)[0]
        assert np.array_equal(np.asarray(flattened), np.asarray(by_hand))


def test_inpainting_keeps_the_pixels_outside_the_mask(pipe, digit):
    mask = box_mask(digit.size, (0, 0, 16, SIZE))  # repaint the left half
    kept = pipe(PROMPT, image=digit, mask=mask, strength=0.9, mask_blur=0, **FAST)[0]
    raw = pipe(PROMPT, image=digit, mask=mask, strength=0.9, mask_blur=0, paste_back=False, **FAST)[0]
    outside = levels(raw, digit)[:, 16:]
    print(f"without paste-back the unmasked half moves by up to {outside.max()}/255 (mean {outside.mean():.1f})")
    assert outside.max() > 20  # the defect: latents are kept, but decoding them does not give back the pixels
    assert levels(kept, digit)[:, 16:].max() == 0
    assert np.array_equal(np.asarray(kept)[:, :16], np.asarray(raw)[:, :16])  # inside: the generated pixels
    assert levels(kept, digit)[:, :16].mean() > 5


@pytest.mark.parametrize("blur", [1.5, 4])
def test_paste_back_blends_by_the_blurred_mask_doubled(pipe, digit, blur):
    """AUTOMATIC1111's overlay: the generated image's weight is twice the blurred mask, clipped to 1."""
    mask = box_mask(digit.size, (6, 10, 20, 26))
    common = dict(image=digit, mask=mask, strength=0.9, mask_blur=blur, **FAST)
    out, raw = pipe(PROMPT, **common)[0], pipe(PROMPT, paste_back=False, **common)[0]
    weight = np.clip(2 * np.rint(reference_blur(mask, blur)) / 255, 0, 1)
    expected = np.asarray(raw, dtype=float) * weight + np.asarray(digit, dtype=float) * (1 - weight)
    error = np.abs(np.asarray(out, dtype=float) - expected)
    assert error.max() <= 2.5  # rounding the output, and a float blur vs one rounded per axis: 2/255 of weight
    assert np.array_equal(np.asarray(out)[weight == 0], np.asarray(digit)[weight == 0])
    assert (weight == 0).sum() > 90 and ((weight > 0) & (weight < 1)).sum() > 50


# -- the image operations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 2, 4, 7.5])
def test_blur_mask_is_a_gaussian_with_mirrored_borders(sigma):
    rng = np.random.default_rng(0)
    mask = Image.fromarray((rng.random((20, 37)) > 0.7).astype(np.uint8) * 255)
    ours = np.asarray(ops.blur_mask(mask, sigma), dtype=float)
    assert np.abs(ours - reference_blur(mask, sigma)).max() <= 1  # rounded after each axis
    assert ops.blur_mask(mask, 0) is mask


def test_resize_modes_as_automatic1111():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 64 wide, 48 high
    lanczos = Image.Resampling.LANCZOS
    assert np.array_equal(ops.resize_image(image, 32, 32), image.resize((32, 32), lanczos))
    # crop: cover 32x32 keeping the aspect (42x32), then the centre 32 columns (from 42 // 2 - 16 = 5)
    assert np.array_equal(ops.resize_image(image, 32, 32, "crop"), image.resize((42, 32), lanczos).crop((5, 0, 37, 32)))
    # fill: fit (32x24) in the middle, the 4 rows above and below stretched from its edge rows; columns of one
    # value each make the stretched rows equal to the edge rows
    stripes = Image.fromarray(np.tile(rng.integers(0, 256, (1, 64, 3), dtype=np.uint8), (48, 1, 1)))
    fitted = np.asarray(stripes.resize((32, 24), lanczos))
    filled = np.asarray(ops.resize_image(stripes, 32, 32, "fill"))
    assert np.array_equal(filled[4:28], fitted)
    assert np.array_equal(filled[:4], np.repeat(fitted[:1], 4, 0))
    assert np.array_equal(filled[28:], np.repeat(fitted[-1:], 4, 0))
    tall = image.transpose(Image.Transpose.TRANSPOSE)  # 48 wide, 64 high: margins left and right
    filled = np.asarray(ops.resize_image(tall, 32, 32, "fill"))
    assert np.array_equal(filled[:, 4:28], np.asarray(tall.resize((24, 32), lanczos)))


@pytest.mark.parametrize(
    "box, pad, size",
    [((40, 8, 52, 20), 4, (32, 32)), ((40, 8, 52, 20), 0, (64, 32)), ((2, 30, 60, 34), 32, (32, 32)),
     ((60, 0, 64, 64), 8, (32, 64)), ((0, 0, 3, 5), 1, (48, 32))],
)  # fmt: skip
def test_crop_region_matches_diffusers_padding_mask_crop(box, pad, size):
    mask = box_mask((64, 64), box)
    assert ops.crop_region(mask, pad, *size) == VaeImageProcessor.get_crop_region(mask, *size, pad=pad)
    assert ops.crop_region(Image.new("L", (8, 8)), pad, *size) is None


def test_fill_paints_the_masked_area_with_the_surrounding_colours():
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    array[:, :16] = 200  # unmasked: one grey; masked: noise
    mask = box_mask((32, 32), (16, 0, 32, 32))
    filled = np.asarray(ops.fill_masked(Image.fromarray(array), mask), dtype=int)
    assert np.array_equal(filled[:, :16], array[:, :16])
    assert np.abs(filled[:, 16:] - 200).max() <= 3  # each of the 11 premultiplied composites rounds


def test_mask_from_an_alpha_channel_and_flattening():
    sketch = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    sketch.paste((255, 0, 0, 200), (2, 2, 6, 6))  # a stroke on a transparent layer: repaint where it is opaque
    assert np.array_equal(np.asarray(ops.mask_from_image(sketch)), np.asarray(box_mask((8, 8), (2, 2, 6, 6))))
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert np.array_equal(np.asarray(ops.mask_from_image(opaque)), np.full((8, 8), 255))
    assert ops.to_channels(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), 1).getpixel((0, 0)) == 255  # onto white
    with pytest.raises(ValueError, match=r"^channels=4 is not allowed; a VAE takes 1"):
        ops.to_channels(opaque, 4)


# -- resize modes, masked content and "only masked" through the pipeline -------------------------------------------


def start_state(pipe, monkeypatch, **kwargs) -> torch.Tensor:
    """The state the sampler starts from."""
    seen = []
    sample = pipe._sample
    monkeypatch.setattr(pipe, "_sample", lambda d, x, *a, **k: seen.append(x) or sample(d, x, *a, **k))
    pipe(PROMPT, **kwargs)
    monkeypatch.undo()
    return seen[0]


def image_latents_and_noise(pipe, image: Image.Image, seed: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A call's posterior sample of ``image`` and its initial noise, drawn in that order from its generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0 = pipe._encode(ops.to_tensor(image), [generator])
    return z0, randn_like(torch.empty(shape), [generator])


def test_latent_resize_encodes_the_image_at_its_size_and_interpolates_the_latents(pipe, digit, monkeypatch):
    big = digit.resize((64, 48), Image.Resampling.BICUBIC)
    kwargs = dict(image=big, width=SIZE, height=SIZE, strength=0.5, **FAST)
    x = start_state(pipe, monkeypatch, resize_mode="latent", **kwargs)
    z0, noise = image_latents_and_noise(pipe, big, FAST["seed"], (1, 4, 8, 8))
    assert z0.shape[-2:] == (12, 16)
    sigma = pipe._grid(resolve_request(pipe, Request(PROMPT, **kwargs)))[1][0]
    assert torch.allclose(x, F.interpolate(z0, size=(8, 8), mode="bilinear") + sigma * noise, atol=1e-5)
    latent = pipe(PROMPT, resize_mode="latent", **kwargs)[0]
    assert latent.size == (SIZE, SIZE) and levels(latent, pipe(PROMPT, **kwargs)[0]).max() > 0


@pytest.mark.parametrize("mode", ["crop", "fill"])
def test_resize_modes_reach_the_pipeline(pipe, digit, mode):
    wide = digit.resize((64, 48), Image.Resampling.BICUBIC)
    out = pipe(PROMPT, image=wide, width=SIZE, height=SIZE, resize_mode=mode, strength=0.5, **FAST)[0]
    by_hand = pipe(PROMPT, image=ops.resize_image(wide, SIZE, SIZE, mode), strength=0.5, **FAST)[0]
    assert np.array_equal(np.asarray(out), np.asarray(by_hand))
    assert "Resize mode: " + {"crop": "Crop and resize", "fill": "Resize and fill"}[mode] in out.info["parameters"]


@pytest.mark.parametrize("fill", ["original", "latent_noise", "latent_nothing"])
def test_latent_masked_content(pipe, digit, monkeypatch, fill):
    mask = box_mask(digit.size, (0, 0, 16, SIZE))
    kwargs = dict(image=digit, mask=mask, mask_blur=0, inpainting_fill=fill, strength=0.7, **FAST)
    x = start_state(pipe, monkeypatch, **kwargs)
    z0, noise = image_latents_and_noise(pipe, digit, FAST["seed"], (1, 4, 8, 8))
    sigma = pipe._grid(resolve_request(pipe, Request(PROMPT, image=digit, strength=0.7, **FAST)))[1][0]
    under = {"original": z0, "latent_noise": noise, "latent_nothing": torch.zeros_like(z0)}[fill]
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4] = 1
    assert torch.allclose(x, z0 * (1 - m) + under * m + sigma * noise, atol=1e-5)


def test_fill_masked_content_starts_from_the_filled_image(pipe, digit):
    mask = box_mask(digit.size, (4, 4, 20, 28))
    out = pipe(PROMPT, image=digit, mask=mask, inpainting_fill="fill", paste_back=False, strength=0.7, **FAST)[0]
    blurred = ops.blur_mask(mask, 4)
    by_hand = pipe(PROMPT, image=ops.fill_masked(digit, blurred), mask=blurred, mask_blur=0, paste_back=False,
                   strength=0.7, **FAST)[0]  # fmt: skip
    assert np.array_equal(np.asarray(out), np.asarray(by_hand))
    assert "Masked content: fill" in out.info["parameters"]


def test_only_masked_inpaints_the_box_at_full_size_and_pastes_it_back(pipe, digit):
    """AUTOMATIC1111's "only masked" (diffusers' padding_mask_crop): the mask's box plus padding, grown to the
    processing aspect, is inpainted at width x height, scaled back into the box and blended by the blurred mask."""
    canvas = digit.resize((64, 64), Image.Resampling.BICUBIC)
    mask = box_mask(canvas.size, (40, 8, 52, 20))
    common = dict(strength=0.8, width=SIZE, height=SIZE, **FAST)
    out = pipe(PROMPT, image=canvas, mask=mask, inpaint_full_res=True, inpaint_full_res_padding=4, **common)[0]
    blurred = ops.blur_mask(mask, 4)
    box = ops.crop_region(blurred, 4, SIZE, SIZE)
    assert box == VaeImageProcessor.get_crop_region(blurred, SIZE, SIZE, pad=4)
    crop = pipe(PROMPT, image=canvas.crop(box), mask=blurred.crop(box), mask_blur=0, resize_mode="fill",
                paste_back=False, **common)[0]  # fmt: skip
    x1, y1, x2, y2 = box
    pasted = canvas.copy()
    pasted.paste(crop.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), box[:2])
    weight = np.asarray(blurred, dtype=float) / 255
    expected = np.rint(np.asarray(pasted, dtype=float) * weight + np.asarray(canvas, dtype=float) * (1 - weight))
    assert out.size == canvas.size and np.array_equal(np.asarray(out), expected)
    assert levels(out, canvas)[y1:y2, x1:x2].max() > 10 and np.count_nonzero(levels(out, canvas)) < 30 * 30
    raw = pipe(PROMPT, image=canvas, mask=mask, inpaint_full_res=True, inpaint_full_res_padding=4,
               paste_back=False, **common)[0]  # fmt: skip
    assert np.array_equal(np.asarray(raw), np.asarray(pasted))  # without paste-back: the box replaced
    params = parse_parameters(out.info["parameters"])
    assert (params["inpaint_full_res"], params["inpaint_full_res_padding"], params["mask_blur"]) == (True, 4, 4)


def test_inverted_mask_repaints_the_black_part(pipe, digit):
    mask = box_mask(digit.size, (0, 0, 16, SIZE))
    out = pipe(PROMPT, image=digit, mask=mask, mask_invert=True, mask_blur=0, strength=0.9, **FAST)[0]
    by_hand = pipe(PROMPT, image=digit, mask=box_mask(digit.size, (16, 0, SIZE, SIZE)), mask_blur=0, strength=0.9,
                   **FAST)[0]  # fmt: skip
    assert np.array_equal(np.asarray(out), np.asarray(by_hand))
    assert "Mask mode: Inpaint not masked" in out.info["parameters"]


# -- errors, parameters, CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resize_mode="stretch", image="IMAGE"), r"resize_mode='stretch' is not allowed; allowed: resize, crop"),
        (dict(resize_mode="crop"), r"resize_mode='crop' is not allowed; it applies to a image, and none is given"),
        (dict(mask_blur=-1, image="IMAGE", mask="MASK"), r"mask_blur=-1 is not allowed; expected a number >= 0"),
        (dict(mask_blur=2, image="IMAGE"), r"mask_blur=2 is not allowed; it applies to a mask"),
        (dict(inpainting_fill="noise", image="IMAGE", mask="MASK"), r"inpainting_fill='noise' .*latent_noise"),
        (dict(paste_back=False, image="IMAGE"), r"paste_back=False is not allowed; it applies to a mask"),
        (dict(paste_back=0, image="IMAGE", mask="MASK"), r"paste_back=0 is not allowed; expected True or False"),
        (dict(inpaint_full_res=True, image="IMAGE"), r"inpaint_full_res=True .* applies to a mask"),
        (dict(inpaint_full_res_padding=-2, image="IMAGE", mask="MASK"), r"inpaint_full_res_padding=-2"),
        (dict(inpaint_full_res_padding=8, image="IMAGE", mask="MASK"),
         r"inpaint_full_res_padding=8 is not allowed; it pads the box of inpaint_full_res=True, which is not set"),
        (dict(inpaint_full_res=True, image="IMAGE", mask="EMPTY"), r"inpaint_full_res=True .*the mask is empty"),
        (dict(image="BIG", width=SIZE, height=SIZE, mask="BIG_MASK", resize_mode="latent"),
         r"resize_mode='latent' .*a latent resize applies without a mask"),
        (dict(image="ODD", width=SIZE, height=SIZE, resize_mode="latent"),
         r"resize_mode=.*applies to an image whose sides are multiples of 4"),
    ],
)  # fmt: skip
def test_bad_image_settings_name_the_field(pipe, kwargs, message):
    files = {"IMAGE": Image.new("L", (SIZE, SIZE), 9), "MASK": Image.new("L", (SIZE, SIZE), 255),
             "EMPTY": Image.new("L", (SIZE, SIZE), 0), "BIG": Image.new("L", (64, 64)),
             "BIG_MASK": Image.new("L", (64, 64), 255), "ODD": Image.new("L", (62, 64))}  # fmt: skip
    kwargs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=f"^{message}"):
        pipe(PROMPT, steps=2, **kwargs)


def test_defaults_need_no_image_and_requests_with_different_masks_share_a_pass(pipe, digit):
    pipe(PROMPT, steps=1, mask_blur=4, paste_back=True, inpainting_fill="original", resize_mode="resize")
    left, right = box_mask(digit.size, (0, 0, 16, SIZE)), box_mask(digit.size, (16, 0, SIZE, SIZE))
    requests = [
        Request(PROMPT, image=digit, mask=left, inpainting_fill="latent_noise", **FAST),
        Request(PROMPT, image=digit, mask=right, mask_blur=1, inpaint_full_res=True, num_images=2, **FAST),
    ]
    together = pipe.generate(requests)  # fmt: skip
    for request, images in zip(requests, together, strict=True):
        for got, want in zip(images, pipe.generate([request])[0], strict=True):
            assert got.info["parameters"] == want.info["parameters"]
            assert levels(got, want).max() <= 1


def test_png_parameters_record_the_inpainting_settings_and_the_cli_reproduces_them(pipe, digit, tmp_path, capsys):
    mask = box_mask(digit.size, (4, 4, 20, 28))
    digit.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    settings = dict(image=tmp_path / "init.png", mask=tmp_path / "mask.png", strength=0.75, mask_blur=2.5,
                    mask_invert=True, inpainting_fill="latent_nothing", paste_back=False, **FAST)  # fmt: skip
    out = pipe(PROMPT, **settings)[0]
    text = out.info["parameters"]
    for field in ("Denoising strength: 0.75", "Mask blur: 2.5", "Mask mode: Inpaint not masked",
                  "Masked content: latent nothing", "Paste back: no"):  # fmt: skip
        assert field in text
    kwargs, _ = call_arguments(parse_parameters(text))
    assert {k: kwargs[k] for k in ("mask_blur", "mask_invert", "inpainting_fill", "paste_back")} == {
        "mask_blur": 2.5, "mask_invert": True, "inpainting_fill": "latent_nothing", "paste_back": False}  # fmt: skip
    save_png(out, tmp_path / "made.png")
    status, stdout, err = run_cli(cli.main, capsys, "generate", "--from-png", tmp_path / "made.png", "--init-image",
                                  tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--no-safety", "-o",
                                  tmp_path / "again")  # fmt: skip
    assert status == 0, err
    again = Image.open(stdout.split()[-1])
    assert np.array_equal(np.asarray(again), np.asarray(out))
    assert read_png_parameters(stdout.split()[-1])["inpainting_fill"] == "latent_nothing"
    status, stdout, err = run_cli(cli.main, capsys, "generate", PROMPT, "--init-image", tmp_path / "init.png",
                                  "--mask", tmp_path / "mask.png", "--mask-blur", "2.5", "--invert-mask",
                                  "--inpainting-fill", "latent_nothing", "--no-paste-back", "--strength", "0.75",
                                  "--steps", "3", "--sampler", "euler", "--seed", "11", "--no-safety", "-o",
                                  tmp_path / "flags")  # fmt: skip
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(stdout.split()[-1])), np.asarray(out))
    status, _, err = run_cli(cli.main, capsys, "generate", PROMPT, "--inpaint-full-res", "--no-safety", "-o",
                             tmp_path / "bad")  # fmt: skip
    assert status == 2 and re.search(r"argument --inpaint-full-res: inpaint_full_res=True is not allowed", err)
