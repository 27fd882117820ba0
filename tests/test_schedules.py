"""Schedules and grids: invariants for every spacing, interpolation, forward process, errors."""

import math

import pytest
import torch

from unnoise.core.schedules import (
    SPACINGS,
    VPSchedule,
    add_noise,
    check_grid,
    karras_sigmas,
    log_snr,
    snr,
)

SD = dict(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def sd():
    return VPSchedule.from_betas(**SD)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 7, 10, 50, 999])
@pytest.mark.parametrize("extra_point", [False, True])
def test_grid_invariants_for_every_spacing(sd, spacing, steps, extra_point):
    sigmas = sd.sigmas_for(steps, spacing, extra_point=extra_point)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0
    check_grid(sigmas)
    assert sigmas[:-1].min() >= sd.sigma_min * (1 - 1e-12) and sigmas[0] <= sd.sigma_max * (1 + 1e-12)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "karras", "exponential", "tau"])
def test_grids_that_start_at_the_top_and_end_at_sigma_min(sd, spacing):
    # linspace reaches t = 0 itself; with extra_point it stops one interval short, as diffusers' DPM-Solver does
    sigmas = sd.sigmas_for(10, spacing, final="sigma_min", extra_point=spacing == "linspace")
    check_grid(sigmas)
    assert sigmas[0] == pytest.approx(sd.sigma_max, rel=1e-12)
    assert sigmas[-1] == pytest.approx(sd.sigma_min, rel=1e-12)


def test_leading_spacing_with_offset_matches_stable_diffusion(sd):
    t = sd.timesteps_for(50, "leading", steps_offset=1)
    assert t[0] == 981 and t[-1] == 1 and (t[:-1] - t[1:] == 20).all()
    sigmas = sd.sigmas_for(50, "leading", steps_offset=1, final="sigma_min")
    torch.testing.assert_close(sigmas[-2:], sd.sigmas[[1, 0]], rtol=1e-14, atol=0)


def test_sigma_min_final_is_not_repeated(sd):
    """leading with offset 0 already ends at timestep 0; diffusers' extra step there is zero-length."""
    sigmas = sd.sigmas_for(10, "leading", final="sigma_min")
    check_grid(sigmas)
    assert len(sigmas) == 10 and sigmas[-1] == sd.sigmas[0]


def test_karras_bounded_by_a_spaced_grid(sd):
    spaced = sd.sigmas_for(20, "leading", steps_offset=1)
    sigmas = sd.sigmas_for(20, "karras", steps_offset=1, span="leading")
    assert sigmas[0].item() == pytest.approx(spaced[0].item()) and sigmas[-2].item() == pytest.approx(spaced[-2].item())
    with pytest.raises(ValueError, match="span='karras'.*leading, trailing, linspace"):
        sd.sigmas_for(20, "karras", span="karras")


def test_timesteps_for_each_spacing(sd):
    assert sd.timesteps_for(4, "trailing").tolist() == [999, 749, 499, 249]
    assert sd.timesteps_for(4, "linspace").tolist() == [999, 666, 333, 0]
    assert sd.timesteps_for(4, "leading").tolist() == [750, 500, 250, 0]
    assert sd.timesteps_for(4, "leading", extra_point=True).tolist() == [800, 600, 400, 200]
    assert sd.timesteps_for(4, "linspace", extra_point=True).tolist() == [999, 749, 500, 250]


def test_karras_grid_follows_eq5(sd):
    sigmas = sd.sigmas_for(5, "karras", rho=7.0)
    lo, hi = sd.sigma_min ** (1 / 7), sd.sigma_max ** (1 / 7)
    expected = [(hi + i / 4 * (lo - hi)) ** 7 for i in range(5)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(karras_sigmas(5, sd.sigma_min, sd.sigma_max), sigmas)


def test_tau_grid_is_uniform_in_log_of_data_plus_noise_variance(sd):
    sigmas = sd.sigmas_for(8, "tau", sigma_data=0.7)
    tau = 0.5 * (0.49 + sigmas**2).log()
    steps = tau[:-1] - tau[1:]
    torch.testing.assert_close(steps, steps.mean().expand(8))
    assert sigmas[0] == pytest.approx(sd.sigma_max) and sigmas[-1] == 0
    with pytest.raises(ValueError, match="places sigmas below the schedule's smallest"):
        sd.sigmas_for(999, "tau", sigma_data=0.05)


def test_exponential_grid_is_uniform_in_log_sigma(sd):
    log = sd.sigmas_for(6, "exponential")[:-1].log()
    steps = log[:-1] - log[1:]
    torch.testing.assert_close(steps, steps.mean().expand(5))


@pytest.mark.parametrize("interpolation", ["log", "linear"])
def test_sigma_to_t_inverts_t_to_sigma_at_fractional_t(interpolation):
    schedule = VPSchedule.from_betas(**SD, interpolation=interpolation)
    t = torch.tensor([0.0, 0.25, 3.5, 500.75, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t)
    torch.testing.assert_close(schedule.t_to_sigma(torch.arange(1000.0)), schedule.sigmas)


def test_interpolation_modes_differ_between_timesteps():
    log, lin = (VPSchedule.from_betas(**SD, interpolation=i) for i in ("log", "linear"))
    a, b = log.sigmas[10].item(), log.sigmas[11].item()
    assert log.t_to_sigma(10.5).item() == pytest.approx(math.sqrt(a * b), rel=1e-12)
    assert lin.t_to_sigma(10.5).item() == pytest.approx((a + b) / 2, rel=1e-12)


def test_training_sigmas_are_the_vp_conversion(sd):
    ac = sd.alphas_cumprod
    torch.testing.assert_close(sd.sigmas, ((1 - ac) / ac).sqrt())
    torch.testing.assert_close(snr(sd.sigmas), ac / (1 - ac))
    torch.testing.assert_close(log_snr(sd.sigmas), (ac / (1 - ac)).log())


def test_zero_terminal_snr_keeps_a_finite_monotone_schedule():
    for kind in ("linear", "scaled_linear", "cosine", "sigmoid"):
        schedule = VPSchedule.from_betas(kind, rescale_zero_snr=True)
        assert math.isfinite(schedule.sigma_max) and schedule.sigma_max > 1000
        assert (schedule.sigmas[1:] > schedule.sigmas[:-1]).all()
        check_grid(schedule.sigmas_for(10, "trailing"))


def test_cosine_schedule_is_nichol_dhariwal():
    schedule = VPSchedule.from_betas("cosine", 1000)
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in (1, 500)]
    # alphas_cumprod[t] = f(t + 1) / f(0) while no beta hits the 0.999 cap
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert schedule.alphas_cumprod[0].item() == pytest.approx(f[0] / f0, rel=1e-9)
    assert schedule.alphas_cumprod[499].item() == pytest.approx(f[1] / f0, rel=1e-9)


def test_add_noise_both_scalings():
    x0, n = torch.randn(3, 2), torch.randn(3, 2)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    x = add_noise(x0, n, sigma)
    torch.testing.assert_close(x, x0 + sigma[:, None] * n)
    a = 1 / (1 + sigma[:, None] ** 2)
    torch.testing.assert_close(add_noise(x0, n, sigma, scaling="vp"), a.sqrt() * x0 + (1 - a).sqrt() * n)
    with pytest.raises(ValueError, match="shapes differ"):
        add_noise(x0, n[:2], sigma)
    with pytest.raises(ValueError, match="scaling='x'.*ve, vp"):
        add_noise(x0, n, sigma, scaling="x")


# -- bad input ------------------------------------------------------------------------------------------------


def test_schedule_errors_name_field_value_and_allowed(sd):
    with pytest.raises(ValueError, match="spacing='uniform'.*leading, trailing, linspace, karras, exponential"):
        sd.sigmas_for(10, "uniform")
    with pytest.raises(ValueError, match="kind='quadratic'.*linear, scaled_linear, cosine, sigmoid"):
        VPSchedule.from_betas("quadratic")
    with pytest.raises(ValueError, match="final='one'.*zero, sigma_min"):
        sd.sigmas_for(10, "karras", final="one")
    with pytest.raises(ValueError, match="interpolation='cubic'.*log, linear"):
        VPSchedule.from_betas(interpolation="cubic")
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"steps={steps!r} must be an integer >= 1"):
            sd.sigmas_for(steps, "karras")
    with pytest.raises(ValueError, match="steps=1001 exceeds"):
        sd.sigmas_for(1001, "trailing")


def test_steps_offset_out_of_range(sd):
    with pytest.raises(ValueError, match="steps_offset=600 moves timesteps outside"):
        sd.sigmas_for(2, "leading", steps_offset=600)


def test_timestep_and_sigma_ranges(sd):
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        sd.t_to_sigma(1000.5)
    with pytest.raises(ValueError, match="training range"):
        sd.sigma_to_t(100.0)
    with pytest.raises(ValueError, match="training range"):
        sd.sigma_to_t(float("nan"))
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPSchedule(torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="open interval"):
        VPSchedule(torch.tensor([1.0, 0.5]))
