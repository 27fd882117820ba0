"""Losses: every objective against its plain formula from the network's raw output, weightings against plain
references, the ideal denoiser of Gaussian data against wrong ones, gradients, a short training run, errors."""

import math

import pytest
import torch
from torch import nn

from unnoise.core.denoisers import EDMDenoiser, FlowDenoiser, VPDenoiser
from unnoise.core.losses import (
    OBJECTIVES,
    WEIGHTINGS,
    DiffusionLoss,
    DiscreteSigmas,
    FlowSigmas,
    LogNormalSigmas,
    edm_loss,
    edm_weight,
    flow_loss,
    loss_for,
    min_snr_weight,
    objective_factor,
    vp_loss,
)
from unnoise.core.schedules import VPSchedule

SHAPE = (6, 2, 3, 3)
SCHEDULE = VPSchedule.from_betas("linear", 1000)
SIGMAS = torch.tensor([0.02, 0.3, 1.0, 2.2, 9.0, 80.0], dtype=torch.float64)  # spans SNR above and below gamma


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def data(dtype=torch.float64, seed=0):
    g = gen(seed)
    return torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)


def bcast(v, x):
    return torch.as_tensor(v).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Toy(nn.Module):
    """A tiny network whose output depends on x, the time input and an optional ``shift`` condition; it keeps its
    last raw output so tests can write each objective from it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x, t, shift=0.0):
        self.last = self.a * torch.tanh(x) + self.b * torch.sin(bcast(t, x)) * x.roll(1, dims=1) + shift
        return self.last


def mean(v):
    return v.pow(2).flatten(1).mean(1)


def vp_target(prediction, x0, noise, sigma):
    a = bcast(1 / (1 + sigma**2), x0)
    return {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}[prediction]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_objectives_equal_plain_formula_on_raw_output(prediction):
    toy = Toy()
    loss = vp_loss(SCHEDULE, prediction)
    x0, noise = data()
    sigma = SCHEDULE.sigmas[torch.tensor([0, 10, 200, 500, 800, 999])]
    got = loss(VPDenoiser(toy, SCHEDULE, prediction), x0, noise=noise, sigma=sigma)
    expected = mean(toy.last - vp_target(prediction, x0, noise, sigma))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_edm_objective_equals_plain_formula_on_raw_output():
    toy, sd = Toy(), 0.7
    x0, noise = data()
    got = edm_loss(sigma_data=sd)(EDMDenoiser(toy, sigma_data=sd), x0, noise=noise, sigma=SIGMAS)
    s = bcast(SIGMAS, x0)
    x = x0 + s * noise
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(got, mean(toy.last - (x0 - c_skip * x) / c_out), rtol=1e-9, atol=1e-12)


def test_flow_objective_equals_plain_formula_on_raw_output():
    toy = Toy()
    x0, noise = data()
    got = flow_loss()(FlowDenoiser(toy), x0, noise=noise, sigma=SIGMAS)
    torch.testing.assert_close(got, mean(toy.last - (noise - x0)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_factor_matches_target_space_error_of_any_denoiser(objective):
    """Each objective written from x0_hat alone, as in its paper, is the x0 error times ``objective_factor``."""
    x0, noise = data()
    s, sd = bcast(SIGMAS, x0), 0.5
    x = x0 + s * noise
    x0_hat = 0.4 * torch.tanh(x) + 0.1 * x0  # any denoiser output
    eps_hat = (x - x0_hat) / s
    a = 1 / (1 + s**2)
    t = s / (1 + s)
    plain = {
        "epsilon": mean(eps_hat - noise),
        "v": mean(a.sqrt() * (eps_hat - noise) - (1 - a).sqrt() * (x0_hat - x0)),
        "x0": mean(x0_hat - x0),
        "edm": mean((x0_hat - x0) / (s * sd / (s**2 + sd**2).sqrt())),
        "flow": mean((x / (1 + s) - x0_hat) / t - (noise - x0)),  # v_hat from x_t = x / (1 + sigma)
    }[objective]
    loss = DiffusionLoss(objective=objective, sigmas=LogNormalSigmas(), sigma_data=sd)
    torch.testing.assert_close(loss(lambda x, sigma: x0_hat, x0, noise=noise, sigma=SIGMAS), plain, rtol=1e-9, atol=0)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_shape_dtype_and_reproducibility(objective, weighting):
    loss = DiffusionLoss(objective=objective, sigmas=DiscreteSigmas(schedule=SCHEDULE), weighting=weighting)
    denoiser = VPDenoiser(Toy().float(), SCHEDULE)
    x0 = torch.randn(SHAPE)
    first = loss(denoiser, x0, generator=gen(3))
    assert first.shape == (SHAPE[0],) and first.dtype == torch.float32 and torch.isfinite(first).all()
    torch.testing.assert_close(loss(denoiser, x0, generator=gen(3)), first, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["epsilon", "v", "x0"])
def test_min_snr_weight_equals_plain_reference(objective):
    gamma = 5.0
    snr = SIGMAS**-2
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    plain = {"epsilon": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[objective]  # Hang et al. 2023
    torch.testing.assert_close(min_snr_weight(SIGMAS, gamma, objective), plain, rtol=1e-12, atol=0)
    # Never an up-weighting of easy (high-SNR) steps: eps weight is 1 where SNR <= gamma, gamma / SNR below 1 above.
    if objective == "epsilon":
        assert torch.all(plain <= 1) and torch.all(plain[snr <= gamma] == 1)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_weightings_fix_total_x0_weight(objective):
    """min-SNR puts min(SNR, gamma) on the x0 error and EDM puts lambda(sigma), whatever the objective."""
    x0, noise = data()
    x0_hat = 0.5 * x0 + 0.2 * noise
    err = mean(x0_hat - x0)
    snr, sd = SIGMAS**-2, 0.5
    totals = {"min_snr": snr.clamp(max=2.0), "edm": (SIGMAS**2 + sd**2) / (SIGMAS * sd) ** 2}
    for weighting, total in totals.items():
        loss = DiffusionLoss(objective=objective, sigmas=LogNormalSigmas(), weighting=weighting, gamma=2.0)
        got = loss(lambda x, sigma: x0_hat, x0, noise=noise, sigma=SIGMAS)
        torch.testing.assert_close(got, total * err, rtol=1e-9, atol=0)
        plain = mean(x0_hat - x0) * objective_factor(objective, SIGMAS)  # the objective's own MSE
        torch.testing.assert_close(got, loss.weight(SIGMAS) * plain, rtol=1e-9, atol=0)


def test_edm_objective_is_x0_objective_with_edm_weighting():
    x0, noise = data()
    denoiser = EDMDenoiser(Toy())
    a = edm_loss()(denoiser, x0, noise=noise, sigma=SIGMAS)
    b = DiffusionLoss(objective="x0", sigmas=LogNormalSigmas(), weighting="edm")(
        denoiser, x0, noise=noise, sigma=SIGMAS
    )
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(edm_weight(SIGMAS), objective_factor("edm", SIGMAS), rtol=0, atol=0)


def ideal(s2, scale=1.0):
    """For x0 ~ N(0, s2) per pixel, E[x0 | x] = x s2 / (s2 + sigma^2); ``scale != 1`` makes it wrong."""
    return lambda x, sigma: scale * x * bcast(s2 / (s2 + sigma**2), x)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_ideal_denoiser_has_lower_loss_than_wrong_ones(objective, weighting):
    s2 = 0.36
    x0 = torch.randn(4096, 8, generator=gen(1), dtype=torch.float64) * s2**0.5
    sampler = FlowSigmas() if objective == "flow" else LogNormalSigmas()
    loss = DiffusionLoss(objective=objective, sigmas=sampler, weighting=weighting)
    best = loss(ideal(s2), x0, generator=gen(2)).mean()
    for wrong in (ideal(s2, 1.2), ideal(s2, 0.8), lambda x, sigma: torch.zeros_like(x)):
        assert best < loss(wrong, x0, generator=gen(2)).mean()


def test_ideal_denoiser_x0_error_is_posterior_variance():
    s2, sigma = 0.36, 0.8
    x0 = torch.randn(20000, 4, generator=gen(1), dtype=torch.float64) * s2**0.5
    got = DiffusionLoss(objective="x0", sigmas=LogNormalSigmas())(ideal(s2), x0, generator=gen(2), sigma=sigma)
    assert got.mean().item() == pytest.approx(s2 * sigma**2 / (s2 + sigma**2), rel=0.03)


def test_vp_sampling_draws_training_sigmas_and_integer_timesteps():
    seen = []
    model = lambda x, t: seen.append(t) or torch.zeros_like(x)  # noqa: E731
    sigmas = DiscreteSigmas(schedule=SCHEDULE)(512, generator=gen())
    assert torch.isin(sigmas, SCHEDULE.sigmas).all() and sigmas.unique().numel() > 300
    vp_loss(SCHEDULE)(VPDenoiser(model, SCHEDULE), torch.randn(64, 3), generator=gen())
    t = seen[0]
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 999


def test_lognormal_sigmas_match_edm_defaults():
    log_sigma = LogNormalSigmas()(20000, generator=gen()).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_flow_sigmas_distribution_and_t_eps(distribution):
    sigma = FlowSigmas(distribution=distribution)(20000, generator=gen())
    t = sigma / (1 + sigma)
    if distribution == "uniform":
        assert t.mean().item() == pytest.approx(0.5, abs=0.01) and t.std().item() == pytest.approx(12**-0.5, abs=0.01)
    else:
        logit = (t / (1 - t)).log()
        assert logit.mean().item() == pytest.approx(0.0, abs=0.03) and logit.std().item() == pytest.approx(1, abs=0.03)
    sigma = FlowSigmas(distribution=distribution, t_eps=0.2)(20000, generator=gen())
    t = sigma / (1 + sigma)
    assert t.min() >= 0.2 and t.max() <= 0.8
    if distribution == "uniform":
        assert t.min() < 0.201 and t.max() > 0.799


def test_flow_loss_is_finite_and_accurate_at_both_ends_of_t():
    """Logit-normal draws far in the tails land on t_eps and 1 - t_eps, not on sigma = 0 or inf; in float32 the
    x0-space route stays within 1e-3 of the plain v error there (its rounding error grows as 6e-8 / t)."""
    t_eps = FlowSigmas().t_eps
    for mean_logit, t in ((-60.0, t_eps), (60.0, 1 - t_eps)):
        sigma = FlowSigmas(mean=mean_logit, t_eps=t_eps)(4, generator=gen())
        torch.testing.assert_close(sigma, torch.full_like(sigma, t / (1 - t)), rtol=1e-9, atol=0)
    toy = Toy().float()
    x0, noise = data(torch.float32)
    for t in (t_eps, 1 - t_eps):
        got = flow_loss()(FlowDenoiser(toy), x0, noise=noise, sigma=t / (1 - t))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, mean(toy.last - (noise - x0)), rtol=1e-3, atol=0)


def test_condition_reaches_the_network():
    toy = Toy()
    x0, noise = data()
    loss = flow_loss()
    plain = loss(FlowDenoiser(toy), x0, noise=noise, sigma=SIGMAS)
    shifted = loss(FlowDenoiser(toy), x0, {"shift": 0.5}, noise=noise, sigma=SIGMAS)
    torch.testing.assert_close(shifted, mean(toy.last - (noise - x0)), rtol=1e-9, atol=0)
    assert not torch.allclose(plain, shifted)


def make_denoisers(model):
    return [VPDenoiser(model, SCHEDULE, "v_prediction"), EDMDenoiser(model), FlowDenoiser(model)]


@pytest.mark.parametrize("index", range(3))
def test_gradient_reaches_parameters(index):
    model = nn.Conv2d(2, 2, 1)
    denoiser = make_denoisers(lambda x, t: model(x))[index]
    loss_for(denoiser, weighting="min_snr")(denoiser, torch.randn(SHAPE), generator=gen()).mean().backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


class Linear(nn.Module):
    """Per-feature affine network, quadratic in a squashed time input: enough to fit the Gaussian posterior."""

    def __init__(self, dim, time_scale):
        super().__init__()
        self.w, self.c = nn.Parameter(torch.zeros(3, dim)), nn.Parameter(torch.zeros(3, dim))
        self.time_scale = time_scale

    def forward(self, x, t):
        tau = bcast(t * self.time_scale, x).float().tanh()
        powers = (1, tau, tau**2)
        return sum(p * (x * w + c) for p, w, c in zip(powers, self.w, self.c))


TIME_SCALES = (1 / 500, 1.0, 2.0)  # VP timesteps in [0, 999], EDM log(sigma) / 4, flow t in [0, 1]


@pytest.mark.parametrize("index", range(3))
def test_a_few_training_steps_reduce_the_loss(index):
    model = Linear(4, TIME_SCALES[index])
    denoiser = make_denoisers(model)[index]
    loss = loss_for(denoiser)
    x0 = torch.randn(512, 4, generator=gen(5)) * 0.5 + 1.0
    with torch.no_grad():
        before = loss(denoiser, x0, generator=gen(6)).mean()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(20):
        opt.zero_grad()
        loss(denoiser, x0[step % 4 :: 4], generator=gen(100 + step)).mean().backward()
        opt.step()
    with torch.no_grad():
        after = loss(denoiser, x0, generator=gen(6)).mean()
    assert after < 0.7 * before


def test_errors_name_field_value_and_allowed():
    sampler = LogNormalSigmas()
    with pytest.raises(ValueError, match=r"objective='eps'.*epsilon, v, x0, edm, flow"):
        DiffusionLoss(objective="eps", sigmas=sampler)
    with pytest.raises(ValueError, match=r"weighting='snr'.*uniform, min_snr, edm"):
        DiffusionLoss(objective="v", sigmas=sampler, weighting="snr")
    for gamma in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="gamma"):
            DiffusionLoss(objective="v", sigmas=sampler, weighting="min_snr", gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(SIGMAS, 0.0, "epsilon")
    with pytest.raises(ValueError, match=r"prediction='x'.*epsilon, v_prediction, sample"):
        vp_loss(SCHEDULE, "x")
    with pytest.raises(ValueError, match=r"distribution='beta'.*uniform, logit_normal"):
        FlowSigmas(distribution="beta")
    for bad in (dict(t_eps=0.0), dict(t_eps=0.5), dict(std=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FlowSigmas(**bad)
    with pytest.raises(ValueError, match="p_std"):
        LogNormalSigmas(p_std=-1.0)
    with pytest.raises(ValueError, match="no standard loss for function"):
        loss_for(lambda x, sigma: x)


def test_errors_on_mismatched_shapes_and_bad_sigma():
    loss = edm_loss()
    denoiser = EDMDenoiser(Toy())
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(6, 2, 3, 3\) vs \(6, 2, 3\)"):
        loss(denoiser, x0, noise=torch.randn(6, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sigma has shape \(4,\).*\(6,\)"):
        loss(denoiser, x0, sigma=torch.ones(4))
    with pytest.raises(ValueError, match="finite and positive"):
        loss(denoiser, x0, sigma=0.0)
    with pytest.raises(ValueError, match=r"denoiser output shape \(6, 2\) differs from x0 shape \(6, 2, 3, 3\)"):
        loss(lambda x, sigma: x[:, :, 0, 0], x0, sigma=1.0)
