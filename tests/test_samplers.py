"""Samplers: one signature, known answers on Gaussian data, callbacks, per-image generators, errors."""

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from unnoise.core.denoisers import EDMDenoiser, FlowDenoiser, VPDenoiser, flow_sigmas
from unnoise.core.samplers import SAMPLER_INFO, SAMPLERS, STOCHASTIC, ancestral_step, nfe, sample
from unnoise.core.schedules import VPSchedule, karras_sigmas, tau_sigmas

S = 0.5  # data std


def gaussian_denoiser(x, sigma):
    """The ideal denoiser of N(0, S^2) data: E[x0 | x] = x S^2 / (S^2 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * S**2 / (S**2 + sigma**2)


def test_every_sampler_shares_one_signature():
    reference = inspect.signature(SAMPLERS["euler"])
    for name, info in SAMPLER_INFO.items():
        sig = inspect.signature(info.fn)
        assert list(sig.parameters) == ["denoiser", "x", "sigmas", "generator", "callback", "eta", "cond"], name
        assert sig == reference, name
        assert info.fn.__name__ == f"sample_{name}" and info.name == name, name


# An author and a year, as in "Lu et al. 2022", "Hochbruck & Ostermann 2010" or "Crowson 2022".
CITATION = re.compile(r"\b[A-Z][A-Za-z-]+(?: et al\.| & [A-Z][A-Za-z-]+)? (?:19|20)\d\d\b")


def _one_line_that_cites(doc: str | None) -> bool:
    """STYLE 8: a docstring is one line that says what and cites where."""
    text = (doc or "").strip()
    return "\n" not in text and text.endswith(".") and CITATION.search(text) is not None


@pytest.mark.parametrize("name", list(SAMPLER_INFO))
def test_every_sampler_docstring_is_one_line_that_cites_its_source(name):
    doc = SAMPLER_INFO[name].fn.__doc__
    assert _one_line_that_cites(doc), f"sample_{name}'s docstring is not one line citing an author and year: {doc!r}"


@pytest.mark.parametrize("doc", [None, "Euler ancestral.", "DPM-Solver++(2M), Alg. 2.", "Heun.\n\nKarras et al. 2022."])
def test_the_docstring_rule_refuses_an_uncited_or_longer_docstring(doc):
    assert not _one_line_that_cites(doc)


@pytest.mark.parametrize("name", list(SAMPLER_INFO))
def test_each_record_tells_the_truth_about_its_sampler(name):
    """Stochastic samplers draw from the generator, deterministic ones never touch it; calls equal nfe()."""
    info = SAMPLER_INFO[name]
    calls = []

    def counting(x, sigma):
        calls.append(sigma)
        return gaussian_denoiser(x, sigma)

    for steps in (1, 2, 7):
        calls.clear()
        generator = torch.Generator().manual_seed(0)
        before = generator.get_state()
        x = torch.linspace(-3, 3, 6, dtype=torch.float64).reshape(2, 3) * 10
        out = sample(counting, x, karras_sigmas(steps, 0.1, 10.0), name, generator=generator)
        assert len(calls) == nfe(name, steps) == info.nfe(steps), (name, steps)
        if steps > 1:  # a single step goes to sigma 0, where no sampler adds noise
            assert torch.equal(generator.get_state(), before) != info.stochastic, (name, steps)
            again = sample(counting, x, karras_sigmas(steps, 0.1, 10.0), name, generator=torch.Generator())
            assert torch.equal(out, again) != info.stochastic, (name, steps)
    assert info.stochastic == (name in STOCHASTIC)
    sigmas, eta = karras_sigmas(3, 0.1, 1.0), 0.5 if info.eta != 0.5 else 0.25
    sample(gaussian_denoiser, torch.ones(1, 1), sigmas, name, eta=info.eta)  # its own eta is always accepted
    if info.eta_adjustable:
        sample(gaussian_denoiser, torch.ones(1, 1), sigmas, name, eta=eta)
    else:
        with pytest.raises(ValueError, match=f"sampler '{name}' does not take eta=.*applies to ddim, euler_a"):
            sample(gaussian_denoiser, torch.ones(1, 1), sigmas, name, eta=eta)


def test_sampler_names_elsewhere_are_unique_and_match_the_docs_table():
    """docs/samplers.md's table of names is SAMPLER_INFO: every row, in order, with the same facts."""
    a1111 = [i.a1111_name for i in SAMPLER_INFO.values() if i.a1111_name is not None]
    assert len(set(a1111)) == len(a1111)
    diffusers = [(i.diffusers_name, i.diffusers_config) for i in SAMPLER_INFO.values() if i.diffusers_name]
    assert len(set(diffusers)) == len(diffusers)
    text = (Path(__file__).resolve().parents[1] / "docs" / "samplers.md").read_text()
    section = text.split("## Sampler names", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    assert [re.match(r"`(\w+)`", r[0])[1] for r in rows] == list(SAMPLER_INFO)
    for row, info in zip(rows, SAMPLER_INFO.values()):
        diffusers_cell = row[1].split(" ")[0].split("(")[0].strip("`")
        assert diffusers_cell == (info.diffusers_name or "—"), row
        assert all(f'{k}="{v}"' in row[1] for k, v in info.diffusers_config), row
        assert row[2] == (info.a1111_name or "—"), row
        evals = {"steps": lambda n: n, "2 steps - 1": lambda n: 2 * n - 1}
        assert [evals[row[4]](n) for n in (1, 5)] == [info.nfe(n) for n in (1, 5)], row


@pytest.mark.parametrize("method, order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2), ("unipc", 3)])
def test_deterministic_samplers_converge_at_their_order_on_gaussian_data(method, order):
    """The ODE maps N(0, S^2 + sigma_max^2) to N(0, S^2); x_out = k x_in, so the variance error is |k^2 v - S^2|."""
    errors = []
    for steps in (32, 64, 128):
        sigmas = karras_sigmas(steps, 0.002, 80.0)
        x = torch.ones(1, 1, dtype=torch.float64) * math.sqrt(S**2 + 80.0**2)
        out = sample(gaussian_denoiser, x, sigmas, method)
        errors.append(abs(out.item() ** 2 - S**2) / S**2)
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(p - order) < 0.3 for p in slopes), (errors, slopes)
    assert errors[-1] < {1: 0.05, 2: 2e-3, 3: 3e-4}[order]


class MismatchedGaussian:
    """The ideal denoiser of N(0, S^2) data, telling samplers that the data std is ``sigma_data``."""

    def __init__(self, sigma_data):
        self.sigma_data = sigma_data

    def __call__(self, x, sigma):
        return gaussian_denoiser(x, sigma)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_gauss_pc_is_exact_for_gaussian_data_of_its_sigma_data(steps):
    for sigmas in (karras_sigmas(steps, 0.002, 80.0), tau_sigmas(steps, 80.0, 1.0)):
        x = torch.ones(1, 1, dtype=torch.float64) * math.sqrt(S**2 + 80.0**2)
        out = sample(MismatchedGaussian(S), x, sigmas, "gauss_pc")
        assert out.item() ** 2 == pytest.approx(S**2, rel=1e-10)


def test_gauss_pc_converges_at_third_order_when_the_data_std_is_wrong():
    errors = []
    for steps in (16, 32, 64):
        x = torch.ones(1, 1, dtype=torch.float64) * math.sqrt(S**2 + 80.0**2)
        out = sample(MismatchedGaussian(1.0), x, karras_sigmas(steps, 0.002, 80.0), "gauss_pc")
        errors.append(abs(out.item() ** 2 - S**2) / S**2)
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(slopes) > 2.8 and errors[-1] < 1e-3, (errors, slopes)


# Consistency sampling (lcm) expects a consistency function, not a denoiser: with the ideal denoiser its last step
# returns E[x0 | x_t], whose variance is below the data's; tests/test_lcm.py checks it with the ideal consistency map.
DENOISER_SAMPLERS = [name for name in SAMPLERS if name != "lcm"]


@pytest.mark.parametrize("method", [m for m in STOCHASTIC if m != "lcm"] + ["ddim"])
def test_stochastic_samplers_reach_the_data_variance(method):
    """Ancestral and SDE samplers are exact in distribution for Gaussian data as steps grow."""
    sigmas = karras_sigmas(200, 0.002, 80.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, generator=gen, dtype=torch.float64) * math.sqrt(S**2 + 80.0**2)
    eta = 1.0 if method == "ddim" else None
    out = sample(gaussian_denoiser, x, sigmas, method, generator=gen, eta=eta)
    # 4000 samples: the std error of the sample variance is about S^2 * sqrt(2 / 4000) = 0.0056
    assert abs(out.var().item() - S**2) < 0.025
    assert abs(out.mean().item()) < 0.03


def test_ancestral_step_is_the_ddpm_posterior_variance():
    sigma, sigma_next = 2.0, 0.5
    a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    var_vp = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # Ho et al. 2020, beta tilde
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
    assert sigma_up**2 == pytest.approx(var_vp / a_prev, rel=1e-12)
    assert sigma_down**2 + sigma_up**2 == pytest.approx(sigma_next**2, rel=1e-12)
    assert ancestral_step(sigma, sigma_next, 0.0) == (sigma_next, 0.0)
    assert ancestral_step(sigma, 0.0) == (0.0, 0.0)


def _denoisers():
    schedule = VPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)

    def eps_net(x_in, t):  # the ideal epsilon network of N(0, S^2) data, in VP scaling
        sigma = schedule.t_to_sigma(t).to(x_in.dtype).reshape(-1, 1)
        x = x_in * (1 + sigma**2).sqrt()
        return (x - gaussian_denoiser(x, sigma.flatten())) / sigma

    def edm_net(x_in, c_noise):  # F such that c_skip x + c_out F is the ideal denoiser
        sigma = (4 * c_noise).exp().reshape(-1, 1)
        sd2, x = 0.25, x_in * (sigma**2 + 0.25).sqrt()
        c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * 0.5 / (sigma**2 + sd2).sqrt()
        return (gaussian_denoiser(x, sigma.flatten()) - c_skip * x) / c_out

    def flow_net(x_t, t):  # velocity noise - x0 of the ideal flow
        t = t.reshape(-1, 1)
        sigma = t / (1 - t)
        x = x_t / (1 - t)
        x0 = gaussian_denoiser(x, sigma.flatten())
        return (x - x0) / sigma - x0

    return [
        ("vp", VPDenoiser(eps_net, schedule), schedule.sigmas_for(100, "karras")),
        ("edm", EDMDenoiser(edm_net, sigma_data=0.5), karras_sigmas(100, 0.002, 80.0)),
        ("flow", FlowDenoiser(flow_net), flow_sigmas(100, t_max=0.9995)),
    ]


@pytest.mark.parametrize("method", DENOISER_SAMPLERS)
@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
def test_every_sampler_works_with_every_denoiser(method, kind):
    name, denoiser, sigmas = next(d for d in _denoisers() if d[0] == kind)
    gen = torch.Generator().manual_seed(1)
    n = torch.randn(2000, 1, generator=gen, dtype=torch.float64)
    x = n * denoiser.prior_std(sigmas[0].item()) if kind != "flow" else n * (1 + sigmas[0].item())
    out = sample(denoiser, x, sigmas, method, generator=gen)
    assert abs(out.std().item() - S) < 0.04, out.std().item()


@pytest.mark.parametrize("method", list(SAMPLERS))
def test_per_image_generators_make_images_independent_of_batch(method):
    sigmas = karras_sigmas(6, 0.01, 10.0)
    start = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batch = sample(gaussian_denoiser, start, sigmas, method, generator=gens)
    alone = sample(gaussian_denoiser, start[1:2], sigmas, method, generator=[torch.Generator().manual_seed(101)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", list(SAMPLERS))
def test_callback_sees_every_step_and_can_stop(method):
    sigmas = karras_sigmas(5, 0.01, 10.0)
    x = torch.ones(1, 3, dtype=torch.float64) * 10
    seen = []

    def record(i, sigma, x_i, denoised):
        seen.append((i, sigma))
        torch.testing.assert_close(denoised, gaussian_denoiser(x_i, sigma))

    sample(gaussian_denoiser, x, sigmas, method, callback=record, generator=torch.Generator().manual_seed(0))
    assert seen == list(enumerate(sigmas[:-1].tolist()))

    calls = []

    def stop_at_two(i, sigma, x_i, denoised):
        calls.append(i)
        return i == 2

    out = sample(gaussian_denoiser, x, sigmas, method, callback=stop_at_two, generator=torch.Generator().manual_seed(0))
    assert calls == [0, 1, 2]
    assert out.abs().max() > 0.1  # returned the state at sigma_2, not a finished sample


@pytest.mark.parametrize("method", list(SAMPLERS))
def test_half_precision_input_keeps_a_float32_state(method):
    """STYLE 9: the network may run in bf16/fp16, the sampler state does not."""
    seen = []

    def half_network(x, sigma):
        seen.append(x.dtype)
        return gaussian_denoiser(x.bfloat16(), sigma).to(x.dtype)

    sigmas = karras_sigmas(4, 0.1, 5.0)
    x = torch.ones(2, 3, dtype=torch.bfloat16) * 5
    out = sample(half_network, x, sigmas, method, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}


def test_nfe_counts_heun_twice_but_the_last_step():
    """The counts themselves; test_each_record_tells_the_truth_about_its_sampler counts the calls."""
    assert [nfe("heun", n) for n in (1, 2, 7)] == [1, 3, 13]
    assert all(nfe(name, 7) == 7 for name in SAMPLERS if name != "heun")


# -- bad input ------------------------------------------------------------------------------------------------


def test_unknown_sampler_names_the_allowed_ones():
    with pytest.raises(ValueError, match="sampler='dpm_fast'.*ddpm, ddim, euler, euler_a, heun, dpmpp_2m"):
        sample(gaussian_denoiser, torch.ones(1, 1), karras_sigmas(3, 0.1, 1.0), "dpm_fast")
    with pytest.raises(ValueError, match="allowed values"):
        nfe("lms", 3)


@pytest.mark.parametrize(
    "sigmas, match",
    [
        (torch.tensor([1.0]), "at least 2 entries"),
        (torch.tensor([1.0, float("nan"), 0.0]), "finite"),
        (torch.tensor([1.0, float("inf"), 0.0]), "finite"),
        (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
        (torch.tensor([1.0, -1.0]), "non-negative"),
        (torch.ones(2, 2), "1-D"),
    ],
)
def test_bad_grids_are_refused(sigmas, match):
    with pytest.raises(ValueError, match=match):
        sample(gaussian_denoiser, torch.ones(1, 1), sigmas, "euler")


def test_bad_inputs_name_the_problem():
    sigmas = karras_sigmas(3, 0.1, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        sample(gaussian_denoiser, torch.tensor([[float("nan")]]), sigmas, "euler")
    with pytest.raises(ValueError, match="generator list has 1 entries for a batch of 2"):
        sample(gaussian_denoiser, torch.ones(2, 1), sigmas, "euler_a", generator=[torch.Generator()])
    with pytest.raises(ValueError, match="does not take eta"):
        sample(gaussian_denoiser, torch.ones(1, 1), sigmas, "euler", eta=0.5)
    with pytest.raises(ValueError, match="eta=-1"):
        sample(gaussian_denoiser, torch.ones(1, 1), sigmas, "ddim", eta=-1.0)
