"""Forward latency and peak memory of our U-Net and VAE against diffusers on identical weights (CPU).

    python benchmarks/models.py            # writes docs/benchmarks/models.md
    python benchmarks/models.py --quick    # fewer repeats, prints only

The config is Stable Diffusion 1.5's shape at reduced width (channels x 0.3 for the U-Net, / 2 for the VAE), so a
2-core CPU runs it in seconds: the U-Net on a CFG batch of 2 latents of 32x32 with 77 context tokens, the VAE
decoding one 32x32 latent to 256x256. Latency is the median of repeated calls, ours and diffusers' alternating in
one process, repeated in --processes fresh processes (default 3): the table gives the median over processes and
the ratio's range, since the ratio moves by a few percent from one process to the next. Peak memory is measured
per side in a fresh subprocess: the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after
a warm-up call) above the resident set before the measured call, with glibc told to return large blocks to the
system at once (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import SD15_UNET, SD15_VAE, build, import_diffusers  # noqa: E402
from unnoise.models.layers import Upsample2D, set_upsample_fusion  # noqa: E402
from unnoise.models.packing import kept_packed_bytes, prepare_for_inference, set_weight_packing  # noqa: E402

UNET = {**SD15_UNET, "block_out_channels": [96, 192, 384, 384], "sample_size": 32}
VAE = {**SD15_VAE, "block_out_channels": [64, 128, 256, 256], "sample_size": 256}
SETTINGS = {
    # the Pipeline's: ``prepare_for_inference`` on each of our models (conv weights packed in place, matrix products
    # through PyTorch; upsampling unfused in the U-Net, fused in the VAE)
    "default": {"prepare_for_inference": True},
    "packed_beside": {},  # a bare model's: each conv's packed weight kept beside the plain one, fused upsampling
    "channels_last": {"memory_format": torch.channels_last},
    "unfused_upsampling": {"fused_upsampling": False},  # ours only: nearest 2x then the 3x3 conv, as diffusers
    "unpacked_weights": {"weight_packing": False},  # ours only: PyTorch's conv/linear kernels, as diffusers
    # ours only: each conv's packed weight replaces the plain one (no copy kept); a fused upsampler still keeps its
    # packed phase kernel beside the 3x3 weight, which the unfused variant does not
    "packed_in_place": {"in_place_packing": True},
    "packed_in_place_unfused": {"in_place_packing": True, "fused_upsampling": False},
}


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 4, 32, 32, generator=g),
        "t": torch.tensor([500.0, 500.0]),
        "context": torch.randn(2, 77, 768, generator=g),
        "z": torch.randn(1, 4, 32, 32, generator=g),
    }


def calls(models, data):
    """The four timed calls: (our U-Net, diffusers' U-Net, our VAE decode, diffusers' VAE decode)."""
    unet, vae, d_unet, d_vae = models
    x, t, ctx, z = data["x"], data["t"], data["context"], data["z"]
    return {
        "unet": (lambda: unet(x, t, encoder_hidden_states=ctx), lambda: d_unet(x, t, encoder_hidden_states=ctx).sample),
        "vae_decode": (lambda: vae.decode(z), lambda: d_vae.decode(z).sample),
    }


def prepare(setting: str):
    diffusers = import_diffusers()
    models = build(diffusers, UNET, VAE, seed=0)
    data = inputs()
    if "memory_format" in SETTINGS[setting]:
        fmt = SETTINGS[setting]["memory_format"]
        for m in models:
            m.to(memory_format=fmt)
        data = {k: v.to(memory_format=fmt) if v.ndim == 4 else v for k, v in data.items()}
    if "fused_upsampling" in SETTINGS[setting]:
        for m in models[:2]:
            set_upsample_fusion(m, SETTINGS[setting]["fused_upsampling"])
    if "weight_packing" in SETTINGS[setting]:
        for m in models[:2]:
            set_weight_packing(m, SETTINGS[setting]["weight_packing"])
    if SETTINGS[setting].get("in_place_packing"):
        for m in models[:2]:
            set_weight_packing(m, True, in_place=True)
    if SETTINGS[setting].get("prepare_for_inference"):
        for m in models[:2]:
            prepare_for_inference(m)
    for m in models:
        m.eval()
    return models, data


def latency(setting: str, repeats: int) -> dict[str, dict[str, float]]:
    models, data = prepare(setting)
    result = {}
    with torch.inference_mode():
        for name, (ours, theirs) in calls(models, data).items():
            err = (ours() - theirs()).abs().max().item()
            times = {"ours": [], "diffusers": []}
            for _ in range(repeats):
                for side, fn in (("ours", ours), ("diffusers", theirs)):
                    start = time.perf_counter()
                    fn()
                    times[side].append(time.perf_counter() - start)
            med = {side: statistics.median(v) for side, v in times.items()}
            result[name] = {**med, "ratio": med["ours"] / med["diffusers"], "max_abs_diff": err}
    return result


def latency_in_processes(setting: str, repeats: int, processes: int) -> dict[str, dict[str, float]]:
    """``latency`` in ``processes`` fresh processes: per model, the median over processes of each side's time and
    of the ratio, and the ratio's range (a process's memory placement moves the ratio by a few percent)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for _ in range(processes):
        cmd = [sys.executable, __file__, "--latency-child", setting, str(repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    result = {}
    for name in runs[0]:
        per = [r[name] for r in runs]
        ratios = [r["ratio"] for r in per]
        result[name] = {
            "ours": statistics.median(r["ours"] for r in per),
            "diffusers": statistics.median(r["diffusers"] for r in per),
            "ratio": statistics.median(ratios),
            "ratio_range": (min(ratios), max(ratios)),
            "max_abs_diff": max(r["max_abs_diff"] for r in per),
        }
    return result


def _read_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(setting: str, name: str, side: int) -> None:
    """In a fresh process: warm up one call, reset the high-water mark, run it again, print the peak growth."""
    models, data = prepare(setting)
    fn = calls(models, data)[name][side]
    with torch.inference_mode():
        start = _read_kib("VmRSS")
        fn()
        warmup_mib = (_read_kib("VmRSS") - start) / 1024
        Path("/proc/self/clear_refs").write_text("5")
        before = _read_kib("VmRSS")
        fn()
        peak_mib = (_read_kib("VmHWM") - before) / 1024
    model = models[{"unet": 0, "vae_decode": 1}[name] + 2 * side]
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kept = kept_bytes(model)
    result = {"peak_mib": peak_mib, "warmup_mib": warmup_mib, "kept_mib": kept / 2**20, "weights_mib": weights / 2**20}
    print(json.dumps(result))


def kept_bytes(model: torch.nn.Module) -> int:
    """Bytes a model holds between calls beside its parameters: reordered weights (``kept_packed_bytes``) and the
    phase kernels of fused upsamplers (``Upsample2D``); 0 for diffusers' models."""
    caches = [m._cache[2] for m in model.modules() if isinstance(m, Upsample2D) and m._cache is not None]
    return kept_packed_bytes(model) + sum(t.numel() * t.element_size() for t in caches)


def peak(setting: str, name: str, side: int) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--peak-child", setting, name, str(side)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: dict, repeats: int, processes: int) -> str:
    lines = [
        "# Model forward: ours against diffusers on identical weights (CPU)",
        "",
        "Produced by `python benchmarks/models.py` (see its docstring for the method). "
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, fp32, median of {repeats} calls in each "
        f"of {processes} processes per setting.",
        "Stable Diffusion 1.5's U-Net and VAE shapes at reduced width: U-Net channels (96, 192, 384, 384), CFG batch "
        "of 2 at 32x32 latents, 77x768 context; VAE channels (64, 128, 256, 256) decoding one 32x32 latent to 256x256.",
        "",
        "`default` is the library's default for inference, what the Pipeline sets: "
        "`unnoise.models.packing.prepare_for_inference` on each model (conv weights packed in place, matrix "
        "products through PyTorch's kernels; upsampling unfused in the U-Net, fused in the VAE). `packed_beside` is a "
        "bare model's: each conv's weight reordered for oneDNN and kept beside the plain one, matrix products through "
        "oneDNN, fused upsampling; the other settings change that one thing.",
        "",
        "Peak = the resident-set growth during one call after a warm-up call. Between calls our models may also keep "
        "tensors derived from their weights: on the CPU a copy of each conv weight reordered for oneDNN "
        "(`unnoise.models.packing.packed_conv2d`) and each fused upsampler's phase kernel (`Upsample2D`); 'ours kept' "
        "adds up their sizes. 'Warm-up' is the resident-set growth over the first call, which holds those tensors "
        "and whatever the kernels' libraries keep (oneDNN's compiled kernels, thread buffers) on either side. "
        "'Total' = weights + warm-up + peak: what a process needs for the model and its calls. The `packed_in_place` "
        "settings pack each conv's weight in place of the plain one (`set_weight_packing(model, True, "
        "in_place=True)`): what is kept is the fused upsamplers' packed phase kernels, and nothing when upsampling "
        "runs unfused.",
        "",
        "| setting | model | ours (ms) | diffusers (ms) | latency ratio | ratio range | ours peak (MiB) "
        "| diffusers peak (MiB) | ours kept (MiB) | ours warm-up (MiB) | diffusers warm-up (MiB) | weights (MiB) "
        "| ours total (MiB) | diffusers total (MiB) | total ratio | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, per_model in results.items():
        for name, r in per_model.items():
            ours_total, theirs_total = _totals(r)
            lines.append(
                f"| {setting} | {name} | {r['ours'] * 1e3:.1f} | {r['diffusers'] * 1e3:.1f} | {r['ratio']:.3f} "
                f"| {r['ratio_range'][0]:.3f} - {r['ratio_range'][1]:.3f} | {r['peak_ours']:.0f} "
                f"| {r['peak_diffusers']:.0f} | {r['kept_ours']:.0f} | {r['warmup_ours']:.0f} "
                f"| {r['warmup_diffusers']:.0f} | {r['weights']:.0f} | {ours_total:.0f} | {theirs_total:.0f} "
                f"| {ours_total / theirs_total:.3f} | {r['max_abs_diff']:.1e} |"
            )
    lines += [
        "",
        "Goal: latency ratio <= 0.9 and total memory ratio <= 1.0. Ratios below 1 favour us. Settings run minutes "
        "apart, so each is compared with diffusers in its own run.",
        "",
    ]
    lines += _verdict(results)
    return "\n".join(lines)


def _totals(r: dict) -> tuple[float, float]:
    """(ours, diffusers) memory for the model and its calls: weights + warm-up growth + peak (MiB)."""
    return (
        r["weights"] + r["warmup_ours"] + r["peak_ours"],
        r["weights"] + r["warmup_diffusers"] + r["peak_diffusers"],
    )


def _verdict(results: dict) -> list[str]:
    """One line per setting and model, computed from the table above."""
    lines = []
    for setting, per_model in results.items():
        for name, r in per_model.items():
            ours_total, theirs_total = _totals(r)
            lat, mem = r["ratio"], ours_total / theirs_total
            met = lat <= 0.9 and mem <= 1.0
            lines.append(
                f"- {name}, {setting}: latency {lat:.2f}x, total memory {mem:.2f}x "
                f"({r['kept_ours']:.0f} MiB kept beside {r['weights']:.0f} MiB of weights): "
                f"{'both goals met' if met else 'goal not met'}."
            )
    return lines + [""]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats, default setting only, print only")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "models.md"))
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting (default: 3)")
    parser.add_argument("--peak-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--latency-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        setting, name, side = args.peak_child
        peak_child(setting, name, int(side))
        return {}
    if args.latency_child:
        setting, repeats = args.latency_child
        print(json.dumps(latency(setting, int(repeats))))
        return {}
    repeats = 3 if args.quick else args.repeats
    settings = ["default"] if args.quick else list(SETTINGS)
    results = {}
    for setting in settings:
        results[setting] = latency_in_processes(setting, repeats, 1 if args.quick else args.processes)
        for name, r in results[setting].items():
            ours, theirs = peak(setting, name, 0), peak(setting, name, 1)
            r["peak_ours"], r["peak_diffusers"] = ours["peak_mib"], theirs["peak_mib"]
            r["kept_ours"], r["weights"] = ours["kept_mib"], ours["weights_mib"]
            r["warmup_ours"], r["warmup_diffusers"] = ours["warmup_mib"], theirs["warmup_mib"]
    text = report(results, repeats, 1 if args.quick else args.processes)
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)
    return results


if __name__ == "__main__":
    main()
