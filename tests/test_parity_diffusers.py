"""Parity with diffusers' schedulers: same model function, same grid, same result (float64, rel. error 1e-5).

diffusers runs its own loop (``scale_model_input``, model call, ``step``) in VP or sigma scaling; ours runs the
matching sampler over ``schedule.sigmas_for(...)`` in sigma scaling. Both start from the same state.
"""

import math

import diffusers
import pytest
import torch

from unnoise.core.denoisers import VPDenoiser
from unnoise.core.samplers import sample
from unnoise.core.schedules import VPSchedule

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (2, 3, 4, 4)
RTOL = 1e-5


def toy_model(x, t):
    """A smooth nonlinear network stand-in whose output depends on x and on the (fractional) timestep."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    s = (t / 1000).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return torch.tanh(0.7 * x + s) * (0.6 + 0.3 * torch.cos(3 * s)) + 0.2 * x.roll(1, dims=1) * s


def noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_diffusers(scheduler, steps, x, generator=None, variance_noise=None, **step_kwargs):
    """diffusers' standard denoising loop from state ``x`` (in the scheduler's own scaling).

    ``variance_noise``, a generator, injects per step the float64 noise that our samplers draw from it.
    """
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = toy_model(scheduler.scale_model_input(x, t), t)
        kwargs = dict(step_kwargs)
        if generator is not None:
            kwargs["generator"] = generator
        if variance_noise is not None:
            kwargs["variance_noise"] = torch.randn(x.shape, generator=variance_noise, dtype=torch.float64)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def ours(scheduler, method, sigmas, x_sigma, prediction, *, interpolation="log", quantize=False, **kwargs):
    schedule = VPSchedule(scheduler.alphas_cumprod.double(), interpolation=interpolation)
    denoiser = VPDenoiser(toy_model, schedule, prediction, quantize=quantize)
    return sample(denoiser, x_sigma, sigmas, method, **kwargs)


def schedule_of(scheduler, interpolation="log"):
    return VPSchedule(scheduler.alphas_cumprod.double(), interpolation=interpolation)


def assert_close(actual, expected, rtol=RTOL):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err < rtol, f"relative error {err:.3e} >= {rtol}"


def vp_to_sigma(x_vp, sigma):
    return x_vp * math.sqrt(1 + sigma**2)


PREDICTIONS = ["epsilon", "v_prediction"]


# -- DDIM (eta 0): exact where diffusers' arithmetic prev_timestep is right ---------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    "spacing, steps, steps_offset, set_alpha_to_one",
    [
        ("leading", 10, 0, True),
        ("leading", 7, 0, True),
        ("leading", 25, 1, False),  # Stable Diffusion's scheduler config
        ("leading", 10, 0, False),  # ends at t=0 then takes a zero-length step to alphas_cumprod[0]
        ("trailing", 10, 0, True),
        ("trailing", 4, 0, False),
    ],
)
def test_ddim_matches_diffusers(prediction, spacing, steps, steps_offset, set_alpha_to_one):
    sched = diffusers.DDIMScheduler(
        **SD_BETAS,
        clip_sample=False,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
    )
    final = "zero" if set_alpha_to_one else "sigma_min"
    sigmas = schedule_of(sched).sigmas_for(steps, spacing, steps_offset=steps_offset, final=final)
    x = noise()
    expected = run_diffusers(sched, steps, x.clone(), eta=0.0)
    got = ours(sched, "ddim", sigmas, vp_to_sigma(x, sigmas[0].item()), prediction)
    assert_close(got / math.sqrt(1 + sigmas[-1].item() ** 2), expected)


def test_ddim_trailing_documents_diffusers_prev_timestep_bug():
    """7 steps do not divide 1000: diffusers' DDIM steps to t - 142, off the trailing grid; we follow the grid.

    Our DDIM (eta 0) is Euler on the same grid, and equals diffusers' own Euler scheduler there.
    """
    kwargs = dict(**SD_BETAS, prediction_type="epsilon", timestep_spacing="trailing")
    ddim = diffusers.DDIMScheduler(**kwargs, clip_sample=False)
    euler = diffusers.EulerDiscreteScheduler(**kwargs)
    sigmas = schedule_of(ddim).sigmas_for(7, "trailing")
    x = noise()
    got = ours(ddim, "ddim", sigmas, vp_to_sigma(x, sigmas[0].item()), "epsilon")
    from_euler = run_diffusers(euler, 7, vp_to_sigma(x, sigmas[0].item()))
    from_ddim = run_diffusers(ddim, 7, x.clone(), eta=0.0)
    assert_close(got, from_euler)
    assert (got - from_ddim).abs().max() / from_ddim.abs().max() > 1e-3


# -- Euler and Heun (sigma-scaled schedulers) ---------------------------------------------------------------------


def _sigma_scheduler(cls, prediction, spacing):
    karras = spacing == "karras"
    return cls(
        **SD_BETAS,
        prediction_type=prediction,
        timestep_spacing="linspace" if karras else spacing,
        use_karras_sigmas=karras,
    )


SIGMA_CASES = [("linspace", 10), ("linspace", 7), ("leading", 10), ("trailing", 8), ("karras", 10), ("karras", 5)]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing, steps", SIGMA_CASES)
@pytest.mark.parametrize("method, cls", [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
def test_euler_heun_match_diffusers(method, cls, prediction, spacing, steps):
    sched = _sigma_scheduler(getattr(diffusers, cls), prediction, spacing)
    # diffusers' Euler and Heun place fractional linspace timesteps by linear interpolation of sigma
    interpolation = "log" if spacing == "karras" else "linear"
    sigmas = schedule_of(sched, interpolation).sigmas_for(steps, spacing)
    sched.set_timesteps(steps)
    theirs = sched.sigmas if method == "euler" else torch.cat([sched.sigmas[:1], sched.sigmas[1::2]])
    assert_close(sigmas, theirs.double(), rtol=1e-6)
    x = noise() * sched.init_noise_sigma
    expected = run_diffusers(sched, steps, x.clone())
    assert_close(ours(sched, method, sigmas, x, prediction, interpolation=interpolation), expected)


@pytest.mark.parametrize("method, cls", [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
@pytest.mark.parametrize("base", ["leading", "trailing"])
def test_karras_bounded_by_the_spaced_grid_as_euler_and_heun(method, cls, base):
    """diffusers' Euler and Heun take a karras grid's ends from their spaced grid, not the training range."""
    sched = getattr(diffusers, cls)(**SD_BETAS, timestep_spacing=base, steps_offset=1, use_karras_sigmas=True)
    sigmas = schedule_of(sched).sigmas_for(10, "karras", steps_offset=1, span=base)
    x = noise() * (sched.set_timesteps(10) or sched.init_noise_sigma)
    expected = run_diffusers(sched, 10, x.clone())
    assert_close(ours(sched, method, sigmas, x, "epsilon"), expected)


@pytest.mark.parametrize("spacing, steps", [("karras", 10), ("linspace", 10), ("trailing", 7)])
def test_ddim_on_grids_diffusers_ddim_cannot_express(spacing, steps):
    """On karras and linspace grids ddim (eta 0) equals diffusers' Euler, its exact counterpart."""
    sched = _sigma_scheduler(diffusers.EulerDiscreteScheduler, "epsilon", spacing)
    interpolation = "log" if spacing == "karras" else "linear"
    sigmas = schedule_of(sched, interpolation).sigmas_for(steps, spacing)
    x = noise() * sched.init_noise_sigma
    expected = run_diffusers(sched, steps, x.clone())
    assert_close(ours(sched, "ddim", sigmas, x, "epsilon", interpolation=interpolation), expected)


# -- DPM-Solver++(2M) and UniPC (VP-scaled multistep schedulers) ----------------------------------------------------


MULTISTEP_CASES = [
    ("linspace", 10),
    ("linspace", 20),
    ("leading", 10),
    ("trailing", 10),
    ("trailing", 6),
    ("karras", 10),
]


def _multistep(cls, prediction, spacing, **extra):
    karras = spacing == "karras"
    return cls(
        **SD_BETAS,
        prediction_type=prediction,
        timestep_spacing="linspace" if karras else spacing,
        use_karras_sigmas=karras,
        final_sigmas_type="zero",
        **extra,
    )


def _multistep_grid(sched, spacing, steps):
    # diffusers' multistep schedulers place steps+1 timesteps for leading/linspace and drop the smallest,
    # and round karras timesteps to integers (our quantize=True)
    sigmas = schedule_of(sched).sigmas_for(steps, spacing, extra_point=True)
    sched.set_timesteps(steps)
    assert_close(sigmas, sched.sigmas.double(), rtol=1e-6)
    return sigmas


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing, steps", MULTISTEP_CASES)
@pytest.mark.parametrize(
    "method, cls", [("dpmpp_2m", "DPMSolverMultistepScheduler"), ("unipc", "UniPCMultistepScheduler")]
)
def test_multistep_match_diffusers(method, cls, prediction, spacing, steps):
    sched = _multistep(getattr(diffusers, cls), prediction, spacing)
    sigmas = _multistep_grid(sched, spacing, steps)
    x = noise()
    expected = run_diffusers(sched, steps, x.clone())
    got = ours(sched, method, sigmas, vp_to_sigma(x, sigmas[0].item()), prediction, quantize=spacing == "karras")
    assert_close(got, expected)


# -- stochastic samplers: the same generator gives the same noise in the same order -------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_matches_diffusers_with_same_noise(prediction, spacing):
    sched = diffusers.DDPMScheduler(**SD_BETAS, clip_sample=False, prediction_type=prediction, timestep_spacing=spacing)
    sigmas = schedule_of(sched).sigmas_for(10, spacing)
    x = noise()
    expected = run_diffusers(sched, 10, x.clone(), generator=torch.Generator().manual_seed(7))
    got = ours(
        sched, "ddpm", sigmas, vp_to_sigma(x, sigmas[0].item()), prediction, generator=torch.Generator().manual_seed(7)
    )
    assert_close(got, expected)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers_with_same_noise(eta):
    sched = diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="leading")
    sigmas = schedule_of(sched).sigmas_for(10, "leading")
    x = noise()
    expected = run_diffusers(sched, 10, x.clone(), generator=torch.Generator().manual_seed(3), eta=eta)
    got = ours(
        sched,
        "ddim",
        sigmas,
        vp_to_sigma(x, sigmas[0].item()),
        "epsilon",
        generator=torch.Generator().manual_seed(3),
        eta=eta,
    )
    assert_close(got, expected)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_euler_a_matches_diffusers_with_same_noise(spacing):
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing=spacing)
    sigmas = schedule_of(sched, "linear").sigmas_for(12, spacing)
    sched.set_timesteps(12)
    x = noise() * sched.init_noise_sigma
    expected = run_diffusers(sched, 12, x.clone(), generator=torch.Generator().manual_seed(5))
    got = ours(
        sched, "euler_a", sigmas, x, "epsilon", interpolation="linear", generator=torch.Generator().manual_seed(5)
    )
    assert_close(got, expected)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["linspace", "karras"])
def test_dpmpp_2m_sde_matches_diffusers_with_same_noise(prediction, spacing):
    sched = _multistep(diffusers.DPMSolverMultistepScheduler, prediction, spacing, algorithm_type="sde-dpmsolver++")
    sigmas = _multistep_grid(sched, spacing, 10)
    x = noise()
    # diffusers' DPM step draws its own noise in float32; inject ours instead
    expected = run_diffusers(sched, 10, x.clone(), variance_noise=torch.Generator().manual_seed(11))
    got = ours(
        sched,
        "dpmpp_2m_sde",
        sigmas,
        vp_to_sigma(x, sigmas[0].item()),
        prediction,
        quantize=spacing == "karras",
        generator=torch.Generator().manual_seed(11),
    )
    assert_close(got, expected)


# -- forward process and schedules ----------------------------------------------------------------------------


def test_add_noise_matches_diffusers():
    from unnoise.core.schedules import add_noise

    sched = diffusers.DDPMScheduler(**SD_BETAS)
    x0, eps = noise(1), noise(2)
    t = torch.tensor([3, 517])
    expected = sched.add_noise(x0, eps, t)
    sigma = schedule_of(sched).sigmas[t]
    assert_close(add_noise(x0, eps, sigma, scaling="vp"), expected, rtol=1e-6)
    assert_close(add_noise(x0, eps, sigma), vp_to_sigma(expected, 0) * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1), 1e-6)


@pytest.mark.parametrize(
    "kind, theirs, start, end",
    [
        ("linear", "linear", 0.0001, 0.02),
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
        ("cosine", "squaredcos_cap_v2", 0.0001, 0.02),
        ("sigmoid", "sigmoid", 0.0001, 0.02),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_match_diffusers(kind, theirs, start, end, zero_snr):
    sched = diffusers.DDPMScheduler(
        beta_schedule=theirs, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr
    )
    ours_ = VPSchedule.from_betas(kind, 1000, start, end, rescale_zero_snr=zero_snr)
    # the zero-SNR rescale runs a cumprod, which diffusers does in float32
    assert_close(ours_.betas, sched.betas.double(), rtol=2e-5 if zero_snr else 1e-6)
    # diffusers accumulates alphas_cumprod in float32; ours in float64
    assert_close(ours_.alphas_cumprod[:-1], sched.alphas_cumprod[:-1].double(), rtol=2e-5)
