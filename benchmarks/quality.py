"""Sample quality of the embedded default model: FID-MNIST and prompt adherence against NFE and guidance scale.

    python benchmarks/quality.py              # docs/benchmarks/quality.{md,json} + 2 PNGs, ~10-15 min on 2 cores
    python benchmarks/quality.py --estimate   # times a few images and prints the projected runtime only

For each of ddim, euler, dpmpp_2m and unipc at NFE 5, 10, 20 and 50 (the model's default guidance scale), and for
the default sampler at 20 steps with guidance 1, 2, 3, 5 and 7.5, the same N prompts and seeds (image k: digit
k // (N/10), the caption templates in equal shares, seed k) are generated and measured with ``unnoise.eval``:
FID in the MNIST classifier's feature space against the 9,000 training digits, KID, precision/recall (k=3) and
adherence. The real-vs-real floor is the FID of N held-out validation digits against the same reference, over
disjoint subsets: FID is biased upward at small N, and the floor at the same N is what a perfect model would score.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine  # noqa: E402
from unnoise.eval.evaluate import Context, Setting, header, resolve_setting, stderr_progress, sweep  # noqa: E402
from unnoise.eval.features import MNISTFeatures  # noqa: E402
from unnoise.eval.measure import Scorers, measure  # noqa: E402
from unnoise.eval.reference import load_reference, real_vs_real_floor  # noqa: E402
from unnoise.eval.report import metric_values, plot, sweep_table  # noqa: E402
from unnoise.eval.samples import SamplePlan, digit_plan, generated_batches  # noqa: E402
from unnoise.models.classifier import SHIPPED_WEIGHTS  # noqa: E402
from unnoise.pipeline import Pipeline  # noqa: E402
from unnoise.pipeline.loading import DEFAULT_MODEL  # noqa: E402
from unnoise.train.distributed import World  # noqa: E402

COMMAND = "python benchmarks/quality.py"
METRICS = ("fid", "kid", "pr", "adherence")
PLOT_FILES = {"nfe": "quality-fid-vs-nfe.png", "guidance": "quality-fid-vs-adherence.png"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pipeline folder (default: the embedded model)")
    p.add_argument("-n", "--num-images", type=int, default=200, help="images per setting, a multiple of 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", type=lambda t: t.split(","), default=["ddim", "euler", "dpmpp_2m", "unipc"])
    p.add_argument("--nfe", type=lambda t: [int(x) for x in t.split(",")], default=[5, 10, 20, 50])
    p.add_argument("--guidance", type=floats, default=[1.0, 2.0, 3.0, 5.0, 7.5])
    p.add_argument("--guidance-steps", type=int, default=20, help="steps of the guidance sweep (default sampler)")
    p.add_argument("--reference", default="mnist-train", help="reference of the FID (default: %(default)s)")
    p.add_argument("--held-out", default="mnist-val", help="real images of the floor (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--cache-dir", type=Path, help="reference feature cache (default: the unnoise cache)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="folder of quality.md and PNGs")
    p.add_argument("--estimate", action="store_true", help="time a few images and print the projected runtime")
    return p.parse_args(argv)


def settings_for(pipe: Pipeline, args: argparse.Namespace) -> list[Setting]:
    """Samplers x NFE at the model's guidance, then the default sampler's guidance sweep (shared points once)."""
    grid = []
    for sampler in args.samplers:
        for nfe in args.nfe:
            setting = resolve_setting(pipe, sampler=sampler, steps=nfe)
            if setting.nfe != nfe:
                raise ValueError(
                    f"{sampler} makes {setting.nfe} network evaluations in {nfe} steps; use one-step samplers"
                )
            grid.append(setting)
    for scale in args.guidance:
        setting = resolve_setting(pipe, steps=args.guidance_steps, guidance_scale=scale)
        if setting not in grid:
            grid.append(setting)
    return grid


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model / "pipeline.json").is_file():
        raise SystemExit(f"{args.model} holds no pipeline.json: build the default model first (make default-model)")
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    pipe = Pipeline.from_pretrained(args.model)
    features = MNISTFeatures.load(SHIPPED_WEIGHTS)
    plan = digit_plan(args.num_images, args.seed)
    settings = settings_for(pipe, args)
    reference = load_reference(args.reference, features, cache_dir=args.cache_dir)
    held_out = load_reference(args.held_out, features, cache_dir=args.cache_dir)
    floor = real_vs_real_floor(reference, held_out, len(plan))
    world = World(0, 1, torch.device("cpu"))
    ctx = Context(Scorers(features, classifier=features), METRICS, reference, floor, world, args.batch_size,
                  stderr_progress("quality"))  # fmt: skip
    if args.estimate:
        print(estimate(pipe, settings, ctx, plan))
        return None
    points = sweep(pipe, plan, settings, ctx)
    record = header(ctx, {"model": pipe.name, "model_hash": pipe.model_hash}, plan.source, len(plan), plan.seed)
    record |= {
        "points": points,
        "floor_all_held_out": real_vs_real_floor(reference, held_out, len(held_out.features)).to_dict(),
        "default": resolve_setting(pipe).to_dict(),
        "classifier_val_accuracy": _classifier_accuracy(),
        "command": COMMAND,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "load_average": [load_start, os.getloadavg()[0]],
        "seconds": time.perf_counter() - start,
    }
    write(record, args.out)
    return record


def estimate(pipe: Pipeline, settings: list[Setting], ctx: Context, plan: SamplePlan) -> str:
    """Time the first digit's share of the plan (its blocks of caption templates, as in the run) at 5 and 10 steps
    of the default setting, and project the whole run from the per-step and fixed costs."""
    share = len(plan) // 10
    default = resolve_setting(pipe)
    seconds = {}
    for steps in (5, 10):
        call = dict(sampler=default.sampler, steps=steps, guidance_scale=default.guidance_scale)
        start = time.perf_counter()
        measure(generated_batches(pipe, plan, range(share), batch_size=ctx.batch_size, **call), ctx.scorers)
        seconds[steps] = time.perf_counter() - start
    per_step = max(seconds[10] - seconds[5], 0.0) / 5  # one guided step of one digit's share
    fixed = max(seconds[5] - 5 * per_step, 0.0)  # text encoding, decoding, features of one digit's share
    total = sum(10 * (fixed + s.steps * per_step * (0.5 if s.guidance_scale == 1 else 1.0)) for s in settings)
    return (
        f"{len(settings)} settings x {len(plan)} images: {per_step / share * 1e3:.1f} ms per guided image-step and "
        f"{fixed / share * 1e3:.0f} ms fixed per image (in blocks of one caption) -> about {total / 60:.1f} min"
    )


def _classifier_accuracy() -> float | None:
    metrics = SHIPPED_WEIGHTS / "metrics.json"
    return json.loads(metrics.read_text())["val_accuracy"] if metrics.is_file() else None


# -- the report -----------------------------------------------------------------------------------------------------


def write(record: dict, out: Path) -> list[Path]:
    """quality.json, the PNGs and quality.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    plots = {kind: name for kind, name in PLOT_FILES.items() if plot(kind, record, out / name)}
    (out / "quality.md").write_text(markdown(record, plots))
    return [out / "quality.md", out / "quality.json", *(out / name for name in plots.values())]


def markdown(record: dict, plots: dict[str, str]) -> str:
    points, default = record["points"], record["default"]
    floor, floor_all = points[0]["metrics"]["fid_floor"], record["floor_all_held_out"]
    n, ref = record["num_images"], record["reference"]
    accuracy = record["classifier_val_accuracy"]
    lines = [
        "# Sample quality of the embedded default model: FID-MNIST and adherence against NFE and guidance",
        "",
        f"Produced by `{record['command']}` on {record['date']} in {record['seconds'] / 60:.1f} min (the script's "
        f"docstring gives the method). Machine: {record['machine']}; load average {record['load_average'][0]:.2f} "
        f"at the start, {record['load_average'][1]:.2f} at the end.",
        "",
        f"- model: `{record['source']['model']}` (U-Net hash {record['source']['model_hash']}); its defaults: "
        f"{default['sampler']}, {default['steps']} steps, guidance {default['guidance_scale']:g}, "
        f"{default['spacing']} spacing (every setting below uses this spacing)",
        f"- images: {n} per setting ({record['prompts']}); image k has seed {record['seed']} + k in every setting, "
        "so settings differ only in how they sample (common random numbers); N is set by the run-time budget of "
        "about 15 minutes on 2 CPU cores (each pipeline call takes one caption, so the 90 captions cost 90 calls "
        "per setting)",
        f"- FID-MNIST: Fréchet distance of the 128-d penultimate features of the project's MNIST classifier "
        f"(`{record['feature_space']}`) against `{ref['name']}` ({ref['count']} digits"
        + (", the model's training data); " if ref["name"] == "mnist-train" else "); ")
        + "KID and precision/recall (k = 3) in the same features",
        "- adherence: the share of images the classifier reads as the prompted digit"
        + (f"; on real validation digits it reads {accuracy:.1%} correctly, the ceiling" if accuracy else ""),
        "",
        f"**Real-vs-real floor.** FID is biased upward at small N (the estimated covariances are noisy, and the "
        f"bias shrinks roughly as 1/N), so a number means something only beside the floor at the same N: "
        f"{floor['n']} held-out `{floor['held_out']}` digits against the same reference score "
        f"**{floor['mean']:.3f} ± {floor['std']:.3f}** (mean and std over {_subsets(floor)}); all "
        f"{floor_all['n']} of them score {floor_all['mean']:.3f}. A model at the floor is as close to the training "
        "digits as unseen real digits are; the floor's std is the sampling noise of one FID at this N.",
        "",
        f"## Against NFE (guidance {default['guidance_scale']:g})",
        "",
        *_nfe_table(points, default["guidance_scale"]),
        "",
        "NFE counts denoiser evaluations per image; with guidance != 1 each runs the U-Net on the conditional and "
        "the unconditional input in one batch.",
    ]
    if "nfe" in plots:
        lines += ["", f"![FID-MNIST against NFE per sampler]({plots['nfe']})"]
    lines += ["", f"## Against guidance ({default['sampler']}, {_guidance_steps(points, default)} steps)", ""]
    lines += _guidance_table(points, default)
    if "guidance" in plots:
        lines += ["", f"![FID-MNIST against adherence across guidance scales]({plots['guidance']})"]
    lines += ["", "## Every setting", "", *sweep_table(points), ""]
    return "\n".join(lines)


def _nfe_table(points: list[dict], scale: float) -> list[str]:
    rows: dict[str, dict[int, dict]] = {}
    for p in points:
        if p["settings"]["guidance_scale"] == scale:
            rows.setdefault(p["settings"]["sampler"], {})[p["settings"]["nfe"]] = p
    nfes = sorted({nfe for row in rows.values() for nfe in row})
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for sampler, row in rows.items():
        cells = [_cell(row[n]) if n in row else "" for n in nfes]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: FID-MNIST (adherence)."]


def _guidance_steps(points: list[dict], default: dict) -> int:
    scales = {}
    for p in points:
        if p["settings"]["sampler"] == default["sampler"]:
            scales.setdefault(p["settings"]["steps"], set()).add(p["settings"]["guidance_scale"])
    return max(scales, key=lambda steps: len(scales[steps]))


def _guidance_table(points: list[dict], default: dict) -> list[str]:
    steps = _guidance_steps(points, default)
    chosen = [p for p in points if p["settings"]["sampler"] == default["sampler"] and p["settings"]["steps"] == steps]
    names = list(metric_values(chosen[0]["metrics"]))
    lines = ["| guidance | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for p in sorted(chosen, key=lambda p: p["settings"]["guidance_scale"]):
        values = metric_values(p["metrics"])
        lines.append(f"| {p['settings']['guidance_scale']:g} | " + " | ".join(values[k] for k in names) + " |")
    return lines


def _subsets(floor: dict) -> str:
    return f"{floor['subsets']} disjoint subsets" if floor["subsets"] > 1 else "one subset"


def _cell(point: dict) -> str:
    m = point["metrics"]
    return f"{m['fid']:.2f} ({m['adherence']['overall']:.0%})"


if __name__ == "__main__":
    main()
