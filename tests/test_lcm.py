"""Guidance-embedded U-Nets and the lcm sampler: parity with diffusers' UNet2DConditionModel (time_cond_proj_dim),
LCMScheduler and LatentConsistencyModelPipeline on tiny random models, and the pipeline's one-call guidance."""

import math

import diffusers
import numpy as np
import pytest
import torch
from helpers import SD_SCHEDULE, SIZE, randomize, tiny_components

from unnoise import Pipeline
from unnoise.core.denoisers import EDMDenoiser, VPDenoiser
from unnoise.core.samplers import consistency_scalings, lcm_timesteps, sample
from unnoise.core.schedules import VPSchedule, karras_sigmas
from unnoise.models import load_diffusers
from unnoise.models.unet import UNet, UNetConfig, guidance_scale_embedding
from unnoise.pipeline.pipeline import grid_for

PROMPT = "a red cat"
W_DIM = 8  # the tiny U-Net's time_cond_proj_dim


def tiny_lcm_unet() -> diffusers.UNet2DConditionModel:
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, time_cond_proj_dim=W_DIM,
    ).eval()  # fmt: skip
    randomize(unet, seed=11)
    return unet


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """(diffusers LatentConsistencyModelPipeline, its saved folder) on tiny random components."""
    components = tiny_components(tmp_path_factory.mktemp("tokenizer"))
    components["unet"] = tiny_lcm_unet()
    theirs = diffusers.LatentConsistencyModelPipeline(
        **components, scheduler=diffusers.LCMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("lcm")
    theirs.save_pretrained(folder)
    return theirs, folder


# -- the U-Net option ---------------------------------------------------------------------------------------------


def test_guidance_embedding_is_diffusers(lcm):
    theirs, _ = lcm
    w = torch.tensor([0.0, 2.5, 7.0, 14.0])
    for dim in (W_DIM, 9, 256):
        expected = theirs.get_guidance_scale_embedding(w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), expected), dim
    with pytest.raises(ValueError, match=r"w has shape \(2, 1\)"):
        guidance_scale_embedding(w[:2, None], 8)


def test_unet_with_time_cond_proj_dim_matches_diffusers(lcm):
    theirs, folder = lcm
    ours = load_diffusers(folder / "unet").eval()
    assert ours.config.time_cond_proj_dim == W_DIM
    assert "time_embedding.cond_proj.weight" in ours.state_dict()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    w = guidance_scale_embedding(torch.tensor([2.0, 6.5]), W_DIM)
    t = torch.tensor([999, 259])
    with torch.no_grad():
        expected = theirs.unet(x, t, encoder_hidden_states=context, timestep_cond=w).sample
        got = ours(x, t, encoder_hidden_states=context, timestep_cond=w)
        plain = ours(x, t, encoder_hidden_states=context)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (got - plain).abs().max() > 1e-2  # the embedding reaches the output
    with pytest.raises(ValueError, match=r"timestep_cond has shape \(2, 7\); expected \(2, 8\)"):
        ours(x, t, encoder_hidden_states=context, timestep_cond=torch.zeros(2, 7))


def test_a_unet_without_the_option_refuses_a_guidance_embedding():
    unet = UNet(UNetConfig(block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                           mid_block_type=None, norm_num_groups=8, in_channels=4, out_channels=4))  # fmt: skip
    with pytest.raises(ValueError, match=r"timestep_cond has shape \(1, 8\); expected None: .*time_cond_proj_dim"):
        unet(torch.zeros(1, 4, 8, 8), 10, timestep_cond=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="time_cond_proj_dim=0"):
        UNetConfig(time_cond_proj_dim=0)


# -- the sampler --------------------------------------------------------------------------------------------------


def toy_model(x, t):
    """A smooth nonlinear stand-in for an epsilon network whose output depends on x and the timestep."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    s = (t / 1000).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return torch.tanh(0.7 * x + s) * (0.6 + 0.3 * torch.cos(3 * s)) + 0.2 * x.roll(1, dims=1) * s


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_lcm_sampler_matches_lcm_scheduler_step(steps):
    scheduler = diffusers.LCMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(3)
    x_vp = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    theirs_noise, ours_noise = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = x_vp
    for t in scheduler.timesteps:
        x, denoised = scheduler.step(toy_model(x, t), t, x, generator=theirs_noise, return_dict=False)
    schedule = VPSchedule(scheduler.alphas_cumprod.double())
    sigmas = grid_for_schedule(schedule, steps)
    torch.testing.assert_close(schedule.sigma_to_t(sigmas[:-1]), scheduler.timesteps.double(), rtol=0, atol=1e-6)
    start = x_vp * math.sqrt(1 + sigmas[0].item() ** 2)
    got = sample(VPDenoiser(toy_model, schedule), start, sigmas, "lcm", generator=ours_noise)
    assert (got - denoised).abs().max() <= 1e-5 * denoised.abs().max()


def grid_for_schedule(schedule, steps):
    return torch.cat([schedule.t_to_sigma(lcm_timesteps(steps)), torch.zeros(1, dtype=torch.float64)])


def test_consistency_scalings_are_lcm_schedulers():
    scheduler = diffusers.LCMScheduler(**SD_SCHEDULE)
    for t in (0, 19, 259, 999):
        c_skip, c_out = consistency_scalings(t)
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t, dtype=torch.float64))
        assert (float(c_skip), float(c_out)) == pytest.approx([float(v) for v in theirs], rel=1e-12, abs=1e-15)
    assert consistency_scalings(0) == (1.0, 0.0)  # the boundary condition: the identity at t = 0


def test_lcm_timesteps_errors_name_the_steps():
    with pytest.raises(ValueError, match="steps=51 .*lcm sampler; allowed: 1 to 50"):
        lcm_timesteps(51)
    with pytest.raises(ValueError, match="steps=0"):
        lcm_timesteps(0)


def test_without_a_vp_schedule_the_lcm_step_is_the_denoised_estimate_renoised():
    """EDM and flow networks have no discrete timestep: c_skip = 0 and c_out = 1 (the t -> infinity limit)."""
    sigmas = karras_sigmas(3, 0.1, 10.0)
    net = lambda x, c_noise: torch.tanh(x) * c_noise.reshape(-1, 1)  # noqa: E731
    denoiser = EDMDenoiser(net)
    x = torch.linspace(-2, 2, 6, dtype=torch.float64).reshape(2, 3) * 10
    g, expected = torch.Generator().manual_seed(1), x
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        expected = denoiser(expected, sigma)
        if sigma_next > 0:
            expected = expected + torch.randn(expected.shape, generator=g, dtype=torch.float64) * sigma_next
    got = sample(denoiser, x, sigmas, "lcm", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# -- the pipeline -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, guidance", [(4, 8.5), (2, 3.0)])
def test_pipeline_matches_diffusers_latent_consistency_pipeline(lcm, steps, guidance):
    theirs, folder = lcm
    ours = Pipeline.from_pretrained(folder)
    assert ours.guidance_embedded and ours.config.sampling.sampler == "lcm" and ours.config.sampling.steps == 4
    latents = torch.randn(2, 4, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(7))
    generators = [torch.Generator().manual_seed(30 + i) for i in range(2)]
    with torch.no_grad():
        expected = theirs(
            PROMPT, num_images_per_prompt=2, num_inference_steps=steps, guidance_scale=guidance, height=SIZE,
            width=SIZE, latents=latents, generator=generators, output_type="np",
        ).images  # fmt: skip
    calls = []
    forward = ours.unet.forward
    ours.unet.forward = lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k)
    try:
        images = ours(PROMPT, num_images=2, steps=steps, guidance_scale=guidance, seed=30, latents=latents)
    finally:
        del ours.unet.forward
    got = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
    assert expected.std() > 0.05
    assert np.abs(got - expected).max() <= 2 / 255
    assert calls == [2] * steps  # one call per step at the images' batch: no unconditional half


def test_a_guidance_embedded_model_refuses_what_needs_an_unconditional_pass(lcm):
    ours = Pipeline.from_pretrained(lcm[1])
    with pytest.raises(ValueError, match="negative_prompt='blue' is not allowed; this model takes the guidance"):
        ours(PROMPT, negative_prompt="blue", steps=1)
    with pytest.raises(ValueError, match="guidance_rescale=0.5 is not allowed"):
        ours(PROMPT, guidance_rescale=0.5, steps=1)
    with pytest.raises(ValueError, match=r"guidance_interval=\(0.1, 1.0\) is not allowed"):
        ours(PROMPT, guidance_interval=(0.1, 1.0), steps=1)
    assert len(ours(PROMPT, negative_prompt="", steps=1)) == 1


def test_the_lcm_grid_replaces_the_spacing(lcm):
    ours = Pipeline.from_pretrained(lcm[1])
    schedule, sigmas = grid_for(ours.config, "lcm", 4, "trailing")
    torch.testing.assert_close(schedule.sigma_to_t(sigmas[:-1]), lcm_timesteps(4), rtol=0, atol=1e-6)
    assert sigmas[-1] == 0
    _, trailing = grid_for(ours.config, "euler", 4, "trailing")
    assert not torch.equal(trailing, sigmas)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_lcm_is_exact_in_distribution_with_the_ideal_consistency_function(steps):
    """For N(0, S^2) data the ODE maps x at sigma to x S / sqrt(S^2 + sigma^2): a model that returns it makes every
    lcm step land on the true marginal N(0, S^2 + sigma_next^2), whatever the grid. (With the posterior mean, the
    ideal denoiser, consistency sampling keeps only about half the variance: it needs a consistency model.)"""
    s = 0.5
    origin = lambda x, sigma: x * s / (s**2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2).sqrt()  # noqa: E731
    g = torch.Generator().manual_seed(2)
    sigmas = karras_sigmas(steps, 0.05, 80.0)
    x = torch.randn(20000, 1, generator=g, dtype=torch.float64) * math.sqrt(s**2 + 80.0**2)
    out = sample(origin, x, sigmas, "lcm", generator=g)
    assert abs(out.var().item() - s**2) < 0.015  # 20000 samples: std error of the variance about 0.0025
