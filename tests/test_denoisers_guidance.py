"""Denoiser adapters against the plain formulas of each parametrization; classifier-free guidance."""

import math

import pytest
import torch

from unnoise.core.denoisers import DEFAULT_SIGMA_DATA, EDMDenoiser, FlowDenoiser, VPDenoiser, flow_sigmas, score
from unnoise.core.guidance import CFGDenoiser
from unnoise.core.schedules import VPSchedule

SCHEDULE = VPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)


def net(x_in, t, **cond):
    """A toy network whose output depends on the input, the time input and an optional condition."""
    t = t.reshape(-1, *([1] * (x_in.ndim - 1))).to(x_in.dtype)
    out = torch.sin(x_in * 1.3) + 0.01 * t * x_in
    if cond.get("c") is not None:
        out = out + cond["c"].reshape(-1, *([1] * (x_in.ndim - 1)))
    return out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_denoiser_matches_the_vp_formulas(prediction):
    x = torch.randn(3, 2, 4, dtype=torch.float64) * 5
    t = torch.tensor([10.0, 400.5, 950.0], dtype=torch.float64)
    sigma = SCHEDULE.t_to_sigma(t)
    denoised = VPDenoiser(net, SCHEDULE, prediction)(x, sigma)
    a = (1 / (1 + sigma**2)).reshape(-1, 1, 1)
    x_vp = x * a.sqrt()  # the VP sample the network was trained on
    out = net(x_vp, t)
    expected = {
        "epsilon": (x_vp - (1 - a).sqrt() * out) / a.sqrt(),
        "v_prediction": a.sqrt() * x_vp - (1 - a).sqrt() * out,
        "sample": out,
    }[prediction]
    torch.testing.assert_close(denoised, expected)


def test_vp_denoiser_quantize_rounds_the_timestep():
    seen = []

    def spy(x_in, t):
        seen.append(t.clone())
        return torch.zeros_like(x_in)

    sigma = SCHEDULE.t_to_sigma(torch.tensor([10.4, 10.6], dtype=torch.float64))
    VPDenoiser(spy, SCHEDULE, quantize=True)(torch.ones(2, 1, dtype=torch.float64), sigma)
    VPDenoiser(spy, SCHEDULE)(torch.ones(2, 1, dtype=torch.float64), sigma)
    assert seen[0].tolist() == [10.0, 11.0]
    torch.testing.assert_close(seen[1], torch.tensor([10.4, 10.6], dtype=torch.float64))


def test_edm_denoiser_is_karras_table_1():
    x = torch.randn(2, 3, dtype=torch.float64)
    sigma = torch.tensor([0.3, 20.0], dtype=torch.float64)
    sd = 0.5
    got = EDMDenoiser(net, sigma_data=sd)(x, sigma)
    s = sigma[:, None]
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (s**2 + sd**2).sqrt(), sigma.log() / 4
    torch.testing.assert_close(got, c_skip * x + c_out * net(c_in * x, c_noise))


def test_flow_denoiser_inverts_the_interpolation():
    x0, n = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    exact = FlowDenoiser(lambda x_t, tt: n - x0)  # a network that knows the true velocity
    sigma = t / (1 - t)
    x = x0 + sigma[:, None] * n  # = x_t / (1 - t)
    torch.testing.assert_close(exact(x, sigma), x0)
    seen = []
    FlowDenoiser(lambda x_t, tt: seen.append(tt) or torch.zeros_like(x_t), time_scale=1000)(x, sigma)
    torch.testing.assert_close(seen[0], t * 1000)


def test_flow_grid_and_errors():
    sigmas = flow_sigmas(4, shift=3.0, t_max=0.99)
    assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    t0 = 3 * 0.99 / (1 + 2 * 0.99)
    assert sigmas[0].item() == pytest.approx(t0 / (1 - t0))
    with pytest.raises(ValueError, match="t_max=1.0"):
        flow_sigmas(4, t_max=1.0)


def test_score_is_tweedie_for_gaussian_data():
    s = 0.7
    ideal = EDMDenoiser(lambda x_in, c: torch.zeros_like(x_in), sigma_data=s)  # c_skip x is the Gaussian answer
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = 1.3
    torch.testing.assert_close(score(ideal, x, sigma), -x / (s**2 + sigma**2))


def test_denoiser_errors():
    with pytest.raises(ValueError, match="prediction='eps'.*epsilon, v_prediction, sample"):
        VPDenoiser(net, SCHEDULE, "eps")
    d = VPDenoiser(net, SCHEDULE)
    with pytest.raises(ValueError, match=r"sigma has shape \(3,\); expected a scalar or \(2,\)"):
        d(torch.ones(2, 1), torch.ones(3))
    with pytest.raises(ValueError, match="sigma must be finite and positive"):
        d(torch.ones(2, 1), 0.0)
    with pytest.raises(ValueError, match=r"model output shape \(2, 2\) differs from input shape \(2, 1\)"):
        VPDenoiser(lambda x, t: torch.ones(2, 2), SCHEDULE)(torch.ones(2, 1), 1.0)
    with pytest.raises(ValueError, match="sigma_data=0"):
        EDMDenoiser(net, sigma_data=0)


# -- classifier-free guidance -------------------------------------------------------------------------------------


def _cfg_setup():
    d = VPDenoiser(net, SCHEDULE)
    x = torch.randn(3, 2, 4, dtype=torch.float64) * 3
    cond = {"c": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    uncond = {"c": torch.zeros(1, dtype=torch.float64)}
    return d, x, cond, uncond


# the double next above 1: guidance at scale 1 to 2e-16, but past the ``scale == 1`` shortcut, through the formula
SCALE_ONE_VIA_FORMULA = math.nextafter(1.0, math.inf)
# every option that changes the guided path: rescale in both spaces, an interval that holds the sigma
CFG_OPTIONS = [{}, {"rescale": 0.7}, {"rescale": 0.7, "rescale_space": "epsilon"}, {"interval": (0.5, 5.0)}]
CFG_OPTION_IDS = ["plain", "rescale-v", "rescale-epsilon", "interval"]


def _recording(calls: list) -> VPDenoiser:
    """The setup's denoiser, recording the batch size and condition of each network call."""

    def recorded(x_in, t, **c):
        calls.append((x_in.shape[0], c["c"]))
        return net(x_in, t, **c)

    return VPDenoiser(recorded, SCHEDULE)


@pytest.mark.parametrize("options", CFG_OPTIONS, ids=CFG_OPTION_IDS)
def test_cfg_scale_one_is_the_conditional_model(options):
    """``uncond + s * (cond - uncond)`` at s = 1, from the batched call, is the conditional model."""
    d, x, cond, uncond = _cfg_setup()
    calls = []
    got = CFGDenoiser(_recording(calls), SCALE_ONE_VIA_FORMULA, uncond, **options)(x, 2.0, **cond)
    assert [batch for batch, _ in calls] == [6]  # one call on [cond; uncond]: the formula ran, not the shortcut
    d_cond, d_uncond = d(x, 2.0, **cond), d(x, 2.0, c=torch.zeros(3, dtype=torch.float64))
    assert (d_cond - d_uncond).abs().min() > 0.1  # the unconditional half is really there to cancel
    torch.testing.assert_close(got, d_cond, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", CFG_OPTIONS, ids=CFG_OPTION_IDS)
def test_cfg_scale_exactly_one_calls_the_conditional_model_alone(options):
    d, x, cond, uncond = _cfg_setup()
    calls = []
    got = CFGDenoiser(_recording(calls), 1.0, uncond, **options)(x, 2.0, **cond)
    assert len(calls) == 1 and calls[0][0] == 3 and torch.equal(calls[0][1], cond["c"])
    torch.testing.assert_close(got, d(x, 2.0, **cond), rtol=0, atol=0)


def test_cfg_combines_in_one_batched_call_and_equals_epsilon_space_guidance():
    d, x, cond, uncond = _cfg_setup()
    calls = []
    counted = VPDenoiser(lambda x_in, t, **c: calls.append(x_in.shape[0]) or net(x_in, t, **c), SCHEDULE)
    scale, sigma = 7.5, 2.0
    got = CFGDenoiser(counted, scale, uncond)(x, sigma, **cond)
    assert calls == [6]
    t = SCHEDULE.sigma_to_t(sigma)
    x_vp = x / math.sqrt(1 + sigma**2)
    eps_c = net(x_vp, t.expand(3), **cond)
    eps_u = net(x_vp, t.expand(3), c=torch.zeros(3, dtype=torch.float64))
    eps = eps_u + scale * (eps_c - eps_u)  # guidance as diffusers writes it, in epsilon space
    torch.testing.assert_close(got, x - sigma * eps)


@pytest.mark.parametrize("prediction, space", [("epsilon", "epsilon"), ("v_prediction", "v")])
def test_cfg_rescale_matches_diffusers(prediction, space):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    d = VPDenoiser(net, SCHEDULE, prediction)
    _, x, cond, uncond = _cfg_setup()
    scale, phi, sigma = 5.0, 0.7, 3.0
    got = CFGDenoiser(d, scale, uncond, rescale=phi, rescale_space=space)(x, sigma, **cond)
    t = SCHEDULE.sigma_to_t(sigma).expand(3)
    x_vp = x / math.sqrt(1 + sigma**2)
    out_c = net(x_vp, t, **cond)
    out_u = net(x_vp, t, c=torch.zeros(3, dtype=torch.float64))
    out = rescale_noise_cfg(out_u + scale * (out_c - out_u), out_c, guidance_rescale=phi)
    a = 1 / (1 + sigma**2)
    expected = (
        (x_vp - math.sqrt(1 - a) * out) / math.sqrt(a)
        if prediction == "epsilon"
        else (math.sqrt(a) * x_vp - math.sqrt(1 - a) * out)
    )
    torch.testing.assert_close(got, expected)


def test_cfg_interval_guides_only_inside():
    d, x, cond, uncond = _cfg_setup()
    g = CFGDenoiser(d, 4.0, uncond, interval=(0.5, 5.0))
    torch.testing.assert_close(g(x, 10.0, **cond), d(x, 10.0, **cond), rtol=0, atol=0)
    for sigma in (0.5, 2.0, 5.0, torch.tensor([0.5, 2.0, 5.0])):  # both ends belong to the interval
        torch.testing.assert_close(g(x, sigma, **cond), CFGDenoiser(d, 4.0, uncond)(x, sigma, **cond))
        assert not torch.allclose(g(x, sigma, **cond), d(x, sigma, **cond))
    with pytest.raises(ValueError, match="both sides of the guidance interval"):
        g(x, torch.tensor([1.0, 2.0, 9.0]), **cond)


def test_cfg_conditions_that_are_none_in_both_halves_pass_through():
    d, x, _, _ = _cfg_setup()
    calls = []
    got = CFGDenoiser(_recording(calls), 3.0, {"c": None})(x, 2.0, c=None)
    assert calls == [(6, None)]
    torch.testing.assert_close(got, d(x, 2.0))


def test_cfg_sigma_data_is_the_wrapped_denoisers():
    assert CFGDenoiser(EDMDenoiser(net, sigma_data=0.7), 3.0, {}).sigma_data == 0.7
    assert CFGDenoiser(lambda x, sigma: x, 3.0, {}).sigma_data == DEFAULT_SIGMA_DATA


def test_cfg_errors():
    d, x, cond, uncond = _cfg_setup()
    with pytest.raises(ValueError, match="uncond must be a dict.*got list"):
        CFGDenoiser(d, 3.0, [torch.zeros(1)])
    with pytest.raises(ValueError, match=r"cond\['c'\] is a tensor but uncond\['c'\] is NoneType"):
        CFGDenoiser(d, 3.0, {"c": None})(x, 1.0, **cond)
    with pytest.raises(ValueError, match=r"cond\['c'\] must be a tensor \(or None in both\), got float"):
        CFGDenoiser(d, 3.0, uncond)(x, 1.0, c=0.5)
    with pytest.raises(ValueError, match=r"cond keys \['c'\] differ from uncond keys \['y'\]"):
        CFGDenoiser(d, 3.0, {"y": torch.zeros(1)})(x, 1.0, **cond)
    with pytest.raises(ValueError, match="rescale=1.5"):
        CFGDenoiser(d, 3.0, uncond, rescale=1.5)
    with pytest.raises(ValueError, match="interval="):
        CFGDenoiser(d, 3.0, uncond, interval=(5.0, 1.0))
    with pytest.raises(ValueError, match="rescale_space='x0'.*v, epsilon"):
        CFGDenoiser(d, 3.0, uncond, rescale_space="x0")
    with pytest.raises(ValueError, match="must have batch 1 or 3"):
        CFGDenoiser(d, 3.0, {"c": torch.zeros(2, dtype=torch.float64)})(x, 1.0, **cond)
