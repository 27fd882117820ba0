import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder is not installed

from benchmarks import samplers as bench  # noqa: E402
from benchmarks.diffusers_runs import DIFFUSERS_CONFIGS  # noqa: E402
from benchmarks.mixture import EpsilonModel, MixtureDenoiser  # noqa: E402
from unnoise.core import samplers  # noqa: E402
from unnoise.core.denoisers import VPDenoiser  # noqa: E402
from unnoise.core.schedules import VPSchedule, karras_sigmas, tau_sigmas  # noqa: E402


def _plain_posterior_mean(centers, std, x, sigma):
    """E[x0 | x] for the mixture, one sample and one component at a time."""
    out = []
    for row, s in zip(x.tolist(), sigma):
        v = std**2 + s**2
        logs = [-sum((a - b) ** 2 for a, b in zip(row, c)) / (2 * v) for c in centers.tolist()]
        top = max(logs)
        weights = [math.exp(lw - top) for lw in logs]
        means = [[ci + std**2 / v * (xi - ci) for xi, ci in zip(row, c)] for c in centers.tolist()]
        out.append([sum(w * m[d] for w, m in zip(weights, means)) / sum(weights) for d in range(len(row))])
    return torch.tensor(out, dtype=torch.float64)


def test_mixture_denoiser_equals_per_component_reference():
    centers = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.5, -0.5]], dtype=torch.float64)
    x = torch.tensor([[0.3, 0.2], [1.9, -0.8], [-40.0, 35.0], [0.0, 0.0]], dtype=torch.float64)
    denoiser = MixtureDenoiser(centers, component_std=0.5, chunk=3)  # chunk < batch: two chunks
    for sigma in (0.05, 1.0, 30.0):
        expected = _plain_posterior_mean(centers, 0.5, x, [sigma] * len(x))
        torch.testing.assert_close(denoiser(x, sigma), expected, rtol=1e-12, atol=1e-12)
    per_sample = torch.tensor([0.01, 0.5, 3.0, 100.0], dtype=torch.float64)
    expected = _plain_posterior_mean(centers, 0.5, x, per_sample.tolist())
    torch.testing.assert_close(denoiser(x, per_sample), expected, rtol=1e-12, atol=1e-12)


def test_epsilon_model_through_vp_adapter_is_the_denoiser():
    schedule = VPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    denoiser = MixtureDenoiser(torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 1.3, 14.0], dtype=torch.float64)
    ours = VPDenoiser(EpsilonModel(denoiser, schedule), schedule)
    torch.testing.assert_close(ours(x, sigma), denoiser(x, sigma), rtol=1e-9, atol=1e-9)


def test_gauss_pc_is_exact_for_one_gaussian_component():
    """The mixture of one component of std 0.5 is Gaussian data of the std gauss_pc assumes: exact on any grid."""
    center = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    denoiser = MixtureDenoiser(center, component_std=0.5)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    exact = center + (x - center) * 0.5 / math.sqrt(0.25 + 10.0**2)  # x - mu scales as sqrt(s^2 + sigma^2)
    for sigmas in (tau_sigmas(3, 10.0, 0.5), karras_sigmas(4, 0.03, 10.0)):
        out = samplers.sample(denoiser, x, sigmas, "gauss_pc")
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def tiny_problem():
    return bench.make_problem(num_digits=50, num_samples=4, reference_steps=40)


def test_benchmark_smoke_on_a_tiny_problem(tiny_problem, tmp_path):
    results = bench.run_all(tiny_problem, nfes=(5,))
    expected = len(bench.OURS) + len(DIFFUSERS_CONFIGS) + 1  # + gauss_pc with a mismatched sigma_data
    assert len(results) == expected
    for r in results:
        assert math.isfinite(r.rmse) and r.rmse > 0 and r.switched <= 4, r
        assert r.nfe == 5, r  # heun too: 3 steps, 5 evaluations
    for ours, theirs, diff in bench.agreement(results, nfe=5):
        assert diff < 1e-4, (ours, theirs, diff)
    pooled = bench.across_seeds(tiny_problem, results, seeds=(1,), nfe=5, reference_steps=40)
    top = [r for r in results if bench.starts_at_top(tiny_problem, r)]
    assert [r.label for r in pooled] == [r.label for r in top] and "euler leading" not in {r.label for r in top}
    assert all(p.rmse > 0 and p.switched <= 8 for p in pooled)
    md, png = bench.write_report(tmp_path, tiny_problem, results, [], 0.0, 1.0, quick=True, pooled=pooled, seeds=(0, 1))
    text = md.read_text()
    assert "python benchmarks/samplers.py --quick" in text
    assert "ratio ours / diffusers" in text and "Pooled over 2 problems" in text
    assert png.stat().st_size > 0


def test_steps_for_matches_the_nfe_budget():
    assert [bench.steps_for("heun", n) for n in (5, 10, 20, 50)] == [3, 5, 10, 25]
    assert [samplers.nfe("heun", bench.steps_for("heun", n)) for n in (5, 10, 20, 50)] == [5, 9, 19, 49]
    assert bench.steps_for("dpmpp_2m", 10) == 10
