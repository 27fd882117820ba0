"""Hires fix (AUTOMATIC1111's enable_hr) on the embedded model: the second pass equals text-to-image, upscale and
img2img done by hand with the same seeds, for every upscaler; target sizes and crops as AUTOMATIC1111 computes
them; progress and cancellation over both passes; batches; PNG parameters and the CLI."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import decoded_latents, randomize, run_cli
from PIL import Image

from unnoise import cli
from unnoise.models.unet import UNet, UNetConfig
from unnoise.pipeline import UPSCALERS, GenerationCancelled, Hires, Pipeline, Request
from unnoise.pipeline.hires import crop_box, target_size
from unnoise.pipeline.png import call_arguments, parse_parameters, save_png

PROMPT = "a handwritten 5"
FAST = dict(steps=3, sampler="euler", seed=21)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def first_pass_latents(pipe, monkeypatch, **kwargs) -> torch.Tensor:
    """The latents a text-to-image call decodes."""
    return decoded_latents(pipe, monkeypatch, PROMPT, **kwargs)


def img2img_from_latents(pipe, monkeypatch, latents: torch.Tensor, **kwargs) -> list[Image.Image]:
    """img2img whose start latents are ``latents`` instead of a posterior sample of the image (nothing drawn for
    them): what AUTOMATIC1111's second pass does with latent upscalers."""
    monkeypatch.setattr(pipe, "_init_latents", lambda req, generators, shape: latents)
    size = latents.shape[-1] * pipe.vae_factor, latents.shape[-2] * pipe.vae_factor
    images = pipe(PROMPT, image=Image.new("L", size), **kwargs)
    monkeypatch.undo()
    return images


@pytest.mark.parametrize("name", [n for n, u in UPSCALERS.items() if u.mode is not None])
def test_latent_upscalers_equal_interpolate_then_img2img_by_hand(pipe, monkeypatch, name):
    upscaler = UPSCALERS[name]
    hires = Hires(scale=2, upscaler=name, steps=4, strength=0.5)
    out = pipe(PROMPT, hires=hires, **FAST)[0]
    low = first_pass_latents(pipe, monkeypatch, **FAST)
    antialias = {"antialias": True} if upscaler.antialias else {}
    up = F.interpolate(low, size=(16, 16), mode=upscaler.mode, **antialias)
    # AUTOMATIC1111 runs the hires steps, 4, at the end of a grid of int(4 / 0.5) = 8
    by_hand = img2img_from_latents(pipe, monkeypatch, up, strength=0.5, **{**FAST, "steps": 8})[0]
    assert out.size == (64, 64) and np.array_equal(np.asarray(out), np.asarray(by_hand))


@pytest.mark.parametrize("name", ["lanczos", "nearest"])
def test_pixel_upscalers_equal_txt2img_resize_img2img_through_the_public_api(pipe, name):
    out = pipe(PROMPT, hires=Hires(scale=1.5, upscaler=name, strength=0.6), **FAST)[0]  # 32 -> 48
    low = pipe(PROMPT, **FAST)[0]
    up = low.resize((48, 48), UPSCALERS[name].resample)
    assert int(3 / 0.6) == 5 and int(5 * 0.6) == 3  # the first pass's 3 steps, at the end of a grid of 5
    by_hand = pipe(PROMPT, image=up, strength=0.6, **{**FAST, "steps": 5})[0]
    assert out.size == (48, 48) and np.array_equal(np.asarray(out), np.asarray(by_hand))


def test_an_inpainting_unet_gets_its_channels_at_both_sizes(pipe):
    """A 9-channel U-Net in text-to-image sees a gray image, all repainted, in both passes (AUTOMATIC1111's
    txt2img_image_conditioning at the upscaled size)."""
    latent = pipe.vae.config.latent_channels
    unet = UNet(UNetConfig.from_dict({**pipe.unet.config.to_dict(), "in_channels": 2 * latent + 1})).eval()
    randomize(unet, seed=4)
    inpainting = Pipeline(unet, pipe.vae, pipe.text_encoder, pipe.config)
    shapes = []
    unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    out = inpainting(PROMPT, hires=Hires(steps=2, strength=0.5), **FAST)[0]
    assert out.size == (64, 64)
    assert shapes == [(2, 9, 8, 8)] * 3 + [(2, 9, 16, 16)] * 2


def test_hires_sizes_as_automatic1111():
    # hr_resize_x/y: one side keeps the aspect ratio; both: cover them, then crop the centre in latent pixels
    assert target_size(Hires(scale=1.75), 64, 32) == ((112, 56), (112, 56))
    assert target_size(Hires(width=96), 64, 32) == ((96, 48), (96, 48))
    assert target_size(Hires(height=96), 64, 32) == ((192, 96), (192, 96))
    assert target_size(Hires(width=64, height=64), 64, 32) == ((128, 64), (64, 64))  # wider: height rules
    assert target_size(Hires(width=128, height=32), 32, 32) == ((128, 128), (128, 32))
    assert crop_box((128, 64), (64, 64), 8) == (32, 0, 96, 64)  # truncate_x = 8 latent pixels, 4 each side
    assert crop_box((128, 64), (72, 64), 8) == (24, 0, 96, 64)  # truncate_x = 7: 3 left, 4 right


def test_hires_width_and_height_crop_the_upscaled_latents(pipe, monkeypatch):
    hires = Hires(width=64, height=32, strength=0.5)  # 32x32 -> cover 64x64, keep the middle 64x32
    out = pipe(PROMPT, hires=hires, **FAST)[0]
    up = F.interpolate(first_pass_latents(pipe, monkeypatch, **FAST), size=(16, 16), mode="bilinear")
    by_hand = img2img_from_latents(pipe, monkeypatch, up[:, :, 4:12], strength=0.5, **{**FAST, "steps": 6})[0]
    assert out.size == (64, 32) and np.array_equal(np.asarray(out), np.asarray(by_hand))
    assert "Hires resize: 64x32" in out.info["parameters"]


def test_progress_covers_both_passes_and_cancels_in_the_second(pipe):
    seen = []
    hires = Hires(steps=4, strength=0.5)  # 3 steps, then 4 (of a grid of 8)
    pipe(PROMPT, hires=hires, callback=lambda i, total, *_: seen.append((i, total)), **FAST)
    assert seen == [(i, 7) for i in range(7)]
    with pytest.raises(GenerationCancelled) as cancelled:
        pipe(PROMPT, hires=hires, callback=lambda i, *_: i == 5, **FAST)
    assert (cancelled.value.step, cancelled.value.total) == (5, 7)


def test_batched_hires_requests_equal_each_alone(pipe):
    hires = Hires(scale=1.5, upscaler="latent-bicubic", strength=0.7)
    requests = [Request(PROMPT, num_images=2, hires=hires, **FAST), Request("a handwritten 1", hires=hires, steps=3,
                sampler="euler", seed=5)]  # fmt: skip
    together = pipe.generate(requests)
    for request, images in zip(requests, together, strict=True):
        for got, want in zip(images, pipe.generate([request])[0], strict=True):
            assert got.info["parameters"] == want.info["parameters"]
            assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
    other = Request(PROMPT, hires=Hires(scale=2), **FAST)
    with pytest.raises(ValueError, match=r"^requests\[1\]\.hires=HiresPlan\(.* requests generated together share"):
        pipe.generate([requests[0], other])


@pytest.mark.parametrize(
    "hires, message",
    [
        (Hires(upscaler="ESRGAN"), r"hires.upscaler='ESRGAN' is not allowed; allowed: latent, latent-antialiased"),
        (Hires(scale=0.5), r"hires.scale=0.5 is not allowed; expected a number >= 1"),
        (Hires(strength=0), r"hires.strength=0 is not allowed; expected a number in \(0, 1\]"),
        (Hires(steps=20, strength=0.01), r"hires.strength=0.01 .*int\(20 / strength\) = 2000 steps, more than .* 1000"),
        (Hires(steps=-1), r"hires.steps=-1 is not allowed"),
        (Hires(width=-8), r"hires.width=-8 is not allowed"),
        (Hires(scale=1.3), r"hires=Hires\(.*\) is not allowed; its size \(32x32 -> 41x41, .*multiple of 8"),
        ({"scale": 2}, r"hires=\{'scale': 2\} is not allowed; expected an unnoise.pipeline.Hires"),
    ],
)
def test_bad_hires_settings_name_the_field(pipe, hires, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        pipe(PROMPT, hires=hires, steps=2)


def test_hires_refuses_an_init_image(pipe):
    with pytest.raises(ValueError, match=r"^hires=Hires\(.*\) is not allowed; the hires fix applies to text-to-image"):
        pipe(PROMPT, image=Image.new("L", (32, 32)), hires=Hires(), steps=2)


def test_png_parameters_as_automatic1111_and_the_cli_reproduces_them(pipe, tmp_path, capsys):
    hires = Hires(scale=2, upscaler="lanczos", steps=2, strength=0.5)
    out = pipe(PROMPT, hires=hires, **FAST)[0]
    text = out.info["parameters"]
    assert "Size: 32x32" in text and "Denoising strength: 0.5" in text
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Lanczos" in text
    kwargs, _ = call_arguments(parse_parameters(text))
    assert kwargs["hires"] == hires and "strength" not in kwargs
    a1111 = "a cat\nSteps: 20, Size: 32x48, Denoising strength: 0.4, Hires resize: 96x0, Hires upscaler: None"
    assert call_arguments(parse_parameters(a1111))[0]["hires"] == Hires(upscaler="lanczos", strength=0.4, width=96)
    save_png(out, tmp_path / "made.png")
    status, stdout, err = run_cli(cli.main, capsys, "generate", "--from-png", tmp_path / "made.png", "--no-safety",
                                  "-o", tmp_path / "again")  # fmt: skip
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(stdout.split()[-1])), np.asarray(out))
    flags = ["--hires-scale", "2", "--hires-upscaler", "lanczos", "--hires-steps", "2", "--hires-strength", "0.5"]
    status, stdout, err = run_cli(cli.main, capsys, "generate", PROMPT, *flags, "--steps", "3", "--sampler", "euler",
                                  "--seed", "21", "--no-safety", "-o", tmp_path / "flags")  # fmt: skip
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(stdout.split()[-1])), np.asarray(out))
