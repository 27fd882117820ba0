"""Evaluate a pipeline at one sampling setting, a sweep of settings, or a folder of images; records as dicts.

Every process of a ``torchrun`` launch generates and measures its contiguous share of the plan's images (image k
has seed ``seed + k`` wherever it is made); the measurements are gathered and the main process scores them. A
record is JSON-ready: the run's ``header`` (model, prompts, feature space, reference) and, per setting, its
``settings``, ``metrics`` and ``seconds``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unnoise.core.samplers import nfe
from unnoise.eval.measure import Measurements, Scorers, gather, measure, score
from unnoise.eval.reference import Floor, RealSet
from unnoise.eval.samples import SampleBatch, SamplePlan, folder_batches, generated_batches, shard
from unnoise.pipeline import Pipeline, Request, resolve_request
from unnoise.train.distributed import World

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampling setting: sampler, steps, guidance scale and grid spacing."""

    sampler: str
    steps: int
    guidance_scale: float
    spacing: str

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per image; with guidance != 1 each runs the U-Net on a conditional and an
        unconditional input in one batch."""
        return nfe(self.sampler, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "nfe": self.nfe}


def resolve_setting(
    pipe: Pipeline,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    spacing: str | None = None,
) -> Setting:
    """The setting a ``pipe`` call would use (the model's defaults where None), validated by the pipeline."""
    request = Request("", seed=0, sampler=sampler, steps=steps, guidance_scale=guidance_scale, spacing=spacing)
    req = resolve_request(pipe, request)
    return Setting(req.sampler, req.steps, req.guidance_scale, req.spacing)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every setting of a run shares: scorers, metrics, reference and floor (main process only), world."""

    scorers: Scorers
    metrics: tuple[str, ...]
    reference: RealSet | None
    floor: Floor | None
    world: World
    batch_size: int = 50
    progress: Progress | None = None
    report_images: bool = False  # also say how many images the main process has made, every tenth of its share

    def say(self, message: str) -> None:
        if self.progress is not None and self.world.is_main:
            self.progress(message)


def header(ctx: Context, source: dict[str, Any], prompts: str | None, num_images: int, seed: int | None) -> dict:
    """The part of a record that all its settings share (main process)."""
    ref = ctx.reference
    features = ctx.scorers.features
    return {
        "source": source,
        "prompts": prompts,
        "num_images": num_images,
        "seed": seed,
        "metrics_computed": list(ctx.metrics),
        "feature_space": features.name,
        "feature_description": getattr(features, "description", features.name),
        "reference": {"name": ref.name, "count": ref.count, "hash": ref.content_hash} if ref is not None else None,
        "world_size": ctx.world.size,
        "device": str(ctx.world.device),
    }


def evaluate_setting(pipe: Pipeline, plan: SamplePlan, setting: Setting, ctx: Context) -> dict | None:
    """Generate the plan's images at ``setting`` and score them: the setting's record on the main process."""
    start = time.perf_counter()
    call = dict(sampler=setting.sampler, steps=setting.steps, guidance_scale=setting.guidance_scale)
    indices = shard(len(plan), ctx.world.rank, ctx.world.size)
    batches = generated_batches(pipe, plan, indices, batch_size=ctx.batch_size, spacing=setting.spacing, **call)
    if ctx.report_images:
        batches = _counted(batches, len(indices), ctx)
    return _scored(gather(measure(batches, ctx.scorers), ctx.world.size), ctx, setting.to_dict(), start)


def sweep(pipe: Pipeline, plan: SamplePlan, settings: list[Setting], ctx: Context) -> list[dict] | None:
    """``evaluate_setting`` for each setting, with the same prompts and seeds (common random numbers: differences
    between settings are not blurred by different noise)."""
    records = []
    for i, setting in enumerate(settings):
        record = evaluate_setting(pipe, plan, setting, ctx)
        if record is not None:
            records.append(record)
            ctx.say(f"[{i + 1}/{len(settings)}] {_describe(record)}")
    return records if ctx.world.is_main else None


def evaluate_folder(files: list[Path], ctx: Context) -> dict | None:
    """Score the images in ``files`` (prompts and digit labels from their PNG parameters, where they carry them)."""
    start = time.perf_counter()
    indices = shard(len(files), ctx.world.rank, ctx.world.size)
    batches = folder_batches(files, indices, batch_size=ctx.batch_size)
    return _scored(gather(measure(batches, ctx.scorers), ctx.world.size), ctx, None, start)


def _scored(m: Measurements, ctx: Context, settings: dict | None, start: float) -> dict | None:
    if not ctx.world.is_main:
        return None
    measured = time.perf_counter() - start
    assert ctx.reference is not None, "the main process holds the reference"
    metrics = score(m, ctx.metrics, ctx.reference, ctx.floor)
    return {
        "settings": settings,
        "metrics": metrics,
        "seconds": {"generate_and_measure": measured, "total": time.perf_counter() - start},
    }


def _counted(batches: Iterator[SampleBatch], total: int, ctx: Context) -> Iterator[SampleBatch]:
    done, reported = 0, 0
    for batch in batches:
        yield batch
        done += len(batch.images)
        if done * 10 // total > reported or done == total:
            reported = done * 10 // total
            ctx.say(f"{done}/{total} images" + (" (this process's share)" if ctx.world.size > 1 else ""))


def _describe(record: dict) -> str:
    s, m = record["settings"], record["metrics"]
    parts = [f"{s['sampler']} {s['steps']} steps, guidance {s['guidance_scale']:g}:"]
    if "fid" in m:
        parts.append(f"FID {m['fid']:.2f}")
    if "adherence" in m:
        parts.append(f"adherence {m['adherence']['overall']:.1%}")
    parts.append(f"({record['seconds']['total']:.0f} s)")
    return " ".join(parts)


def stderr_progress(prefix: str) -> Progress:
    """A progress function that prints ``prefix: message`` lines on stderr."""

    def say(message: str) -> None:
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)

    return say
