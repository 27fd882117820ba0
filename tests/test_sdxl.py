"""SDXL through the one Pipeline: two text encoders, size and crop conditioning, the refiner's aesthetic score,
zeroed negatives, against diffusers' StableDiffusionXL(Img2Img|Inpaint)Pipeline on tiny random models."""

import diffusers
import numpy as np
import pytest
import torch
from helpers import SD_SCHEDULE, randomize, tiny_tokenizer
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from unnoise import Pipeline
from unnoise.models.text import DualCLIPTextEncoder
from unnoise.pipeline import Request
from unnoise.pipeline.png import parse_parameters

PROMPT, NEGATIVE = "a red cat", "blue dog"
TIME_DIM = 8  # addition_time_embed_dim of the tiny U-Nets
STEPS = 6


def text_config(tokenizer, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=24, hidden_act="gelu",
    )  # fmt: skip


def tiny_unet(context: int, pooled: int, ids: int, in_channels: int = 4) -> diffusers.UNet2DConditionModel:
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=context, attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=pooled + ids * TIME_DIM,
    ).eval()  # fmt: skip


def tiny_vae() -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=32, scaling_factor=0.13025, force_upcast=True,
    ).eval()  # fmt: skip


def scheduler() -> diffusers.EulerDiscreteScheduler:
    return diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (diffusers pipeline, its saved folder)}: SDXL base, base with an inpainting U-Net, and a refiner."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    first = CLIPTextModel(text_config(tokenizer, 32)).eval()
    second = CLIPTextModelWithProjection(text_config(tokenizer, 48)).eval()
    modules = {
        "first": first, "second": second, "vae": tiny_vae(), "base": tiny_unet(80, 24, 6),
        "inpaint": tiny_unet(80, 24, 6, in_channels=9), "refiner": tiny_unet(48, 24, 5),
    }  # fmt: skip
    for i, module in enumerate(modules.values()):
        randomize(module, seed=10 + i, smooth=isinstance(module, diffusers.AutoencoderKL))
    common = dict(vae=modules["vae"], text_encoder_2=second, tokenizer_2=tokenizer, scheduler=scheduler())
    base = dict(common, text_encoder=first, tokenizer=tokenizer)
    pipes = {
        "base": diffusers.StableDiffusionXLPipeline(**base, unet=modules["base"], add_watermarker=False),
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline(
            **base, unet=modules["inpaint"], add_watermarker=False, force_zeros_for_empty_prompt=False
        ),
        "refiner": diffusers.StableDiffusionXLImg2ImgPipeline(
            **common, text_encoder=None, tokenizer=None, unet=modules["refiner"], requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False,
        ),
    }  # fmt: skip
    out = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        folder = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(folder)
        out[name] = (pipe, folder)
    out["img2img"] = (diffusers.StableDiffusionXLImg2ImgPipeline(**base, unet=modules["base"]), out["base"][1])
    out["img2img"][0].set_progress_bar_config(disable=True)
    return out


@pytest.fixture(scope="module")
def ours(models):
    return {name: Pipeline.from_pretrained(folder) for name, (_, folder) in models.items() if name != "img2img"}


def latents(height: int, width: int, n: int = 1, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 4, height // 4, width // 4, generator=torch.Generator().manual_seed(seed))


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.float64) / 255 for img in images])


def assert_match(expected: np.ndarray, got: np.ndarray, what: str) -> None:
    assert expected.std() > 0.05 and 0.02 < (expected > 0.5).mean() < 0.98, f"{what}: not a real image"
    error = np.abs(got - expected).max()
    print(f"{what}: max abs pixel difference {error * 255:.3f}/255")
    assert error <= 2 / 255, what


def input_image(height: int, width: int) -> Image.Image:
    g = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + 60 * np.sin(x / 3.0)], -1)
    rgb = rgb + g.normal(0, 10, (height, width, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def test_loads_as_sdxl(ours):
    base = ours["base"]
    assert isinstance(base.text_encoder, DualCLIPTextEncoder) and base.text_encoder.dim == 80
    assert base.config.text_encoder.kind == "sdxl" and base.config.text_encoder.force_zeros_for_empty_prompt
    assert base.time_id_count == 6 and ours["refiner"].time_id_count == 5
    assert ours["refiner"].text_encoder.first is None and ours["refiner"].text_encoder.dim == 48
    assert not ours["inpaint"].config.text_encoder.force_zeros_for_empty_prompt


@pytest.mark.parametrize(
    "size, negative, micro",
    [
        ((32, 32), NEGATIVE, {}),
        ((32, 48), None, {}),  # no negative prompt: zeroed unconditional embeddings (force_zeros_for_empty_prompt)
        ((32, 32), NEGATIVE, dict(original_size=(96, 64), crops_coords_top_left=(8, 4), target_size=(64, 64))),
    ],
    ids=["negative", "zeros-32x48", "micro-conditioning"],
)
def test_txt2img_matches_diffusers(models, ours, size, negative, micro):
    theirs = models["base"][0]
    h, w = size
    x = latents(h, w, 2)
    with torch.no_grad():
        expected = theirs(
            PROMPT, negative_prompt=negative, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=5.0,
            height=h, width=w, latents=x, output_type="np", **micro,
        ).images  # fmt: skip
    got = pixels(ours["base"](PROMPT, negative_prompt=negative, num_images=2, steps=STEPS, sampler="euler",
                              guidance_scale=5.0, height=h, width=w, latents=x, seed=0, **micro))  # fmt: skip
    assert_match(expected, got, f"txt2img {size} {micro}")


def test_micro_conditioning_changes_the_image(ours):
    settings = dict(steps=STEPS, seed=1, guidance_scale=5.0)
    plain = pixels(ours["base"](PROMPT, **settings))
    cropped = pixels(ours["base"](PROMPT, crops_coords_top_left=(16, 16), **settings))
    assert np.abs(plain - cropped).max() > 4 / 255


@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_img2img_matches_diffusers(models, ours, size):
    theirs = models["img2img"][0]
    image = input_image(*size)
    micro = dict(original_size=(64, 64), target_size=(32, 32))
    with torch.no_grad():
        expected = theirs(
            PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(5)], output_type="np", **micro,
        ).images  # fmt: skip
    got = pixels(ours["base"](PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, steps=STEPS,
                              sampler="euler", guidance_scale=5.0, seed=5, **micro))  # fmt: skip
    assert_match(expected, got, f"img2img {size}")


def test_refiner_with_aesthetic_score_matches_diffusers(models, ours):
    theirs = models["refiner"][0]
    image = input_image(32, 32)
    with torch.no_grad():
        expected = theirs(
            PROMPT, image=image, strength=0.5, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0,
            aesthetic_score=7.5, negative_aesthetic_score=2.0, generator=[torch.Generator().manual_seed(9)],
            output_type="np",
        ).images  # fmt: skip
    got = pixels(ours["refiner"](PROMPT, image=image, strength=0.5, negative_prompt=NEGATIVE, steps=STEPS,
                                 sampler="euler", guidance_scale=5.0, seed=9, aesthetic_score=7.5,
                                 negative_aesthetic_score=2.0))  # fmt: skip
    assert_match(expected, got, "refiner")


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_inpainting_unet_matches_diffusers(models, ours, size):
    theirs = models["inpaint"][0]
    h, w = size
    image, mask = input_image(h, w), Image.new("L", (w, h), 0)
    mask.paste(255, (8, 8, 24, 28))
    with torch.no_grad():
        expected = theirs(
            PROMPT, image=image, mask_image=mask, strength=1.0, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            guidance_scale=5.0, height=h, width=w, generator=[torch.Generator().manual_seed(4)], output_type="np",
            crops_coords_top_left=(4, 0),
        ).images  # fmt: skip
    # diffusers neither blurs the mask nor pastes the original back (AUTOMATIC1111's defaults, and ours)
    got = pixels(ours["inpaint"](PROMPT, image=image, mask=mask, strength=1.0, negative_prompt=NEGATIVE,
                                 steps=STEPS, sampler="euler", guidance_scale=5.0, seed=4,
                                 crops_coords_top_left=(4, 0), mask_blur=0, paste_back=False))  # fmt: skip
    assert_match(expected, got, f"inpainting U-Net {size}")


def test_only_masked_inpainting_matches_diffusers_padding_mask_crop(models, ours):
    """AUTOMATIC1111's "only masked" is diffusers' padding_mask_crop: the same box, crop, resize and fill, overlay
    (diffusers blurs no mask: mask_blur=0). Measured: bit-exact."""
    theirs = models["inpaint"][0]
    image, mask = input_image(64, 48), Image.new("L", (48, 64), 0)
    mask.paste(255, (30, 8, 40, 20))
    with torch.no_grad():
        expected = theirs(
            PROMPT, image=image, mask_image=mask, strength=1.0, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            guidance_scale=5.0, height=32, width=32, generator=[torch.Generator().manual_seed(4)], output_type="pil",
            padding_mask_crop=4,
        ).images  # fmt: skip
    got = ours["inpaint"](PROMPT, image=image, mask=mask, strength=1.0, negative_prompt=NEGATIVE, steps=STEPS,
                          sampler="euler", guidance_scale=5.0, seed=4, width=32, height=32, mask_blur=0,
                          inpaint_full_res=True, inpaint_full_res_padding=4)  # fmt: skip
    assert got[0].size == (48, 64)
    assert np.array_equal(np.asarray(got[0]), np.asarray(expected[0]))
    assert not np.array_equal(np.asarray(got[0]), np.asarray(image))


def test_batched_requests_keep_their_own_conditioning(ours):
    base = ours["base"]
    settings = dict(steps=STEPS, guidance_scale=5.0)
    a = Request(PROMPT, seed=3, original_size=(80, 80), **settings)
    b = Request(NEGATIVE, seed=4, negative_prompt="x", crops_coords_top_left=(8, 8), **settings)
    together = base.generate([a, b])
    for request, images in zip((a, b), together, strict=True):
        alone = base.generate([request])[0]
        assert np.abs(pixels(images) - pixels(alone)).max() <= 1 / 255


def test_micro_conditioning_errors_name_the_field(ours):
    with pytest.raises(ValueError, match=r"original_size=\(1, 2, 3\) is not allowed"):
        ours["base"](PROMPT, steps=1, original_size=(1, 2, 3))
    with pytest.raises(ValueError, match="aesthetic_score=7.0 is not allowed; this model takes a target size"):
        ours["base"](PROMPT, steps=1, aesthetic_score=7.0)
    with pytest.raises(ValueError, match=r"target_size=\(32, 32\) is not allowed; this model \(a refiner\)"):
        ours["refiner"](PROMPT, steps=2, image=input_image(32, 32), target_size=(32, 32))
    sd = Pipeline.from_pretrained("default")
    with pytest.raises(ValueError, match="crops_coords_top_left=.* has no size conditioning"):
        sd("7", steps=1, crops_coords_top_left=(0, 0))


def test_save_pretrained_round_trip(ours, tmp_path):
    for name in ("base", "refiner"):
        ours[name].save_pretrained(tmp_path / name)
        again = Pipeline.from_pretrained(tmp_path / name)
        settings = dict(steps=2, seed=0, sampler="euler")
        image = input_image(32, 32) if name == "refiner" else None
        first = pixels(ours[name](PROMPT, image=image, **settings) if image else ours[name](PROMPT, **settings))
        second = pixels(again(PROMPT, image=image, **settings) if image else again(PROMPT, **settings))
        assert np.array_equal(first, second), name


def test_png_parameters_carry_the_micro_conditioning(ours):
    from unnoise.pipeline.png import call_arguments

    micro = dict(original_size=(96, 64), crops_coords_top_left=(8, 4), target_size=(64, 64))
    image = ours["base"](PROMPT, steps=2, seed=0, sampler="euler", **micro)[0]
    kwargs, _ = call_arguments(parse_parameters(image.info["parameters"]))
    assert {k: kwargs[k] for k in micro} == micro
    assert np.array_equal(pixels([image]), pixels(ours["base"](**kwargs)))
    plain = parse_parameters(ours["base"](PROMPT, steps=1, seed=0)[0].info["parameters"])
    assert not set(micro) & set(plain)  # defaults are not written
    refined = ours["refiner"](PROMPT, steps=2, seed=0, image=input_image(32, 32), aesthetic_score=7.0)[0]
    kwargs, _ = call_arguments(parse_parameters(refined.info["parameters"]))
    assert (kwargs["aesthetic_score"], kwargs["negative_aesthetic_score"]) == (7.0, 2.5)


def test_the_serving_planner_counts_both_text_towers(ours):
    from unnoise.serve.vram import VramPlanner, module_bytes

    base = ours["base"]
    planner = VramPlanner(base, budget=2**40, max_batch=4)
    towers = module_bytes(base.text_encoder.first) + module_bytes(base.text_encoder.second)
    assert planner.weights >= module_bytes(base.unet, base.vae) + towers
    assert planner.max_batch(32, 32) == 4 and planner.estimate(2, 32, 32).peak > planner.weights
