"""Training throughput: our trainer's optimizer step against a plain diffusers ``UNet2DModel`` loop (CPU).

    python benchmarks/training.py            # writes docs/benchmarks/training.md (about 4 minutes, one thread)
    python benchmarks/training.py --quick    # fewer repeats, prints only
    python benchmarks/training.py --profile  # where each side's step time goes (torch.profiler), prints only
    python benchmarks/training.py --lora     # only LoRA against full fine-tuning of the default model (about
                                             # 3 minutes): replaces that section of docs/benchmarks/training.md

Both sides train the same class-conditioned pixel U-Net (diffusers' ``UNet2DModel`` layout) from the same initial
weights on the same batches of MNIST at 32x32: epsilon-prediction MSE at uniform DDPM timesteps of the linear
schedule, 10% label dropout (the null class), AdamW at a constant learning rate, gradient clipping to norm 1 and an
EMA of the weights (decay 0.999, warm-up power 2/3).

- ours: ``_Run(cfg, setup("cpu"), log)._optimizer_step()`` of ``unnoise.train``, that is everything one step of
  ``unnoise train`` does except logging and checkpoints, including its per-sample data path.
- diffusers: the step of diffusers' ``train_unconditional.py`` example reduced to its arithmetic: images and labels
  preloaded as tensors and indexed with the same data order (no data work beyond indexing a tensor),
  ``DDPMScheduler.add_noise``, ``F.mse_loss`` on epsilon, ``clip_grad_norm_``, ``AdamW``, ``EMAModel.step``.

After warm-up the two sides alternate in blocks of ``--block`` steps (ABAB...); each side's time per step is the
median over blocks, in wall time and in this process's CPU time (which leaves out time the scheduler gave to
other jobs on a shared machine). Threads are fixed with ``torch.set_num_threads`` (``--threads``, default 1): on
the shared 2-core machine, with another training job running, two threads made a batch-16 step of either side 15x
slower (21 s against 1.4 s), since every OpenMP barrier waits for whichever thread the scheduler has parked.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import import_diffusers  # noqa: E402
from benchmarks.lora import FINE_TUNE_HEADING, fine_tune_section, lora_vs_full  # noqa: E402
from benchmarks.report import machine  # noqa: E402
from unnoise.models.io import diffusers_key, load_state  # noqa: E402
from unnoise.models.layers import attention  # noqa: E402
from unnoise.models.unet import UNetConfig  # noqa: E402
from unnoise.train.config import TrainConfig, config_from_dict  # noqa: E402
from unnoise.train.data import DataOrder  # noqa: E402
from unnoise.train.distributed import setup  # noqa: E402
from unnoise.train.ema import EMA  # noqa: E402
from unnoise.train.loop import _Run  # noqa: E402
from unnoise.train.tasks import step_generator  # noqa: E402

# diffusers UNet2DModel config: DDPM's pixel U-Net at small width, self-attention at 16x16 and 8x8 (and the middle).
UNET = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "num_class_embeds": 11,  # the ten digits and the null class of label dropout
}
TINY_UNET = {
    **UNET,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}
SCHEDULE = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
LR, GRAD_CLIP, EMA_DECAY, EMA_POWER, COND_DROPOUT = 1e-4, 1.0, 0.999, 2 / 3, 0.1
# Row -> (our [train] options, diffusers' autocast dtype). "bf16+chunked" gives ours the CPU options meant to be its
# fastest; diffusers runs bf16 autocast with its default attention processor (SDPA) in both bf16 rows.
SETTINGS = {
    "fp32": ({"autocast": "none", "attention": "sdpa"}, None),
    "bf16": ({"autocast": "bf16", "attention": "sdpa"}, torch.bfloat16),
    "bf16+chunked": ({"autocast": "bf16", "attention": "chunked"}, torch.bfloat16),
}

# Appended to the report, beside the attention costs measured in the same run (`--profile` prints the full
# torch.profiler tables that these observations come from; they hold no figures, so they cannot go stale).
PROFILE_NOTES = [
    "",
    "## Where the time goes (`python benchmarks/training.py --profile` prints the profiler tables)",
    "",
    "- fp32 and bf16 (SDPA): both sides run the same kernels in the same counts; convolutions, SDPA and group "
    "norms take nearly all of the time on either side. What only ours does (the per-sample data path, the EMA, "
    "the seeded draws) is a fraction of a percent of a step.",
    "- bf16 buys little on a CPU without AMX: convolutions get faster, but SDPA's bf16 backward does not.",
    "- chunked attention materializes the full attention matrix and backpropagates through it: faster than fused "
    "SDPA for short sequences (8 x 8 latents, 64 tokens), slower at 16 x 16 (256 tokens); see the table below.",
]


def train_config(unet: dict, setting: str, *, batch: int, out_dir: str, seed: int = 0) -> TrainConfig:
    """Our config for the diffusers ``unet`` config: class-conditioned MNIST diffusion with the benchmark's optim."""
    model = UNetConfig.from_diffusers({"_class_name": "UNet2DModel", **unet}).to_dict()
    return config_from_dict(
        {
            "task": "diffusion",
            "out_dir": out_dir,
            "seed": seed,
            "data": {"dataset": "mnist", "size": unet["sample_size"]},
            "model": model,
            "diffusion": {"conditioning": "class", "cond_dropout": COND_DROPOUT, "schedule": SCHEDULE},
            "optim": {"lr": LR, "decay": "constant", "grad_clip": GRAD_CLIP},
            "ema": {"decay": EMA_DECAY, "warmup_power": EMA_POWER},
            "train": {"batch_size": batch, "device": "cpu", **SETTINGS[setting][0]},
        }
    )


class PlainLoop:
    """diffusers' ``train_unconditional.py`` step on preloaded tensors, with class labels and label dropout."""

    def __init__(self, diffusers: ModuleType, unet: dict, images: Tensor, labels: Tensor, autocast: torch.dtype | None):
        self.model = diffusers.UNet2DModel(**unet).train()
        self.scheduler = diffusers.DDPMScheduler(**SCHEDULE)
        self.images, self.labels, self.autocast = images, labels, autocast
        self.null_label = unet["num_class_embeds"] - 1
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        # update_after_step=-1: diffusers' EMA counts steps from 0, ours from 1; this makes the two warm-ups equal
        self.ema = diffusers.training_utils.EMAModel(
            self.model.parameters(), decay=EMA_DECAY, use_ema_warmup=True, power=EMA_POWER, update_after_step=-1
        )

    def step(self, indices: Tensor, draws: tuple[Tensor, Tensor, Tensor] | None = None) -> float:
        """One optimizer step on ``images[indices]``; ``draws`` = (timesteps, noise, label dropout), else random."""
        x0, labels = self.images[indices], self.labels[indices]
        if draws is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),))
            draws = timesteps, torch.randn_like(x0), torch.rand(len(x0)) < COND_DROPOUT
        timesteps, noise, drop = draws
        labels = torch.where(drop, self.null_label, labels)
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        with torch.autocast("cpu", dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            prediction = self.model(noisy, timesteps, class_labels=labels).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())
        return loss.item()


@dataclass
class Sides:
    """Our run and the plain loop on the same weights and data, and the plain loop's data order (indices)."""

    ours: _Run
    plain: PlainLoop
    order: DataOrder

    def ours_step(self) -> float:
        return self.ours._optimizer_step()["loss"]

    def plain_step(self, draws: tuple[Tensor, Tensor, Tensor] | None = None) -> float:
        return self.plain.step(torch.from_numpy(self.order.take(self.ours.cfg.train.batch_size)), draws)


def build(unet: dict, setting: str, *, batch: int, out_dir: str, seed: int = 0) -> Sides:
    """Both sides with diffusers' initial weights (seeded), ours loaded from them key for key."""
    diffusers = import_diffusers()
    cfg = train_config(unet, setting, batch=batch, out_dir=out_dir, seed=seed)
    ours = _Run(cfg, setup("cpu"), log=lambda line: None)
    data = ours.dataset.batch(np.arange(len(ours.dataset)), np.random.default_rng(0))
    torch.manual_seed(seed)
    plain = PlainLoop(diffusers, unet, data.images, data.labels, SETTINGS[setting][1])
    state = {diffusers_key(k): v.detach().clone() for k, v in plain.model.state_dict().items()}
    load_state(ours.task.unet, state, source="diffusers")
    if ours.ema is not None:  # the EMA starts from the loaded weights, as the plain loop's does
        ours.ema = EMA(ours.task.unet, decay=EMA_DECAY, warmup_power=EMA_POWER)
    return Sides(ours, plain, DataOrder(len(ours.dataset), seed))


def ours_draws(run: _Run, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """The timesteps, noise and label dropout of our optimizer step ``step``, drawn as ``DiffusionTask.loss`` does."""
    cfg, task = run.cfg, run.task
    count = cfg.train.batch_size
    g = step_generator(cfg.seed, step)
    sigma = task.objective.sigmas(count, generator=g)
    timesteps = task.schedule.sigma_to_t(sigma).round().long()
    noise = torch.randn((count, task.unet.config.in_channels, cfg.data.size, cfg.data.size), generator=g)
    drop = torch.rand(count, generator=g, dtype=torch.float64) < cfg.diffusion.cond_dropout
    return timesteps, noise, drop


def measure(sides: Sides, *, warmup: int, repeats: int, block: int) -> dict:
    """Wall and CPU seconds per step of each side: medians over ``repeats`` alternating blocks of ``block`` steps."""
    steps = {"ours": sides.ours_step, "diffusers": sides.plain_step}
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {side: [] for side in steps}
    cpu: dict[str, list[float]] = {side: [] for side in steps}
    losses: dict[str, list[float]] = {side: [] for side in steps}
    for _ in range(repeats):
        for side, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[side] += [step() for _ in range(block)]
            cpu[side].append((time.process_time() - start_cpu) / block)
            wall[side].append((time.perf_counter() - start) / block)
    result = {
        side: {
            "s_per_step": statistics.median(wall[side]),
            "cpu_s_per_step": statistics.median(cpu[side]),
            "wall": wall[side],
            "cpu": cpu[side],
            "mean_loss": statistics.fmean(losses[side]),
        }
        for side in steps
    }
    # throughput ratios ours / diffusers, from wall time and from this process's CPU time
    result["ratio"] = result["diffusers"]["s_per_step"] / result["ours"]["s_per_step"]
    result["cpu_ratio"] = result["diffusers"]["cpu_s_per_step"] / result["ours"]["cpu_s_per_step"]
    return result


def profile(sides: Sides, *, steps: int = 3, top: int = 15) -> str:
    """torch.profiler tables (self CPU time) of ``steps`` steps of each side, after one warm-up step each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for side, step in (("ours", sides.ours_step), ("diffusers", sides.plain_step)):
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        out.append(f"## {side}: {steps} steps\n\n```\n{table}\n```\n")
    return "\n".join(out)


def attention_costs(tokens: tuple[int, ...] = (64, 256), *, batch: int = 64, repeats: int = 5) -> str:
    """CPU ms of one self-attention forward + backward, SDPA against chunked, at this U-Net's head shape."""
    heads, dim = UNET["block_out_channels"][-1] // UNET["attention_head_dim"], UNET["attention_head_dim"]
    lines = ["| tokens | dtype | sdpa (ms) | chunked (ms) |", "|---|---|---|---|"]
    for n in tokens:
        for dtype in (torch.float32, torch.bfloat16):
            times: dict[str, list[float]] = {"sdpa": [], "chunked": []}
            for _ in range(repeats):
                for mode in times:
                    q, k, v = (torch.randn(batch, heads, n, dim, dtype=dtype, requires_grad=True) for _ in range(3))
                    start = time.process_time()
                    attention(q, k, v, mode, chunk_size=4096).float().square().mean().backward()
                    times[mode].append(time.process_time() - start)
            ms = {mode: statistics.median(t) * 1e3 for mode, t in times.items()}
            lines.append(f"| {n} | {str(dtype).removeprefix('torch.')} | {ms['sdpa']:.1f} | {ms['chunked']:.1f} |")
    return "\n".join(lines)


def attention_header(batch: int) -> str:
    return f"One attention call at this model's head shape (batch {batch}), forward + backward, CPU ms, this run:"


def report(results: dict, meta: dict) -> str:
    """The markdown report: one row per setting, throughput per side and the ratios ours / diffusers."""
    batch, unet = meta["batch"], meta["unet"]
    lines = [
        "# Training throughput: our trainer against a plain diffusers loop (CPU)",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} (the script's docstring gives the method). "
        f"Machine: {meta['machine']}; diffusers {meta['diffusers']}. "
        f"Load average (1 min): {meta['load_start']:.2f} at the start, {meta['load_end']:.2f} at the end. The machine "
        "is shared with other jobs, so absolute numbers move with them; the sides alternate step by step, and the "
        "CPU-time columns (this process's CPU seconds) do not count time the scheduler gave to others. "
        f"torch threads: {meta['threads']}"
        + (" (the script's docstring says why not 2 on this machine)." if meta["threads"] == 1 else "."),
        "",
        f"Model: diffusers `UNet2DModel` layout, channels {tuple(unet['block_out_channels'])}, "
        f"{unet['layers_per_block']} layers per block, blocks {', '.join(unet['down_block_types'])} (self-attention "
        f"at the lower resolutions and in the middle), {unet['num_class_embeds']} class embeddings, "
        f"{meta['params'] / 1e6:.2f}M parameters; identical initial weights. Data: MNIST at "
        f"{unet['sample_size']}x{unet['sample_size']}, batch {batch}, the same images in the same order on both "
        "sides. Every step on both sides: epsilon MSE at uniform DDPM timesteps, 10% label dropout, AdamW, "
        "gradient clipping to norm 1, EMA update. Per side and row: median of "
        f"{meta['repeats']} blocks of {meta['block']} step(s) after {meta['warmup']} warm-up step(s), blocks "
        "alternating ours, diffusers, ours, ...",
        "",
        "| setting | ours steps/s | diffusers steps/s | ours images/s | diffusers images/s | ratio (wall) "
        "| ours CPU s/step | diffusers CPU s/step | ratio (CPU) | ours loss | diffusers loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, r in results.items():
        o, d = r["ours"], r["diffusers"]
        lines.append(
            f"| {setting} | {1 / o['s_per_step']:.3f} | {1 / d['s_per_step']:.3f} | {batch / o['s_per_step']:.1f} "
            f"| {batch / d['s_per_step']:.1f} | {r['ratio']:.3f} | {o['cpu_s_per_step']:.2f} "
            f"| {d['cpu_s_per_step']:.2f} | {r['cpu_ratio']:.3f} | {o['mean_loss']:.4f} | {d['mean_loss']:.4f} |"
        )
    lines += [
        "",
        "Ratios are throughput ours / diffusers: above 1 favours us. Losses are the means over the timed steps "
        "(same weights, data and objective; the noise draws differ, so they agree only roughly).",
        "",
        'Settings: **fp32**: both sides in float32 with default attention (ours `train.attention = "sdpa"`, '
        "diffusers its default processor, which calls SDPA). **bf16**: both under bfloat16 autocast (ours "
        '`train.autocast = "bf16"`, diffusers `torch.autocast("cpu", torch.bfloat16)`), SDPA on both sides. '
        '**bf16+chunked**: ours with `train.autocast = "bf16"` and `train.attention = "chunked"`; diffusers as in '
        "the bf16 row.",
        "",
        "What differs on purpose: ours runs its real data path each step (per-sample generators, batch assembly "
        "from the uint8 data set); the plain loop only indexes preloaded float tensors. Ours draws noise and "
        "timesteps from a per-step seeded generator (so resumed and multi-process runs repeat a single run); the "
        "plain loop from the global one. `tests/test_benchmark_training.py` checks that, given the same draws, the "
        "two steps compute the same loss.",
        "",
        "Wall seconds per step of every block (ours | diffusers):",
        "",
    ]
    for setting, r in results.items():
        blocks = [" ".join(f"{t:.2f}" for t in r[side]["wall"]) for side in ("ours", "diffusers")]
        lines.append(f"- {setting}: {blocks[0]} | {blocks[1]}")
    lines += ["", "Goal: ratio >= 1.0.", ""]
    for setting, r in results.items():
        verdict = ", ".join(
            f"{r[key]:.3f}x by {name} ({'met' if r[key] >= 1.0 else 'not met'})"
            for key, name in (("ratio", "wall time"), ("cpu_ratio", "CPU time"))
        )
        lines.append(f"- {setting}: {verdict}.")
    return "\n".join(lines + meta.get("notes", []) + [""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 1 step, print only")
    parser.add_argument("--tiny", action="store_true", help="a tiny U-Net and batch 4 (for the tests)")
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler tables per setting and attention costs"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "training.md"))
    parser.add_argument("--lora", action="store_true", help="only LoRA against full fine-tuning; replace its section")
    parser.add_argument("--lora-batch", type=int, default=128)
    parser.add_argument("--lora-steps", type=int, default=5, help="timed steps per side and round")
    parser.add_argument("--lora-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/training.py", *(sys.argv[1:] if argv is None else argv)])
    fine_tune = dict(batch=args.lora_batch, steps=args.lora_steps, threads=args.threads, rounds=args.lora_rounds)
    if args.lora:
        section = fine_tune_section(lora_vs_full(**fine_tune), command)
        print("\n".join(section))
        if not args.quick:
            Path(args.out).write_text(with_section(Path(args.out).read_text(), section))
        return {"section": section}
    unet, batch = (TINY_UNET, 4) if args.tiny else (UNET, args.batch)
    repeats, block, warmup = (2, 1, 1) if args.quick else (args.repeats, args.block, args.warmup)
    load_start = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            for setting in args.settings:
                print(f"# {setting}\n\n" + profile(build(unet, setting, batch=batch, out_dir=tmp)))
            print(f"# One attention call, batch {batch}, forward + backward\n\n{attention_costs(batch=batch)}")
            return {}
        for setting in args.settings:
            sides = build(unet, setting, batch=batch, out_dir=tmp)
            results[setting] = measure(sides, warmup=warmup, repeats=repeats, block=block)
            r = results[setting]
            print(f"{setting}: wall ratio {r['ratio']:.3f}, CPU ratio {r['cpu_ratio']:.3f}", flush=True)
    notes = [] if args.tiny else PROFILE_NOTES + ["", attention_header(batch), "", attention_costs(batch=batch)]
    if not args.tiny:
        notes += ["", *fine_tune_section(lora_vs_full(**fine_tune), command)]
    meta = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "diffusers": import_diffusers().__version__,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "unet": unet,
        "params": sum(p.numel() for p in sides.plain.model.parameters()),
        "batch": batch,
        "warmup": warmup,
        "repeats": repeats,
        "block": block,
        "threads": args.threads,
        "notes": notes,
    }
    text = report(results, meta)
    print(text)
    if not (args.quick or args.tiny):
        Path(args.out).write_text(text)
    return {"results": results, "meta": meta, "report": text}


def with_section(text: str, section: list[str]) -> str:
    """``text`` (a report) with its LoRA-against-full section replaced by ``section`` (appended if it has none)."""
    start = text.find(FINE_TUNE_HEADING)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    end = text.find("\n## ", start + len(FINE_TUNE_HEADING))
    return text[:start] + "\n".join(section) + "\n" + ("\n" + text[end + 1 :] if end >= 0 else "")


if __name__ == "__main__":
    main()
