"""Evaluation records as files: JSON, markdown tables and, for sweeps, PNG plots (FID against NFE per sampler;
FID against adherence across guidance scales, the guidance trade-off curve).

matplotlib is a dev dependency: it is imported only to draw, and ``require_matplotlib`` says how to get it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from unnoise.eval.adherence import Adherence

PLOTS = {"nfe": "fid_vs_nfe.png", "guidance": "fid_vs_adherence.png"}


def write_eval(record: dict, out: Path) -> list[Path]:
    """``eval.json`` and ``eval.md`` in the folder ``out``."""
    return _write(out, "eval", record, eval_markdown(record))


def write_sweep(record: dict, out: Path, *, plots: bool = True, prefix: str = "") -> list[Path]:
    """``sweep.json``, ``sweep.md`` and (with ``plots``) the two PNG plots, in the folder ``out``."""
    images = {}
    if plots:
        out.mkdir(parents=True, exist_ok=True)
        images = {kind: out / f"{prefix}{name}" for kind, name in PLOTS.items()}
        images = {kind: path for kind, path in images.items() if plot(kind, record, path)}
    paths = _write(out, f"{prefix}sweep", record, sweep_markdown(record, {k: p.name for k, p in images.items()}))
    return paths + list(images.values())


def _write(out: Path, stem: str, record: dict, markdown: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(record, indent=2) + "\n")
    paths[1].write_text(markdown)
    return paths


# -- markdown -------------------------------------------------------------------------------------------------


def describe_header(record: dict) -> list[str]:
    """Bullet lines: what was measured, against what, in which feature space."""
    source, ref = record["source"], record["reference"]
    if "images" in source:
        what = f"the images in `{source['images']}`"
    else:
        what = f"model `{source['model']}` (U-Net hash {source['model_hash']})"
    lines = [f"- evaluated: {what}, {record['num_images']} images"]
    if record.get("prompts"):
        seeds = (
            f", seeds {record['seed']}..{record['seed'] + record['num_images'] - 1}"
            if record["seed"] is not None
            else ""
        )
        lines.append(f"- prompts: {record['prompts']}{seeds}")
    lines.append(f"- features: `{record['feature_space']}`, {record['feature_description']}")
    count = f"{ref['count']} images" if ref["count"] is not None else "statistics only"
    lines.append(f"- reference: `{ref['name']}` ({count})")
    lines.append(f"- processes: {record['world_size']} on {record['device']}")
    return lines


def describe_setting(settings: dict | None) -> str:
    if settings is None:
        return "as found"
    s = settings
    return (
        f"{s['sampler']}, {s['steps']} steps (NFE {s['nfe']}), guidance {s['guidance_scale']:g}, {s['spacing']} spacing"
    )


def describe_floor(floor: dict | None) -> str:
    if floor is None:
        return "not computed (no held-out real set: --floor)"
    subsets = f"{floor['subsets']} disjoint subsets" if floor["subsets"] > 1 else "one subset"
    return f"{floor['mean']:.3f} ± {floor['std']:.3f} ({floor['n']} `{floor['held_out']}` images, {subsets})"


def eval_markdown(record: dict) -> str:
    m = record["metrics"]
    lines = ["# unnoise eval", "", *describe_header(record), f"- setting: {describe_setting(record['settings'])}"]
    lines += [
        f"- time: {record['seconds']['total']:.1f} s",
        "",
        "| metric | value | real-vs-real floor |",
        "|---|---:|---|",
    ]
    for name, value in metric_values(m).items():
        floor = describe_floor(m["fid_floor"]) if name == "FID" else ""
        lines.append(f"| {name} | {value} | {floor} |")
    if "adherence" in m and len(m["adherence"]["per_digit"]) == 10:
        a = m["adherence"]
        per_digit = {int(d): v for d, v in a["per_digit"].items()}
        adherence = Adherence(per_digit, a["overall"], np.asarray(a["confusion"]), record["num_images"] // 10, {})
        lines += ["", "Adherence per prompted digit:", "", adherence.markdown()]
    return "\n".join(lines) + "\n"


def metric_values(m: dict) -> dict[str, str]:
    """Formatted values of the metrics a record holds, by display name."""
    values = {}
    if "fid" in m:
        values["FID"] = f"{m['fid']:.3f}"
    if "kid" in m:
        values["KID"] = f"{m['kid']['mean']:.5f} ± {m['kid']['std']:.5f}"
    if "precision" in m:
        values["precision"] = f"{m['precision']:.3f}"
        values["recall"] = f"{m['recall']:.3f}"
    if "adherence" in m:
        values["adherence"] = f"{m['adherence']['overall']:.1%}"
    if "inception_score" in m:
        values["Inception Score"] = f"{m['inception_score']['mean']:.3f} ± {m['inception_score']['std']:.3f}"
    if "clip_score" in m:
        values["CLIP score"] = f"{m['clip_score']:.2f}"
    return values


def sweep_table(points: list[dict]) -> list[str]:
    """A markdown table, one row per setting."""
    names = list(metric_values(points[0]["metrics"]))
    lines = ["| sampler | steps | NFE | guidance | " + " | ".join(names) + " | seconds |"]
    lines.append("|---|---:|---:|---:|" + "---:|" * len(names) + "---:|")
    for p in points:
        s, values = p["settings"], metric_values(p["metrics"])
        cells = [s["sampler"], str(s["steps"]), str(s["nfe"]), f"{s['guidance_scale']:g}"]
        cells += [values[name] for name in names] + [f"{p['seconds']['total']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sweep_markdown(record: dict, plots: dict[str, str] | None = None) -> str:
    points = record["points"]
    lines = ["# unnoise eval sweep", "", *describe_header(record)]
    if "fid" in points[0]["metrics"]:
        lines.append(f"- real-vs-real FID floor: {describe_floor(points[0]['metrics']['fid_floor'])}")
    lines += ["", *sweep_table(points)]
    for kind, name in (plots or {}).items():
        lines += ["", f"![{'FID against NFE' if kind == 'nfe' else 'FID against adherence'}]({name})"]
    return "\n".join(lines) + "\n"


# -- plots --------------------------------------------------------------------------------------------------------


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a RuntimeError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "PNG plots need matplotlib, a dev dependency of unnoise: pip install matplotlib (or unnoise[dev]); "
            "or pass --no-plots for the table alone"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(kind: str, record: dict, path: Path) -> bool:
    """Draw plot ``kind`` (a key of ``PLOTS``) of a sweep record to ``path``; False if it has no curve (no axis
    with two values)."""
    points = [p for p in record["points"] if "fid" in p["metrics"]]
    if kind == "nfe":
        curves = _curves(points, key=("sampler", "guidance_scale"), x=lambda p: p["settings"]["nfe"])
    else:
        points = [p for p in points if "adherence" in p["metrics"]]
        curves = _curves(points, key=("sampler", "steps"), x=lambda p: 100 * p["metrics"]["adherence"]["overall"])
    if not curves:
        return False
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, curve in curves.items():
        xs, ys, _ = zip(*curve)
        ax.plot(xs, ys, "o-", label=label)
        if kind == "guidance":
            for x, y, p in curve:
                ax.annotate(f"{p['settings']['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    floor = points[0]["metrics"]["fid_floor"]
    if floor is not None:
        ax.axhline(floor["mean"], color="gray", linestyle="--", label=f"real vs real ({floor['n']} images)")
        ax.axhspan(floor["mean"] - floor["std"], floor["mean"] + floor["std"], color="gray", alpha=0.15)
    if kind == "nfe":
        nfes = sorted({x for curve in curves.values() for x, _, _ in curve})
        ax.set_xscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE (denoiser evaluations per image)")
        ax.set_title("FID against NFE per sampler")
    else:
        ax.set_xlabel("prompt adherence (%)")
        ax.set_title("FID against adherence across guidance scales (labels: scale)")
    ax.set_ylabel(f"FID ({record['feature_space']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _curves(points: list[dict], key: tuple[str, str], x: Any) -> dict[str, list[tuple[float, float, dict]]]:
    """Points grouped by the two settings in ``key``, sorted by ``x``; groups with one point are no curve."""
    groups: dict[tuple, list] = defaultdict(list)
    for p in points:
        groups[tuple(p["settings"][k] for k in key)].append((x(p), p["metrics"]["fid"], p))
    vary = {k: len({g[i] for g in groups}) > 1 for i, k in enumerate(key)}
    curves = {}
    for group, curve in groups.items():
        if len(curve) < 2:
            continue
        label = str(group[0]) + (f", {key[1].replace('_scale', '')} {group[1]:g}" if vary[key[1]] else "")
        curves[label] = sorted(curve, key=lambda c: c[0])
    return curves
