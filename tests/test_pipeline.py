"""Text-to-image pipeline: parity with diffusers' StableDiffusionPipeline on a tiny random model, seeds, PNG
parameters, img2img and inpainting, cancellation, input errors, our folder format, scheduler-config translation."""

import json
import re
import warnings

import diffusers
import numpy as np
import pytest
import torch
from helpers import (  # noqa: F401
    SD_SCHEDULE,
    SD_SCHEDULER,
    SIZE,
    decoded_latents,
    randomize,
    tiny_components,
    tiny_tokenizer,
)
from PIL import Image

from unnoise import Pipeline
from unnoise.core.denoisers import VPDenoiser
from unnoise.models.text import MiniLMEncoder, PromptTruncatedWarning
from unnoise.models.unet import UNet, UNetConfig
from unnoise.pipeline import (
    GenerationCancelled,
    PipelineConfig,
    Request,
    SamplingConfig,
    ScheduleConfig,
    TextEncoderConfig,
    sampling_grid,
    translate_scheduler,
)
from unnoise.pipeline.png import call_arguments, parse_parameters, read_png_parameters, save_png

PROMPT, NEGATIVE = "a red cat", "blue dog"
SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(**SD_SCHEDULER),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
    # diffusers starts Euler's linspace/trailing grids from sigma_max, we from sqrt(sigma_max**2 + 1): measured 0.6/255
    "euler_linspace": lambda: diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace"),
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, steps_offset=1),
}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """{case: (diffusers StableDiffusionPipeline, its saved folder)} for each scheduler case."""
    components = tiny_components(tmp_path_factory.mktemp("tokenizer"))
    out = {}
    for case, scheduler in SCHEDULERS.items():
        theirs = diffusers.StableDiffusionPipeline(
            **components, scheduler=scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        theirs.set_progress_bar_config(disable=True)
        folder = tmp_path_factory.mktemp(case)
        theirs.save_pretrained(folder)
        out[case] = (theirs, folder)
    return out


@pytest.fixture(scope="module")
def pipe(sd):
    """Ours, from the DDIM folder (SD 1.x scheduler config)."""
    return Pipeline.from_pretrained(sd["ddim"][1])


@pytest.fixture(scope="module")
def euler_pipe(sd):
    """Ours, from the Euler folder: the grid ends at sigma 0."""
    return Pipeline.from_pretrained(sd["euler"][1])


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.float64) / 255 for img in images])


def unit_latents(n: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 4, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(seed))


# -- 1. parity with diffusers (acceptance) ---------------------------------------------------------------------


@pytest.mark.parametrize("case, rescale", [(case, 0.0) for case in sorted(SCHEDULERS)] + [("ddim", 0.7)])
def test_images_match_diffusers(sd, case, rescale):
    theirs, folder = sd[case]
    ours = Pipeline.from_pretrained(folder)
    latents = unit_latents(2)
    kwargs = dict(negative_prompt=NEGATIVE, guidance_scale=6.0, height=SIZE, width=SIZE, latents=latents)
    kwargs["guidance_rescale"] = rescale
    with torch.no_grad():
        expected = theirs(PROMPT, num_images_per_prompt=2, num_inference_steps=8, output_type="np", **kwargs).images
    got = pixels(ours(PROMPT, num_images=2, steps=8, seed=0, **kwargs))
    assert expected.std() > 0.1 and 0.05 < (expected > 0.5).mean() < 0.95  # a real image, not saturated
    error = np.abs(got - expected).max()
    print(f"{case}: max abs pixel difference {error * 255:.3f}/255")
    assert error <= 2 / 255


# -- 2. seeds ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde"])
def test_image_i_of_a_batch_is_the_single_image_with_seed_plus_i(euler_pipe, sampler):
    batch = euler_pipe(PROMPT, num_images=4, seed=40, steps=5, sampler=sampler)
    for i, img in enumerate(batch):
        alone = euler_pipe(PROMPT, seed=40 + i, steps=5, sampler=sampler)[0]
        levels = np.abs(np.asarray(img, dtype=int) - np.asarray(alone, dtype=int))
        assert levels.max() <= 1  # float rounding may differ by batch size: at most one 8-bit level
        assert parse_parameters(img.info["parameters"])["seed"] == 40 + i
    assert not np.array_equal(pixels(batch[:1]), pixels(batch[1:2]))


def test_random_seed_is_recorded(euler_pipe):
    img = euler_pipe(PROMPT, steps=2)[0]
    seed = parse_parameters(img.info["parameters"])["seed"]
    assert np.array_equal(pixels([img]), pixels(euler_pipe(PROMPT, steps=2, seed=seed)))


# -- 3. PNG parameters -----------------------------------------------------------------------------------------------


def test_png_parameters_round_trip_and_reproduce(euler_pipe, tmp_path):
    settings = dict(
        prompt="a cat, b: c", negative_prompt=NEGATIVE, steps=6, sampler="dpmpp_2m", guidance_scale=5.5,
        seed=123, width=SIZE, height=SIZE * 2, spacing="karras", guidance_rescale=0.3, guidance_interval=(0.5, 20.0),
    )  # fmt: skip
    img = euler_pipe(**settings)[0]
    save_png(img, tmp_path / "out.png")
    parsed = read_png_parameters(tmp_path / "out.png")
    assert {k: parsed[k] for k in settings} == settings
    assert parsed["model_hash"] == euler_pipe.model_hash and len(parsed["model_hash"]) == 10
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 123, Size: 32x64" in img.info["parameters"]
    kwargs, pos = call_arguments(parsed)
    assert (kwargs, pos) == (settings, 0)
    again = euler_pipe(**kwargs)[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "out.png")))


def test_png_of_an_image_from_a_batch_regenerates_bit_exactly(euler_pipe, tmp_path):
    batch = euler_pipe(PROMPT, num_images=3, seed=70, steps=3, sampler="euler_a", image=input_image(), strength=0.7)
    save_png(batch[2], tmp_path / "b.png")
    parsed = read_png_parameters(tmp_path / "b.png")
    assert (parsed["seed"], parsed["batch_size"], parsed["batch_pos"], parsed["strength"]) == (72, 3, 2, 0.7)
    kwargs, pos = call_arguments(parsed)
    assert (kwargs["seed"], kwargs["num_images"], pos) == (70, 3, 2)
    again = euler_pipe(**kwargs, image=input_image())[pos]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "b.png")))


def test_parse_automatic1111_text():
    text = (
        "masterpiece, a cat <lora:a:0.8>\nsecond line <lora:b:1>\nNegative prompt: blurry, ugly\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        'Model hash: 0123456789, Model: sd15, Denoising strength: 0.6, Lora hashes: "a: 1, b: 2", Version: v1.9'
    )
    p = parse_parameters(text)
    assert p["prompt"] == "masterpiece, a cat\nsecond line" and p["negative_prompt"] == "blurry, ugly"
    assert (p["steps"], p["sampler"], p["spacing"], p["guidance_scale"], p["seed"]) == (
        20,
        "euler_a",
        "karras",
        7.0,
        42,
    )
    assert (p["width"], p["height"], p["model_hash"], p["model"], p["strength"]) == (
        512,
        768,
        "0123456789",
        "sd15",
        0.6,
    )
    assert p["extra"] == {"Version": "v1.9"}
    assert p["loras"] == {"a": 0.8, "b": 1.0} and p["lora_hashes"] == {"a": "1", "b": "2"}
    assert parse_parameters("just a prompt")["prompt"] == "just a prompt"
    with pytest.raises(ValueError, match="Steps"):
        parse_parameters("p\nSteps: many, Sampler: Euler, Seed: 1")


# -- 4. img2img and inpainting -------------------------------------------------------------------------------------


def input_image(seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), mode="RGB")


def final_latents(pipe, monkeypatch, **kwargs) -> torch.Tensor:
    """The latents a call decodes."""
    return decoded_latents(pipe, monkeypatch, PROMPT, **kwargs)


def image_latents(pipe, image: Image.Image, seed: int) -> torch.Tensor:
    """The image's latents as a call with ``seed`` draws them (its generator's first draw)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        return pipe._encode(x, [torch.Generator().manual_seed(seed)])


def test_img2img_strength(euler_pipe, monkeypatch):
    image, seed = input_image(), 5
    z0 = image_latents(euler_pipe, image, seed)
    steps = []
    full = euler_pipe(PROMPT, image=image, strength=1.0, steps=10, seed=seed, callback=lambda i, *_: steps.append(i))
    assert full[0].size == (SIZE, SIZE) and steps == list(range(10))
    far = (final_latents(euler_pipe, monkeypatch, image=image, strength=1.0, steps=10, seed=seed) - z0).abs().mean()
    near = (final_latents(euler_pipe, monkeypatch, image=image, strength=0.1, steps=10, seed=seed) - z0).abs().mean()
    assert near < 0.05 * far and near < 0.5 * z0.abs().mean()  # one step from sigma 0.03 (t = 1)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "unipc"])
def test_inpainting_keeps_the_unmasked_latents(euler_pipe, monkeypatch, sampler):
    image, seed = input_image(), 9
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 255  # repaint the left half
    z0 = image_latents(euler_pipe, image, seed)
    x = final_latents(
        euler_pipe, monkeypatch, image=image, mask=Image.fromarray(mask), strength=0.9, steps=6, seed=seed,
        sampler=sampler,
    )  # fmt: skip
    half = SIZE // 8
    assert torch.allclose(x[..., half:], z0[..., half:], atol=1e-5)
    assert (x[..., :half] - z0[..., :half]).abs().mean() > 0.05


def test_inpainting_unet_gets_mask_and_masked_image_channels(pipe):
    config = UNetConfig.from_dict({**pipe.unet.config.to_dict(), "in_channels": 9})
    unet = UNet(config).eval()
    randomize(unet, seed=4)
    inpaint = Pipeline(unet, pipe.vae, pipe.text_encoder, pipe.config)
    shapes = []
    unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[:2])))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    images = inpaint(PROMPT, image=input_image(), mask=mask, steps=4, seed=1, guidance_scale=3.0)
    assert shapes == [(2, 9)] * 3 and images[0].size == (SIZE, SIZE)  # int(4 * 0.8) steps, CFG-batched
    inpaint(PROMPT, steps=2, seed=1)  # txt2img with an inpainting model: gray image, all repainted
    assert shapes[3:] == [(2, 9)] * 2


def test_generate_runs_requests_of_every_kind_as_each_alone(euler_pipe, pipe):
    """One sampler pass over several requests gives each request's images as alone (<= one 8-bit level) with the
    same parameters: txt2img with its own prompts, negatives, counts, seeds and given noise; img2img; inpainting
    through KnownRegion; an inpainting U-Net."""
    left, right = Image.new("L", (SIZE, SIZE), 0), Image.new("L", (SIZE, SIZE), 0)
    left.paste(255, (0, 0, SIZE // 2, SIZE))
    right.paste(255, (SIZE // 2, 0, SIZE, SIZE))
    config = UNetConfig.from_dict({**pipe.unet.config.to_dict(), "in_channels": 9})
    unet = UNet(config).eval()
    randomize(unet, seed=4)
    inpainting_unet = Pipeline(unet, pipe.vae, pipe.text_encoder, pipe.config)
    common = dict(steps=4, sampler="euler_a", guidance_scale=4.0)
    cases = [
        (euler_pipe, [Request(PROMPT, num_images=2, seed=3, **common),
                      Request("a green bird", negative_prompt=NEGATIVE, seed=40, **common),
                      Request(PROMPT, negative_prompt=NEGATIVE, num_images=2, latents=unit_latents(2), seed=0,
                              **common)]),
        (euler_pipe, [Request(PROMPT, image=input_image(1), strength=0.6, seed=5, **common),
                      Request("a green bird", image=input_image(2), strength=0.6, num_images=2, seed=8, **common)]),
        (euler_pipe, [Request(PROMPT, image=input_image(1), mask=left, seed=5, **common),
                      Request(PROMPT, image=input_image(2), mask=right, num_images=2, seed=6, **common)]),
        (inpainting_unet, [Request(PROMPT, image=input_image(1), mask=left, seed=5, **common),
                           Request(PROMPT, image=input_image(2), mask=right, seed=6, **common)]),
    ]  # fmt: skip
    for model, requests in cases:
        together = model.generate(requests)
        for request, images in zip(requests, together, strict=True):
            alone = model.generate([request])[0]
            assert len(images) == len(alone) == request.num_images
            for got, want in zip(images, alone, strict=True):
                assert got.info["parameters"] == want.info["parameters"]
                assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def test_generate_refuses_requests_that_cannot_share_a_pass(euler_pipe):
    a = Request(PROMPT, steps=3, seed=1)
    others = [(Request(PROMPT, steps=4), "steps=4"), (Request(PROMPT, steps=3, guidance_scale=2.0),
              "guidance_scale=2.0"), (Request(PROMPT, steps=3, image=input_image()), "image=True")]  # fmt: skip
    for other, field in others:
        with pytest.raises(ValueError, match=rf"^requests\[1\]\.{re.escape(field)} is not allowed; requests generated"):
            euler_pipe.generate([a, other])
    with pytest.raises(ValueError, match=r"^requests=\[\] is not allowed"):
        euler_pipe.generate([])
    with pytest.raises(TypeError, match="expected an unnoise.pipeline.Request, got dict"):
        euler_pipe.generate([{"prompt": PROMPT}])
    with pytest.raises(TypeError, match=r"unknown settings \['num_inference_steps'\]; allowed: negative_prompt"):
        euler_pipe(PROMPT, num_inference_steps=3)


# -- 5. progress and cancellation -----------------------------------------------------------------------------------


def test_callback_sees_every_step_and_can_cancel(euler_pipe):
    seen = []

    def record(step, total, sigma, preview):
        seen.append((step, total, sigma, tuple(preview.shape)))

    euler_pipe(PROMPT, steps=4, seed=0, num_images=2, callback=record)
    assert [s[:2] for s in seen] == [(i, 4) for i in range(4)] and seen[0][3] == (2, 4, SIZE // 4, SIZE // 4)
    assert all(a[2] > b[2] for a, b in zip(seen, seen[1:]))
    steps = []
    with pytest.raises(GenerationCancelled) as info:
        euler_pipe(PROMPT, steps=6, seed=0, callback=lambda step, *_: steps.append(step) or step == 2)
    assert steps == [0, 1, 2] and (info.value.step, info.value.total) == (2, 6)


def test_guidance_scale_one_runs_the_conditional_branch_alone(euler_pipe):
    batches = []
    handle = euler_pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        euler_pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=1.0, num_images=2, steps=2, seed=0)
        euler_pipe(PROMPT, guidance_scale=2.0, num_images=2, steps=2, seed=0)
    finally:
        handle.remove()
    assert batches == [2, 2, 4, 4]


def test_long_prompt_is_truncated_with_a_warning_when_the_prompt_language_is_off(euler_pipe):
    # with the language on (the default) a long prompt is encoded in windows (tests/test_prompts.py)
    with pytest.warns(PromptTruncatedWarning, match="dropped"):
        euler_pipe("abcdefghijklmnopqrstuvwxyz", steps=1, seed=0, prompt_syntax=False)


# -- 6. input errors --------------------------------------------------------------------------------------------------


BAD = [
    (dict(height=36), "height=36.*multiple of 8"),
    (dict(width=0), "width=0"),
    (dict(steps=0), "steps=0"),
    (dict(steps=1001), "steps=1001.*1000"),
    (dict(sampler="plms"), "sampler='plms'.*euler_a"),
    (dict(spacing="cosine"), "spacing='cosine'"),
    (dict(num_images=0), "num_images=0"),
    (dict(strength=0.0, image="IMAGE"), "strength=0.0"),
    (dict(strength=1.5), r"strength=1.5.*\(0, 1\]"),
    (dict(strength=0.05, image="IMAGE", steps=10), "strength=0.05.*0 steps"),
    (dict(image="NOT_AN_IMAGE"), "image=.*not a readable image"),
    (dict(image="IMAGE", mask="SMALL_MASK"), "mask=.*16x16 differs from the image's 32x32"),
    (dict(mask="SMALL_MASK"), "mask=.*needs an image"),
    (dict(image="ODD_IMAGE"), "image=.*20x20 is not a multiple of 8"),
    (dict(latents=torch.zeros(1, 4, 8, 4)), r"latents=tensor of shape \(1, 4, 8, 4\).*\(1, 4, 8, 8\)"),
    (dict(num_images=2, latents=torch.zeros(1, 4, 8, 8)), r"latents=.*\(2, 4, 8, 8\)"),
    (dict(guidance_rescale=2), "guidance_rescale=2"),
    (dict(guidance_interval=(5, 1)), "guidance_interval"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=2**63 - 1, num_images=2), r"seed=9223372036854775807 .*2\*\*63 - num_images"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m.split("=")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_names_the_argument(euler_pipe, tmp_path, kwargs, match):
    names = {"IMAGE": "in.png", "NOT_AN_IMAGE": "notes.txt", "SMALL_MASK": "m.png", "ODD_IMAGE": "odd.png"}
    files = {key: tmp_path / name for key, name in names.items()}
    input_image().save(files["IMAGE"])
    Image.new("RGB", (20, 20)).save(files["ODD_IMAGE"])
    files["NOT_AN_IMAGE"].write_text("not an image")
    Image.new("L", (16, 16)).save(files["SMALL_MASK"])
    kwargs = {k: files.get(v, v) if isinstance(v, str) and k in ("image", "mask") else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        euler_pipe(PROMPT, **{"steps": 2, **kwargs})


# -- 7. our folder format ----------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "pipeline.json").read_text())
    assert config["text_encoder"]["kind"] == "clip" and config["sampling"]["final"] == "sigma_min"
    loaded = Pipeline.from_pretrained(tmp_path / "ours")
    assert loaded.config == pipe.config
    kwargs = dict(negative_prompt=NEGATIVE, steps=4, seed=11, num_images=2, sampler="euler_a")
    assert np.array_equal(pixels(pipe(PROMPT, **kwargs)), pixels(loaded(PROMPT, **kwargs)))
    in_memory = Pipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.config)
    assert in_memory.model_hash == loaded.model_hash  # the hash of the weights file save_pretrained wrote


def test_minilm_pipeline_round_trip(pipe, tmp_path):
    """Our format with the bundled MiniLM encoder (the embedded default model's layout)."""
    encoder = MiniLMEncoder.from_package(max_length=8)
    unet = UNet(UNetConfig.from_dict({**pipe.unet.config.to_dict(), "cross_attention_dim": encoder.dim})).eval()
    randomize(unet, seed=6)
    config = PipelineConfig(text_encoder=TextEncoderConfig(kind="minilm", max_length=8))
    ours = Pipeline(unet, pipe.vae, encoder, config)
    ours.save_pretrained(tmp_path / "mini")
    assert not (tmp_path / "mini" / "text_encoder").exists()
    loaded = Pipeline.from_pretrained(tmp_path / "mini")
    assert loaded.text_encoder.max_length == 8
    assert np.array_equal(pixels(ours("a seven", steps=3, seed=2)), pixels(loaded("a seven", steps=3, seed=2)))


# -- scheduler-config translation ----------------------------------------------------------------------------------


GRID_CASES = {
    "euler_linspace": ("EulerDiscreteScheduler", {}, "euler"),
    "euler_karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), "euler"),
    "euler_karras_leading": (
        "EulerDiscreteScheduler",
        dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1),
        "euler",
    ),
    "heun_karras_trailing": (
        "HeunDiscreteScheduler",
        dict(use_karras_sigmas=True, timestep_spacing="trailing"),
        "heun",
    ),
    "euler_a_trailing": ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing"), "euler_a"),
    "heun_leading": ("HeunDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1), "heun"),
    "dpm_leading": ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading", steps_offset=1), "dpmpp_2m"),
    "dpm_sde_karras": (
        "DPMSolverMultistepScheduler",
        dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
        "dpmpp_2m_sde",
    ),
    "unipc_linspace": ("UniPCMultistepScheduler", dict(final_sigmas_type="sigma_min"), "unipc"),
    "lms_linspace": ("LMSDiscreteScheduler", {}, "dpmpp_2m"),
    "dpm_exponential": ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True), "dpmpp_2m"),
}


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_scheduler_config_gives_diffusers_grid_and_timesteps(case):
    name, extra, sampler = GRID_CASES[case]
    theirs = getattr(diffusers, name)(**SD_SCHEDULE, prediction_type="v_prediction", **extra)
    schedule, prediction, sampling = translate_scheduler(dict(theirs.config, _class_name=name))
    assert (prediction, sampling.sampler) == ("v_prediction", sampler)
    steps = 7
    vp, sigmas = sampling_grid(schedule, sampling, steps)
    theirs.set_timesteps(steps)
    expected, timesteps = theirs.sigmas.double(), theirs.timesteps.double()
    if name == "HeunDiscreteScheduler":  # diffusers repeats every sigma but the first and last for the second stage
        expected, timesteps = torch.cat([expected[:1], expected[1::2]]), timesteps[::2]
    torch.testing.assert_close(sigmas, expected, rtol=2e-5, atol=0)
    denoiser = VPDenoiser(None, vp, prediction, quantize=sampling.quantize and sampling.spacing == "karras")
    # DPMSolverMultistep truncates exponential-grid timesteps to integers (998.99 -> 998); we keep them exact
    atol = 1.0 if case == "dpm_exponential" else 2e-3
    torch.testing.assert_close(denoiser.noise_input(sigmas[:-1]), timesteps, rtol=0, atol=atol)


def test_ddim_and_pndm_configs():
    schedule, prediction, sampling = translate_scheduler(dict(SD_SCHEDULER, _class_name="DDIMScheduler"))
    assert (sampling.sampler, sampling.spacing, sampling.steps_offset, sampling.final) == (
        "ddim",
        "leading",
        1,
        "sigma_min",
    )
    sd15 = dict(SD_SCHEDULER, _class_name="PNDMScheduler", skip_prk_steps=True, trained_betas=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SD 1.5's config holds nothing we cannot apply
        _, _, sampling = translate_scheduler(sd15)
    assert (sampling.sampler, sampling.spacing, sampling.final, sampling.extra_point) == (
        "dpmpp_2m", "leading", "sigma_min", False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, option",
    [
        ("DDIMScheduler", dict(clip_sample=True)),
        ("DDPMScheduler", dict(thresholding=True, clip_sample=False)),
        ("DDPMScheduler", dict(variance_type="learned_range", clip_sample=False)),
        ("DPMSolverMultistepScheduler", dict(solver_order=3)),
        ("UniPCMultistepScheduler", dict(solver_type="bh1")),
        ("EulerDiscreteScheduler", dict(interpolation_type="log_linear")),
        ("DDIMScheduler", dict(timestep_spacing="linspace", clip_sample=False)),
        ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min")),
    ],
)
def test_unhonoured_options_warn_naming_them(name, option):
    key, value = next((k, v) for k, v in option.items() if k != "clip_sample" or len(option) == 1)
    with pytest.warns(UserWarning, match=f"{key}={value!r}.* applied"):
        translate_scheduler(dict(option, _class_name=name))


def test_pipeline_config_json_round_trip_and_errors():
    config = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="clip", clip_skip=1),
        prediction="v_prediction",
        schedule=ScheduleConfig(beta_schedule="linear", trained_betas=(0.1, 0.2, 0.3), interpolation="linear"),
        sampling=SamplingConfig(sampler="unipc", steps=9, spacing="trailing", final="sigma_min", quantize=True),
    )
    assert PipelineConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown keys"):
        PipelineConfig.from_dict({"prediction": "epsilon", "scheduler": {}})
    with pytest.raises(ValueError, match="sampling.sampler='plms'"):
        PipelineConfig.from_dict({"sampling": {"sampler": "plms"}})
    with pytest.raises(ValueError, match="text_encoder.kind='t5'"):
        PipelineConfig.from_dict({"text_encoder": {"kind": "t5"}})
    sized = PipelineConfig(sizes=[[32, 32], (64, 32)])
    assert sized.sizes == ((32, 32), (64, 32)) and sized.to_dict()["sizes"] == [[32, 32], [64, 32]]
    assert PipelineConfig.from_dict(json.loads(json.dumps(sized.to_dict()))) == sized
    assert PipelineConfig.from_dict({}).sizes is None
    for bad in ([], [[32]], [[32, 0]], [[32.0, 32]], "32x32"):
        with pytest.raises(ValueError, match=r"^sizes=.* is not allowed; expected a non-empty list of \[width"):
            PipelineConfig(sizes=bad)


def test_unsupported_scheduler_configs_raise():
    with pytest.raises(ValueError, match="_class_name='FlowMatchEulerDiscreteScheduler'"):
        translate_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="use_flow_sigmas=True"):
        translate_scheduler({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True})
