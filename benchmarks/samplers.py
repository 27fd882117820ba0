"""Sampler error against the exact probability-flow ODE on MNIST treated as a Gaussian mixture: unnoise vs diffusers.

``python benchmarks/samplers.py`` writes ``samplers.md`` and ``samplers.png`` into ``--out`` (default
``docs/benchmarks``); ``--quick`` is a smoke run on a small problem that writes into a temporary folder.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.diffusers_runs import DIFFUSERS_CONFIGS, DiffusersConfig, run_diffusers  # noqa: E402
from benchmarks.mixture import EpsilonModel, MixtureDenoiser  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from unnoise.core import samplers  # noqa: E402
from unnoise.core.denoisers import VPDenoiser  # noqa: E402
from unnoise.core.schedules import VPSchedule, karras_sigmas  # noqa: E402
from unnoise.data import load_mnist  # noqa: E402

NFES = (5, 10, 20, 50)
EXTRA_SEEDS = (10, 20, 30, 40)  # more problems for the NFE-10 headline, whose RMSE hangs on a few mode switches
# Our samplers and the grids each runs on. DDIM (eta 0) is the Euler method in sigma space, so it is run on one
# grid only, the one diffusers' DDIMScheduler trailing config uses, as an agreement check.
OURS: tuple[tuple[str, str], ...] = (
    *(("euler", g) for g in ("karras", "exponential", "trailing", "linspace", "leading")),
    ("ddim", "trailing"),
    *(("heun", g) for g in ("karras", "exponential", "trailing", "linspace")),
    *(("dpmpp_2m", g) for g in ("karras", "exponential", "trailing", "linspace", "leading")),
    *(("unipc", g) for g in ("karras", "exponential", "trailing", "linspace", "leading")),
    *(("gauss_pc", g) for g in ("karras", "tau")),
)
# gauss_pc assumes the data std of the denoiser (0.5 here, which the mixture's component std matches): this row
# runs it with a wrong guess to show what that costs.
MISMATCHED_SIGMA_DATA = 1.0
# Same model, same grid, same start: these pairs must agree to float32 round-off (diffusers steps in float32).
AGREEMENT = (
    ("ddim trailing", "DDIM trailing"),
    ("dpmpp_2m trailing", "DPM++ 2M trailing"),
    ("unipc trailing", "UniPC trailing"),
)
REFERENCE_SIGMA_END = 1e-4  # the reference grid's last sigma before 0; its jump to 0 errs by O(sigma^2)


@dataclass
class Problem:
    """The ideal denoiser of a digit mixture, its VP epsilon-model view, and a fixed batch of unit noise."""

    denoiser: MixtureDenoiser
    schedule: VPSchedule
    eps_model: EpsilonModel
    noise: Tensor
    reference_steps: int = 1000
    references: dict[tuple[float, float], Tensor] = field(default_factory=dict)

    @property
    def ours(self) -> VPDenoiser:
        """Our side sees the epsilon model through the VP adapter, at exact (unrounded) timesteps."""
        return VPDenoiser(self.eps_model, self.schedule)

    @property
    def ours_mismatched(self) -> VPDenoiser:
        return VPDenoiser(self.eps_model, self.schedule, sigma_data=MISMATCHED_SIGMA_DATA)


def make_problem(
    num_digits: int = 2000,
    num_samples: int = 128,
    *,
    seed: int = 0,
    component_std: float = 0.5,
    reference_steps: int = 1000,
    cache_dir: str | None = None,
) -> Problem:
    """A seeded subset of MNIST in [-1, 1] as mixture centers on Stable Diffusion's schedule, and seeded noise."""
    images, _ = load_mnist(cache_dir)
    subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_digits]
    centers = torch.from_numpy(images.reshape(len(images), -1)[subset.numpy()]).to(torch.float64) / 127.5 - 1
    denoiser = MixtureDenoiser(centers, component_std)
    schedule = VPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(num_samples, centers.shape[1], generator=generator, dtype=torch.float64)
    return Problem(denoiser, schedule, EpsilonModel(denoiser, schedule), noise, reference_steps)


def solve_reference(problem: Problem, sigma_start: float, start_scale: float, steps: int) -> Tensor:
    """The ODE solution at sigma 0 from ``noise * start_scale`` at ``sigma_start``: DPM-Solver++(2M), dense karras."""
    sigmas = karras_sigmas(steps, REFERENCE_SIGMA_END, sigma_start)
    return samplers.sample_dpmpp_2m(problem.denoiser, problem.noise * start_scale, sigmas)


def reference(problem: Problem, sigma_start: float, start_scale: float) -> Tensor:
    """``solve_reference``, cached per start; starts that agree to float32 precision share one solution.

    The start at the top of the schedule, which most runs share, gets ``reference_steps``; the others (leading
    spacing, Euler's ``init_noise_sigma``) half as many, which ``reference_convergence`` shows is enough.
    """
    for (sigma, scale), x in problem.references.items():
        if math.isclose(sigma, sigma_start, rel_tol=1e-6) and math.isclose(scale, start_scale, rel_tol=1e-6):
            return x
    sigma_max = problem.schedule.sigma_max
    top = math.isclose(sigma_start, sigma_max, rel_tol=1e-6) and math.isclose(
        start_scale, math.sqrt(1 + sigma_max**2), rel_tol=1e-6
    )
    steps = problem.reference_steps if top else problem.reference_steps // 2
    x = solve_reference(problem, sigma_start, start_scale, steps)
    problem.references[(sigma_start, start_scale)] = x
    return x


# -- one run: a sampler, a grid and an NFE budget ------------------------------------------------------------------


@dataclass
class Result:
    label: str
    family: str  # "ours" or "diffusers"
    nfe: int
    rmse: float  # over all samples and pixels, in [-1, 1] pixel units
    median: float  # median over samples of the per-sample RMSE: the typical error without rare outliers
    switched: int  # samples whose nearest digit differs from the reference's: they went to another mode
    sigma_start: float
    start_scale: float
    x: Tensor = field(repr=False)


def steps_for(method: str, nfe: int) -> int:
    """The most steps for which ``samplers.nfe(method, steps)`` does not exceed ``nfe``."""
    steps = nfe
    while samplers.nfe(method, steps) > nfe:
        steps -= 1
    return steps


def our_grid(schedule: VPSchedule, spacing: str, steps: int) -> Tensor:
    """``schedule.sigmas_for``; leading uses Stable Diffusion's steps_offset=1."""
    return schedule.sigmas_for(steps, spacing, steps_offset=1 if spacing == "leading" else 0)


def run_ours(problem: Problem, method: str, spacing: str, nfe: int, *, mismatched: bool = False) -> Result:
    """Our sampler on our grid from ``noise * sqrt(1 + sigma_0^2)``, as the samplers module documents."""
    steps = steps_for(method, nfe)
    sigmas = our_grid(problem.schedule, spacing, steps)
    denoiser = problem.ours_mismatched if mismatched else problem.ours
    x = _counted(
        problem, samplers.nfe(method, steps), samplers.sample, denoiser, _start(problem, sigmas), sigmas, method
    )
    label = f"{method} {spacing}" + (f", sigma_data {MISMATCHED_SIGMA_DATA:g} (mismatched)" if mismatched else "")
    return _score(problem, label, "ours", samplers.nfe(method, steps), x, float(sigmas[0]))


def run_theirs(problem: Problem, config: DiffusersConfig, nfe: int) -> Result:
    calls = problem.denoiser.calls
    x, sigma_start, scale, used = run_diffusers(config, problem.eps_model, problem.noise, nfe)
    assert problem.denoiser.calls - calls == used <= nfe, f"{config.label}: {used} model calls for NFE {nfe}"
    return _score(problem, config.label, "diffusers", used, x, sigma_start, scale)


def _start(problem: Problem, sigmas: Tensor) -> Tensor:
    return problem.noise * math.sqrt(1 + float(sigmas[0]) ** 2)


def _counted(problem: Problem, nfe: int, fn, *args) -> Tensor:
    calls = problem.denoiser.calls
    x = fn(*args)
    assert problem.denoiser.calls - calls == nfe, f"{problem.denoiser.calls - calls} evaluations, expected {nfe}"
    return x


def _score(problem, label, family, nfe, x, sigma_start, scale=None) -> Result:
    scale = math.sqrt(1 + sigma_start**2) if scale is None else scale
    ref = reference(problem, sigma_start, scale)
    per_sample = (x - ref).pow(2).mean(1)
    centers = problem.denoiser.centers
    switched = int((torch.cdist(x, centers).argmin(1) != torch.cdist(ref, centers).argmin(1)).sum())
    rmse = float(per_sample.mean().sqrt())
    return Result(label, family, nfe, rmse, float(per_sample.sqrt().median()), switched, sigma_start, scale, x)


def run_all(problem: Problem, nfes=NFES, *, only: set[str] | None = None, verbose: bool = False) -> list[Result]:
    """Every deterministic sampler of ours and of diffusers (or those labelled in ``only``)."""
    results = []
    for nfe in nfes:
        for method, spacing in OURS:
            if only is None or f"{method} {spacing}" in only:
                results.append(run_ours(problem, method, spacing, nfe))
        results += [run_theirs(problem, c, nfe) for c in DIFFUSERS_CONFIGS if only is None or c.label in only]
        mismatched = run_ours(problem, "gauss_pc", "tau", nfe, mismatched=True)
        if only is None or mismatched.label in only:
            results.append(mismatched)
        if verbose:
            print(f"NFE {nfe}: done, {problem.denoiser.calls} evaluations so far", flush=True)
    return results


def starts_at_top(problem: Problem, result: Result) -> bool:
    """Whether a run started at sigma_max from ``noise * sqrt(1 + sigma_max^2)``, as most do."""
    sigma_max = problem.schedule.sigma_max
    return math.isclose(result.sigma_start, sigma_max, rel_tol=1e-6) and math.isclose(
        result.start_scale, math.sqrt(1 + sigma_max**2), rel_tol=1e-6
    )


def across_seeds(problem: Problem, results: list[Result], seeds, nfe: int = 10, **kwargs) -> list[Result]:
    """Pool the NFE-``nfe`` runs that start at the top over more problems (digit subsets and noise) per seed.

    A pooled result's RMSE is over all problems' samples, its median the mean of the medians, and its
    ``switched`` the total; one reference per problem serves all of them.
    """
    first = [r for r in results if r.nfe in (nfe, nfe - 1) and starts_at_top(problem, r)]
    runs = [first]
    for seed in seeds:
        extra = make_problem(len(problem.denoiser.centers), len(problem.noise), seed=seed, **kwargs)
        runs.append(run_all(extra, (nfe,), only={r.label for r in first}))
    pooled = []
    for group in zip(*runs):
        assert len({r.label for r in group}) == 1
        mse = sum(r.rmse**2 for r in group) / len(group)
        median = sum(r.median for r in group) / len(group)
        switched = sum(r.switched for r in group)
        head = group[0]
        pooled.append(
            Result(
                head.label,
                head.family,
                head.nfe,
                mse**0.5,
                median,
                switched,
                head.sigma_start,
                head.start_scale,
                head.x,
            )
        )
    return pooled


def reference_convergence(problem: Problem) -> float:
    """RMSE between the reference at half and at full steps, from the top of the schedule."""
    sigma_max = problem.schedule.sigma_max
    scale = math.sqrt(1 + sigma_max**2)
    half = solve_reference(problem, sigma_max, scale, problem.reference_steps // 2)
    return float((half - reference(problem, sigma_max, scale)).pow(2).mean().sqrt())


def agreement(results: list[Result], nfe: int = 10) -> list[tuple[str, str, float]]:
    """Max abs difference of outputs between our sampler and diffusers' on the identical grid and start."""
    by_label = {(r.label, r.nfe): r for r in results}
    return [
        (a, b, float((by_label[a, nfe].x - by_label[b, nfe].x).abs().max()))
        for a, b in AGREEMENT
        if (a, nfe) in by_label and (b, nfe) in by_label
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 digits, 16 samples, NFE 5 and 10: a smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for samplers.md and samplers.png (default docs/benchmarks, or a temporary folder with --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (Path(tempfile.gettempdir()) / "unnoise-benchmarks" if args.quick else Path("docs/benchmarks"))
    started = time.time()
    if args.quick:
        sizes, nfes, seeds = dict(num_digits=200, num_samples=16, reference_steps=200), (5, 10), (10,)
    else:
        sizes, nfes, seeds = {}, NFES, EXTRA_SEEDS
    problem = make_problem(**sizes)
    results = run_all(problem, nfes, verbose=True)
    convergence = reference_convergence(problem)
    pooled = across_seeds(problem, results, seeds, reference_steps=problem.reference_steps)
    seconds = time.time() - started
    md, png = write_report(
        out,
        problem,
        results,
        agreement(results),
        convergence,
        seconds,
        quick=args.quick,
        pooled=pooled,
        seeds=(0, *seeds),
    )
    print(f"wrote {md} and {png} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
