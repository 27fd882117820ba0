"""A measured fine-tune: the "upside down" LoRA on the embedded default model, trained and scored by the classifier.

    python benchmarks/lora.py                         # train configs/mnist-lora-upside-down.toml, evaluate, write
                                                      # docs/benchmarks/lora.md (about 20 min training + 10 min eval)
    python benchmarks/lora.py --run runs/mnist-lora-upside-down   # evaluate a finished run of that config
    python benchmarks/lora.py --images 20 --out /tmp/lora.md      # fewer images per digit-prompt, elsewhere

The config trains a LoRA on the default model with ``data.upside_down``: a share of the MNIST training digits rotated
by 180 degrees and captioned "an upside down handwritten 7" and the like (``UPSIDE_DOWN_TEMPLATES``), the rest as
before. Three figures, each from ``--images`` images per digit with the caption templates in equal shares and the
seeds of ``unnoise.eval.digit_adherence`` (image j of digit d: seed 1000 d + j), at the pipeline's sampling defaults:

- upside-down adherence without the LoRA and with it: the upside-down phrasing of each template, the images rotated
  back by 180 degrees and read by the shipped MNIST classifier. Some digits look alike after a half turn, so an
  upright drawing would pass for them without anything being learnt. Which ones is measured, not assumed: the
  classifier reads the MNIST validation digits rotated by 180 degrees, and a digit is scored only if fewer than half
  of its rotated digits are read as itself (``AMBIGUOUS_SHARE``). 0, 1 and 8 are (near) point-symmetric and 5 is
  S-like, so those four are listed but not scored. 6 and 9 swap when rotated, so they are scored: an upright 6
  turned back reads as 9 and fails (a 9 drawn for "upside down 6" would pass, rightly: it is what an upside-down 6
  looks like).
- plain adherence with the LoRA loaded: the ordinary prompts, images as generated (all ten digits): the base
  behaviour must stay.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine  # noqa: E402
from unnoise.data.captions import TEMPLATES, caption  # noqa: E402
from unnoise.data.mnist import MNIST  # noqa: E402
from unnoise.eval.adherence import Adherence, digit_adherence  # noqa: E402
from unnoise.models.classifier import DigitClassifier, load_classifier  # noqa: E402
from unnoise.models.io import load_model, load_state, read_json  # noqa: E402
from unnoise.models.lora import ATTENTION_TARGETS  # noqa: E402
from unnoise.pipeline import Pipeline  # noqa: E402
from unnoise.pipeline.loading import DEFAULT_MODEL  # noqa: E402
from unnoise.train import config_from_dict, load_config, train  # noqa: E402
from unnoise.train.config import TrainConfig  # noqa: E402
from unnoise.train.distributed import setup  # noqa: E402
from unnoise.train.ema import EMA  # noqa: E402
from unnoise.train.loop import _Run  # noqa: E402

CONFIG = ROOT / "configs" / "mnist-lora-upside-down.toml"
AMBIGUOUS_SHARE = 0.5  # a digit is not scored when at least this share of its rotated real digits reads as itself
GOALS = {"upside_down": 0.90, "plain": 0.95}
TIMING = "timing.json"  # written into the run folder by a training run of this script


def upside_down(pipe: Pipeline) -> Callable[..., list[Image.Image]]:
    """``pipe`` asked in the upside-down phrasing of each plain caption, its images turned back by 180 degrees."""
    phrasing = {caption(d, t): caption(d, t, upside_down=True) for d in range(10) for t in range(len(TEMPLATES))}

    def generate(prompt: str, **kwargs) -> list[Image.Image]:
        return [image.transpose(Image.Transpose.ROTATE_180) for image in pipe(phrasing[prompt], **kwargs)]

    return generate


def rotation_readings(classifier: DigitClassifier) -> dict[int, float]:
    """Per digit, the share of the MNIST validation digits, rotated by 180 degrees, that the classifier reads as the
    same digit: how far it can tell an upside-down digit from an upright one."""
    data = MNIST("val", size=32)
    rotated = torch.from_numpy(data.images[:, ::-1, ::-1].copy()).float()[:, None] / 127.5 - 1.0
    read = classifier.predict(rotated).numpy()
    return {d: float((read[data.labels == d] == d).mean()) for d in range(10)}


def scored_digits(readings: dict[int, float]) -> tuple[int, ...]:
    """The digits whose rotation the classifier can tell (``AMBIGUOUS_SHARE``)."""
    return tuple(d for d, share in readings.items() if share < AMBIGUOUS_SHARE)


def scored(result: Adherence, digits: tuple[int, ...]) -> float:
    """Adherence over ``digits``, each counted by its images."""
    hits = sum(int(result.confusion[d, d]) for d in digits)
    return hits / sum(int(result.confusion[d].sum()) for d in digits)


def run_training(config: Path, out_dir: Path) -> dict:
    """Train ``config`` into ``out_dir``; wall and CPU seconds and load averages go to ``out_dir/timing.json``."""
    cfg = load_config(config, {"out_dir": str(out_dir)})
    load_start, start, start_cpu = os.getloadavg(), time.perf_counter(), time.process_time()
    train(cfg)
    timing = {
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - start_cpu,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "threads": torch.get_num_threads(),
    }
    (out_dir / TIMING).write_text(json.dumps(timing, indent=1) + "\n")
    return timing


def run_timing(run: Path) -> dict:
    """What a run folder says of its training time: ``timing.json``, else the last ``elapsed_s`` of ``log.csv``."""
    if (run / TIMING).is_file():
        return json.loads((run / TIMING).read_text())
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return {"wall_s": float(rows[-1]["elapsed_s"]), "cpu_s": None, "load_start": None, "load_end": None}


def sample_grid(pipe: Pipeline, path: Path) -> None:
    """Digits 0-9 (columns) for "an upside down handwritten digit d" without and with the LoRA, and the plain prompt
    with it (rows), seed 0."""
    rows = []
    for scale, upside in ((0.0, True), (1.0, True), (1.0, False)):
        pipe.set_lora_scales({name: scale for name in pipe.loras})
        rows += [pipe(caption(d, 0, upside_down=upside), seed=0)[0] for d in range(10)]
    pipe.set_lora_scales({name: 1.0 for name in pipe.loras})
    width, height = rows[0].size
    grid = Image.new(rows[0].mode, (10 * width, 3 * height))
    for i, image in enumerate(rows):
        grid.paste(image, ((i % 10) * width, (i // 10) * height))
    grid.save(path)


def evaluate(lora_file: Path, images: int, log: Callable[[str], None]) -> dict:
    """The three adherence measurements, the classifier's readings of rotated real digits and the scored digits."""
    pipe = Pipeline.from_pretrained("default")
    classifier = load_classifier()
    readings = rotation_readings(classifier)
    digits = scored_digits(readings)
    log(f"scored digits (the classifier tells their rotation): {digits}")
    results = {}
    start = time.perf_counter()
    results["upside_down_base"] = digit_adherence(upside_down(pipe), classifier, images_per_digit=images)
    seconds = time.perf_counter() - start
    log(f"upside-down prompts, base model: {scored(results['upside_down_base'], digits):.1%} ({seconds:.0f} s)")
    pipe.load_lora(lora_file, name="upside-down")
    pipe.fuse_lora()  # the same update added into the weights once: generation at the base model's cost
    results["upside_down_lora"] = digit_adherence(upside_down(pipe), classifier, images_per_digit=images)
    log(f"upside-down prompts, with the LoRA: {scored(results['upside_down_lora'], digits):.1%}")
    results["plain_lora"] = digit_adherence(pipe, classifier, images_per_digit=images)
    log(f"plain prompts, with the LoRA: {results['plain_lora'].overall:.1%} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    pipe.unfuse_lora()
    return {"results": results, "readings": readings, "digits": digits, "pipe": pipe, "seconds": seconds}


def _row(name: str, values: dict[int, float], marked: tuple[int, ...] = ()) -> str:
    return f"| {name} | " + " | ".join(f"{values[d]:.0%}" + (" *" if d in marked else "") for d in range(10)) + " |"


def report(meta: dict, measured: dict, timing: dict) -> str:
    results, digits, readings = measured["results"], measured["digits"], measured["readings"]
    base, lora, plain = results["upside_down_base"], results["upside_down_lora"], results["plain_lora"]
    unscored = tuple(d for d in range(10) if d not in digits)
    shipped = json.loads((DEFAULT_MODEL / "adherence.json").read_text())
    cpu = f", {timing['cpu_s'] / 60:.1f} min of CPU time" if timing.get("cpu_s") else ""
    contention = f" {meta['contention']}" if meta["contention"] else ""
    load = (
        f" Load average (1 min) {timing['load_start'][0]:.2f} at the start of training, {timing['load_end'][0]:.2f} at "
        "its end."
        if timing.get("load_start")
        else ""
    )
    figures = [
        ("upside-down adherence without the LoRA", scored(base, digits), "low"),
        ("upside-down adherence with the LoRA", scored(lora, digits), f">= {GOALS['upside_down']:.0%}"),
        ("plain adherence with the LoRA", plain.overall, f">= {GOALS['plain']:.0%}"),
    ]
    lines = [
        '# A measured fine-tune: the "upside down" LoRA',
        "",
        f"Produced by `{meta['command']}` on {meta['date']} (the script's docstring gives the method). Machine: "
        f"{meta['machine']}.",
        "",
        f"Training: [`configs/mnist-lora-upside-down.toml`](../../configs/mnist-lora-upside-down.toml) on the embedded "
        f"default model, {meta['steps']} steps at batch {meta['batch']} with {meta['threads']} thread(s): "
        f"**{timing['wall_s'] / 60:.1f} min** wall time{cpu}.{load}{contention} The LoRA: rank "
        f"{meta['rank']}, alpha {meta['alpha']}, targets {', '.join(meta['targets'])}"
        f"{' and every 3x3 convolution (LoCon)' if meta['convs'] else ''}, {meta['params']:,} parameters, "
        f"{meta['file_bytes'] / 1e6:.2f} MB as {meta['format']} safetensors.",
        "",
        f"Evaluation: {meta['images']} images per digit and prompt set ({10 * meta['images']} per row), the nine "
        "caption templates in equal shares (the upside-down phrasing of each for the upside-down rows), the "
        f"pipeline's defaults ({meta['sampling']}), the LoRA fused into the weights; {meta['eval_seconds'] / 60:.1f} "
        f"min with {meta['eval_threads']} thread(s).",
        "",
        "| figure | measured | goal |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value:.1%} | {goal} |" for name, value, goal in figures]
    lines += [
        "",
        f"Upside-down adherence counts the digits {', '.join(map(str, digits))}: generated images are turned back "
        "by 180 degrees and must then read as the prompted digit. The digits the classifier cannot tell from their "
        f"own half turn are listed but not scored (marked *: {', '.join(map(str, unscored))}): on the MNIST "
        f"validation digits rotated by 180 degrees, it reads at least {AMBIGUOUS_SHARE:.0%} of them as the digit "
        "itself (last row), so an upright drawing would pass. 6 and 9 swap under a half turn and are scored: an "
        "upright 6 turned back reads as 9 and fails. Plain adherence counts all ten digits; the default model's own "
        f"plain adherence is {shipped['overall']:.1%} (`unnoise/weights/mnist-ldm/adherence.json`, the same seeds "
        "and settings).",
        "",
        "| prompts | " + " | ".join(str(d) for d in range(10)) + " |",
        "|---" * 11 + "|",
        _row("upside down, base model", base.per_digit, unscored),
        _row("upside down, with the LoRA", lora.per_digit, unscored),
        _row("plain, with the LoRA", plain.per_digit),
        _row("real validation digits rotated, read as themselves", readings, unscored),
        "",
        "![Samples](lora-samples.png)",
        "",
        'Seed 0, digits 0-9: "an upside down handwritten digit d" without the LoRA (top) and with it (middle), '
        '"a handwritten digit d" with it (bottom).',
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--run", type=Path, help="a finished run folder of --config: evaluate it, train nothing")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "mnist-lora-upside-down")
    parser.add_argument("--images", type=int, default=100, help="images per digit and prompt set")
    parser.add_argument("--contention", default="", help="a sentence on other jobs during training, for the report")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "lora.md")
    # lora_vs_full's child processes
    parser.add_argument("--fine-tune-side", choices=tuple(FINE_TUNE_SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the evaluation")
    args = parser.parse_args(argv)
    if args.fine_tune_side is not None:
        measured = measure_side(args.fine_tune_side, batch=args.batch, steps=args.steps, threads=args.threads)
        print(json.dumps(measured))
        return measured
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run = args.run if args.run is not None else args.out_dir
    timing = run_timing(run) if args.run is not None else run_training(args.config, run)
    torch.set_num_threads(args.threads)  # training set its own (train.threads)
    cfg = json.loads((run / "config.json").read_text())
    lora_file = run / "lora.safetensors"
    measured = evaluate(lora_file, args.images, lambda line: print(line, flush=True))
    pipe = measured["pipe"]
    sample_grid(pipe, args.out.parent / "lora-samples.png")
    meta = {
        "command": " ".join(["python benchmarks/lora.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "steps": cfg["train"]["steps"],
        "batch": cfg["train"]["batch_size"],
        "threads": cfg["train"]["threads"],
        "rank": cfg["lora"]["rank"],
        "alpha": cfg["lora"]["alpha"] if cfg["lora"]["alpha"] is not None else cfg["lora"]["rank"],
        "targets": cfg["lora"]["targets"],
        "convs": cfg["lora"]["convs"],
        "format": cfg["lora"]["format"],
        "params": _file_parameters(lora_file),
        "file_bytes": lora_file.stat().st_size,
        "images": args.images,
        "sampling": _sampling(pipe),
        "eval_seconds": measured["seconds"],
        "eval_threads": args.threads,
        "contention": args.contention,
    }
    text = report(meta, measured, timing)
    args.out.write_text(text)
    print(text)
    return {"meta": meta, "results": measured["results"], "timing": timing}


def _file_parameters(path: Path) -> int:
    """The LoRA's parameters: the elements of its down and up matrices (not the alphas)."""
    with safe_open(str(path), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if not k.endswith(".alpha")]
    return sum(math.prod(shape) for shape in shapes)


def _sampling(pipe: Pipeline) -> str:
    s = pipe.config.sampling
    return f"{s.sampler}, {s.steps} steps, guidance scale {s.guidance_scale}, {s.spacing} spacing"


# -- LoRA against full fine-tuning: memory and speed (benchmarks/training.py --lora) ------------------------------


# The sides of the comparison: a full fine-tune, the shipped LoRA, and a LoRA with the [lora] defaults.
FINE_TUNE_SIDES = {
    "full": "full fine-tune (the whole U-Net)",
    "lora": "LoRA, the shipped config (rank 16; attention, projections, feed-forward, LoCon)",
    "lora-attention": "LoRA, the [lora] defaults (rank 4; to_q, to_k, to_v, to_out.0)",
}


def fine_tune_configs(*, batch: int, threads: int, out_dir: str) -> dict[str, TrainConfig]:
    """The shipped LoRA config, the same with the ``[lora]`` defaults, and the same run as a full fine-tune of the
    default model's U-Net (same data, batch, optimizer, EMA; the U-Net's [model] and the pipeline's [diffusion]
    settings written out)."""
    overrides = {"out_dir": out_dir, "train.batch_size": batch, "train.threads": threads, "train.sample_every": 0}
    lora_cfg = load_config(CONFIG, overrides)
    defaults = {"lora.rank": 4, "lora.alpha": None, "lora.targets": list(ATTENTION_TARGETS), "lora.convs": False}
    attention_cfg = load_config(CONFIG, overrides | defaults)
    pipeline = read_json(DEFAULT_MODEL / "pipeline.json")
    full = lora_cfg.to_dict()
    del full["lora"]
    full["model"] = {k: v for k, v in read_json(DEFAULT_MODEL / "unet" / "config.json").items() if k != "_type"}
    full["diffusion"] |= {
        "prediction": pipeline["prediction"],
        "conditioning": "text",
        "autoencoder": str(DEFAULT_MODEL / "vae"),
        "text_encoder": {k: v for k, v in pipeline["text_encoder"].items() if k != "_type"},
        "schedule": {k: v for k, v in pipeline["schedule"].items() if k != "_type"},
        "sampling": {k: v for k, v in pipeline["sampling"].items() if k != "_type"},
    }
    return {"full": config_from_dict(full), "lora": lora_cfg, "lora-attention": attention_cfg}


def peak_rss() -> int:
    """The largest resident set size this process has had, in bytes (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_side(side: str, *, batch: int, steps: int, threads: int) -> dict:
    """One side in this process: set-up, one warm-up step, then ``steps`` timed optimizer steps of ``unnoise train``
    (``_Run._optimizer_step``), with the resident memory before the warm-up and the process's peak, which must be
    reached in the steps (not in the set-up)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = _Run(fine_tune_configs(batch=batch, threads=threads, out_dir=tmp)[side], setup("cpu"), lambda s: None)
        if side == "full":  # fine-tuning starts from the default model's weights (and its EMA from them)
            load_state(run.task.unet, load_model(DEFAULT_MODEL / "unet").state_dict(), source="the default model")
            run.ema = EMA(run.task.unet, decay=run.cfg.ema.decay, warmup_power=run.cfg.ema.warmup_power)
        gc.collect()
        before, setup_peak = rss(), peak_rss()
        run._optimizer_step()
        wall, cpu = [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            run._optimizer_step()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        peak = peak_rss()
        if peak <= setup_peak:
            raise RuntimeError(f"the set-up's peak ({setup_peak} bytes) was not exceeded by the training steps")
        trainable = sum(p.numel() for m in run.task.modules.values() for p in m.parameters() if p.requires_grad)
    return {"wall": wall, "cpu": cpu, "rss_before": before, "rss_peak": peak, "trainable": trainable}


def lora_vs_full(*, batch: int, steps: int, threads: int, rounds: int) -> dict:
    """Both sides, each in a fresh process (so neither's memory counts in the other's), alternating full, LoRA,
    full, ... for ``rounds`` rounds; steps/s from the median step over all rounds, memory as the median over rounds."""
    runs: dict[str, list[dict]] = {side: [] for side in FINE_TUNE_SIDES}
    for _ in range(rounds):
        for side in runs:
            command = [sys.executable, str(Path(__file__).resolve()), "--fine-tune-side", side, "--batch", str(batch)]
            command += ["--steps", str(steps), "--threads", str(threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {}
    for side, parts in runs.items():
        wall = [t for p in parts for t in p["wall"]]
        cpu = [t for p in parts for t in p["cpu"]]
        result[side] = {
            "s_per_step": statistics.median(wall),
            "cpu_s_per_step": statistics.median(cpu),
            "rss_before": statistics.median(p["rss_before"] for p in parts),
            "rss_peak": statistics.median(p["rss_peak"] for p in parts),
            "trainable": parts[0]["trainable"],
        }
    return {"sides": result, "batch": batch, "steps": steps, "threads": threads, "rounds": rounds}


def fine_tune_section(measured: dict, command: str) -> list[str]:
    """The markdown section of docs/benchmarks/training.md on LoRA against full fine-tuning."""
    sides, mib = measured["sides"], 1 << 20
    full = sides["full"]
    lines = [
        FINE_TUNE_HEADING,
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}. Every side fine-tunes the embedded default "
        "model on the data of "
        "[`configs/mnist-lora-upside-down.toml`](../../configs/mnist-lora-upside-down.toml) with its optimizer, EMA "
        f"and batch ({measured['batch']}), {measured['threads']} thread(s): the full fine-tune trains the whole U-Net "
        "(loaded with the default weights), the LoRAs an adapter on the frozen U-Net. Each side runs in a fresh "
        f"process, the sides in turn for {measured['rounds']} rounds of one warm-up and {measured['steps']} timed "
        "optimizer steps of `unnoise train`; steps/s from the median step, memory the median over rounds of the "
        "resident set size before the warm-up step and the process's peak (`ru_maxrss`, reached in the steps).",
        "",
        "| side | trainable parameters | steps/s | CPU s/step | RSS before (MiB) | peak RSS (MiB) "
        "| peak - before (MiB) | steps/s vs full | peak RSS vs full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, side in sides.items():
        lines.append(
            f"| {FINE_TUNE_SIDES[name]} | {side['trainable']:,} | {1 / side['s_per_step']:.3f} "
            f"| {side['cpu_s_per_step']:.2f} | {side['rss_before'] / mib:.0f} | {side['rss_peak'] / mib:.0f} "
            f"| {(side['rss_peak'] - side['rss_before']) / mib:.0f} | {full['s_per_step'] / side['s_per_step']:.2f}x "
            f"| {side['rss_peak'] / full['rss_peak']:.2f}x |"
        )
    lines += [
        "",
        "The parameter state of this 4.6M-parameter U-Net (weights, gradients, AdamW moments, EMA: about 90 MiB) is "
        "small beside the activations of a batch of 128, which a LoRA needs as much as a full fine-tune (the "
        "gradient still flows back through every frozen layer), and each un-fused LoRA layer adds activations and "
        "output-sized temporaries of its own (the update, its scaling, the sum). What a LoRA saves is that parameter "
        "state: for a Stable Diffusion U-Net's 860M parameters about 17 GB in float32, against a few MB for an "
        "adapter.",
    ]
    return lines


FINE_TUNE_HEADING = "## LoRA against full fine-tuning of the default model"


if __name__ == "__main__":
    main()
