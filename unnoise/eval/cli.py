"""``unnoise eval`` and ``unnoise eval sweep``: a thin layer over ``unnoise.eval``; ``add_parser`` plugs them in.

User errors print one line naming the flag (``unnoise eval: error: argument --reference: ...``) and exit with
status 2, through the parser's ``error``. Under ``torchrun`` every process runs the command; each generates its
share of the images and the first one writes the results.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS
from unnoise.eval.evaluate import (
    Context,
    Progress,
    Setting,
    evaluate_folder,
    evaluate_setting,
    header,
    resolve_setting,
    stderr_progress,
    sweep,
)
from unnoise.eval.features import FEATURE_KINDS, MNISTFeatures, load_extractor
from unnoise.eval.images import image_files
from unnoise.eval.measure import METRICS, Scorers, parse_metrics
from unnoise.eval.reference import DEFAULT_FLOOR, check_spec, load_reference, real_vs_real_floor
from unnoise.eval.report import require_matplotlib, write_eval, write_sweep
from unnoise.eval.samples import SamplePlan, digit_plan, prompt_plan, read_prompts
from unnoise.metrics import RESIZE_MODES, WEIGHTS_ENV, CLIPEmbedder
from unnoise.pipeline import Pipeline
from unnoise.train.distributed import World, setup, teardown
from unnoise.usage import UsageError, user_errors

# Pipeline keyword (as its errors name it) -> flag
_FLAGS = {"steps": "--steps", "sampler": "--sampler", "guidance_scale": "--guidance", "spacing": "--spacing"}


def add_parser(commands: Any) -> None:
    """Add ``eval`` (and its ``sweep``) to an argparse subparsers object, as ``unnoise.cli`` builds its commands."""
    p = commands.add_parser(
        "eval",
        help="measure a model (or a folder of images): FID, KID, precision/recall, adherence, IS, CLIP score",
        description="Generate -n images from a model (digit captions in equal shares, or --prompts) at one "
        "setting, or read --images DIR, measure --metrics against --reference, and write eval.json and eval.md to "
        "--out. Every FID is reported beside the real-vs-real floor (held-out real images at the same N). Run "
        "under `torchrun --nproc_per_node N` to share the generation. `unnoise eval sweep --help` for sweeps.",
    )
    _add_common(p)
    p.add_argument("--images", type=Path, metavar="DIR", help="evaluate the images in DIR instead of generating")
    p.add_argument("--sampler", choices=list(SAMPLERS), metavar="NAME", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, metavar="S", help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale (default: the model's)")
    p.set_defaults(run=eval_command, error=p.error)
    sub = p.add_subparsers(dest="eval_command", metavar="{sweep}")
    s = sub.add_parser(
        "sweep",
        help="samplers x steps x guidance scales -> a table and PNG plots",
        description="Evaluate every combination of --samplers, --steps and --guidance with the same prompts and "
        "seeds; write sweep.json, sweep.md, fid_vs_nfe.png (FID against NFE per sampler) and fid_vs_adherence.png "
        "(FID against adherence across guidance scales) to --out.",
    )
    _add_common(s, suppress=True)
    s.add_argument("--samplers", type=_list(str), metavar="A,B", help="samplers (default: the model's)")
    s.add_argument("--steps", dest="sweep_steps", type=_list(int), metavar="S,T", help="step counts (default: model's)")
    s.add_argument("--guidance", dest="sweep_guidance", type=_list(float), metavar="G,H", help="guidance scales")
    s.add_argument("--no-plots", action="store_true", help="write the table only (no matplotlib needed)")
    s.set_defaults(run=sweep_command, error=s.error)


def _add_common(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """Flags of both commands; ``sweep`` suppresses their defaults so that values given before it are kept."""

    def add(*flags: str, default: Any = None, help: str, **kwargs: Any) -> None:
        help = help.replace("%(default)s", str(default))  # SUPPRESS hides the default from argparse's help
        p.add_argument(*flags, default=argparse.SUPPRESS if suppress else default, help=help, **kwargs)

    add("--model", type=Path, metavar="DIR",
        help="unnoise or diffusers pipeline folder, or 'lcm' (default: the embedded model)")  # fmt: skip
    add("--prompts", type=Path, metavar="FILE", help="one prompt per line, in equal shares (default: digit captions)")
    add("-n", "--num-images", type=int, default=1000, metavar="N", help="images to generate (default: %(default)s)")
    add("--seed", type=int, default=0, metavar="S", help="image k has seed S + k (default: %(default)s)")
    add("--spacing", choices=SPACINGS, metavar="NAME", help=f"sigma grid, one of {', '.join(SPACINGS)}")
    add("--metrics", metavar="LIST", help=f"comma-separated from {','.join(METRICS)} (default: fid,kid,pr and "
        "adherence for digit prompts)")  # fmt: skip
    add("--features", choices=FEATURE_KINDS, default="mnist", help="FID feature space (default: %(default)s)")
    add("--reference", default="mnist-train", metavar="REF", help="mnist-train, mnist-val, a statistics .npz or "
        "an image folder (default: %(default)s)")  # fmt: skip
    add("--floor", metavar="REF", help="held-out real images for the real-vs-real floor, or 'none' (default: the "
        "other MNIST split when --reference is one)")  # fmt: skip
    add("--classifier", type=Path, metavar="DIR", help="MNIST classifier folder (default: the shipped one)")
    add("--inception-weights", type=Path, metavar="FILE", help=f"FID Inception weights (default: ${WEIGHTS_ENV})")
    add("--resize", choices=RESIZE_MODES, default="clean", help="Inception resize mode (default: %(default)s)")
    add("--allow-pickle", action="store_true", default=False, help="let --inception-weights be a pickled .pth")
    add("--clip", type=Path, metavar="DIR", help="a saved transformers CLIPModel folder, for the CLIP score")
    add("--batch-size", type=int, default=50, metavar="B", help="images per pipeline call (default: %(default)s)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="torch device; under torchrun cuda is "
        "the local rank's GPU (default: %(default)s: cuda if available)")  # fmt: skip
    add(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="cache of reference features (default: $UNNOISE_CACHE or ~/.cache/unnoise)",
    )
    add("--out", type=Path, metavar="DIR", help="folder for the results (required)")


def _list(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(item.strip()) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None

    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m unnoise.eval [sweep] ...``: the ``unnoise eval`` command on its own."""
    parser = argparse.ArgumentParser(prog="unnoise")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    args.run(args)


# -- commands -----------------------------------------------------------------------------------------------------


def eval_command(args: argparse.Namespace) -> None:
    """``unnoise eval``: one setting of a model, or a folder of images."""
    with _reported(args):
        if args.images is not None and args.model is not None:
            raise UsageError("argument --images: not allowed with --model (evaluate one or the other)")
        labelled = None if args.images is not None else args.prompts is None  # a folder's labels are read later
        metrics, world, out = _start(args, labelled=labelled)
        start = time.perf_counter()
        scorers = _scorers(args, metrics, world)
        if args.images is not None:
            with _user_errors("--images"):
                files = _folder(args.images)
            ctx = _context(args, scorers, metrics, world, len(files))
            with _user_errors("--images"):
                record = evaluate_folder(files, ctx)
            source, prompts, n, seed = {"images": str(args.images)}, None, len(files), None
        else:
            plan = _plan(args)
            pipe = _pipeline(args.model, world)
            with _user_errors():
                setting = resolve_setting(
                    pipe, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, spacing=args.spacing
                )
            progress = stderr_progress("unnoise eval")
            ctx = _context(args, scorers, metrics, world, len(plan), progress, report_images=True)
            record = evaluate_setting(pipe, plan, setting, ctx)
            source, prompts, n, seed = _model_source(pipe), plan.source, len(plan), plan.seed
        if record is not None:
            record = {**header(ctx, source, prompts, n, seed), **record}
            record["seconds"]["total"] = time.perf_counter() - start
            _print(write_eval(record, out), record["metrics"])
    teardown()


def sweep_command(args: argparse.Namespace) -> None:
    """``unnoise eval sweep``: every combination of samplers, steps and guidance scales."""
    with _reported(args):
        eval_only = {"--images": "images", "--sampler": "sampler", "--steps": "steps", "--guidance": "guidance"}
        for flag, name in eval_only.items():
            if getattr(args, name, None) is not None:
                raise UsageError(f"argument {flag}: belongs to `unnoise eval`; a sweep takes --samplers, --steps "
                                  "and --guidance after the word sweep")  # fmt: skip
        if not args.no_plots:
            with _user_errors("--no-plots"):
                require_matplotlib()
        metrics, world, out = _start(args, labelled=args.prompts is None)
        scorers = _scorers(args, metrics, world)
        plan = _plan(args)
        pipe = _pipeline(args.model, world)
        settings = _settings(args, pipe)
        ctx = _context(args, scorers, metrics, world, len(plan), stderr_progress("unnoise eval sweep"))
        points = sweep(pipe, plan, settings, ctx)
        if points is not None:
            record = {**header(ctx, _model_source(pipe), plan.source, len(plan), plan.seed), "points": points}
            with _user_errors("--out"):
                paths = write_sweep(record, out, plots=not args.no_plots)
            for path in paths:
                print(path)
    teardown()


# -- pieces ---------------------------------------------------------------------------------------------------------


def _start(args: argparse.Namespace, *, labelled: bool | None) -> tuple[tuple[str, ...], World, Path]:
    """Check the flags that need no model (``labelled``: digit prompts, None if not known yet); join the group."""
    if args.out is None:
        raise UsageError("argument --out: required (the folder for the results)")
    with _user_errors("--metrics"):
        default = ("fid", "kid", "pr", "adherence") if labelled else ("fid", "kid", "pr")
        metrics = parse_metrics(args.metrics) if args.metrics else default
        if "adherence" in metrics and labelled is False:
            raise ValueError("adherence needs digit prompts, and --prompts gives others; leave out one or the other")
    with _user_errors("--reference"):
        check_spec(args.reference, "--reference")
    if args.floor not in (None, "none"):
        with _user_errors("--floor"):
            check_spec(args.floor, "--floor")
    if args.num_images < 1:
        raise UsageError(f"argument -n: {args.num_images} is not allowed; expected an integer >= 1")
    if args.batch_size < 1:
        raise UsageError(f"argument --batch-size: {args.batch_size} is not allowed; expected an integer >= 1")
    return metrics, _world(args.device), args.out


def _world(device: str) -> World:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: 'cuda' is not usable here: no CUDA device; allowed here: cpu, auto")
    return setup(device)


def _plan(args: argparse.Namespace) -> SamplePlan:
    """The images to generate: digit captions in equal shares, or the lines of --prompts."""
    if args.prompts is not None:
        with _user_errors("--prompts"):
            return prompt_plan(read_prompts(args.prompts), args.num_images, args.seed, str(args.prompts))
    with _user_errors("-n"):
        return digit_plan(args.num_images, args.seed)


def _pipeline(model: Path | None, world: World) -> Pipeline:
    """The pipeline at ``model`` (the embedded default if None) on this process's device."""
    with _user_errors("--model"):
        return Pipeline.from_pretrained(model if model is not None else "default").to(world.device)


def _settings(args: argparse.Namespace, pipe: Pipeline) -> list[Setting]:
    settings = []
    combos = itertools.product(args.samplers or [None], args.sweep_steps or [None], args.sweep_guidance or [None])
    for sampler, steps, guidance in combos:
        with _user_errors(None, {"sampler": "--samplers", "steps": "--steps", "guidance_scale": "--guidance"}):
            settings.append(
                resolve_setting(pipe, sampler=sampler, steps=steps, guidance_scale=guidance, spacing=args.spacing)
            )
    return settings


def _scorers(args: argparse.Namespace, metrics: tuple[str, ...], world: World) -> Scorers:
    """The FID feature extractor and the networks of the other metrics asked for, on this process's device."""
    device = world.device
    with _user_errors("--classifier" if args.features == "mnist" else "--inception-weights"):
        features = load_extractor(
            args.features, classifier=args.classifier, inception_weights=args.inception_weights,
            resize=args.resize, allow_pickle=args.allow_pickle, device=device,
        )  # fmt: skip
    classifier = inception = clip = None
    if "adherence" in metrics:
        with _user_errors("--classifier"):
            classifier = features if isinstance(features, MNISTFeatures) else load_extractor(
                "mnist", classifier=args.classifier, device=device)  # fmt: skip
    if "is" in metrics:
        with _user_errors("--inception-weights"):
            inception = features if args.features == "inception" else load_extractor(
                "inception", inception_weights=args.inception_weights, resize=args.resize,
                allow_pickle=args.allow_pickle, device=device)  # fmt: skip
    if "clip" in metrics:
        if args.clip is None:
            raise UsageError("argument --clip: the CLIP score needs a CLIP model folder (a saved CLIPModel)")
        with _user_errors("--clip"):
            clip = CLIPEmbedder.from_folder(args.clip, device=device)
    return Scorers(features, classifier, inception, clip)


def _context(
    args: argparse.Namespace,
    scorers: Scorers,
    metrics: tuple[str, ...],
    world: World,
    n: int,
    progress: Progress | None = None,
    *,
    report_images: bool = False,
) -> Context:
    """The run's context; the reference and the floor (at ``n`` images) are loaded on the main process only."""
    reference = floor = None
    if world.is_main:
        with _user_errors("--reference"):
            reference = load_reference(args.reference, scorers.features, cache_dir=args.cache_dir)
        floor_spec = DEFAULT_FLOOR.get(args.reference) if args.floor is None else args.floor
        if "fid" in metrics and floor_spec not in (None, "none"):
            with _user_errors("--floor"):
                held_out = load_reference(floor_spec, scorers.features, cache_dir=args.cache_dir)
                floor = real_vs_real_floor(reference, held_out, n)
    return Context(scorers, metrics, reference, floor, world, args.batch_size, progress, report_images)


def _folder(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = image_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no images")
    return files


def _model_source(pipe: Pipeline) -> dict[str, Any]:
    return {"model": pipe.name, "model_hash": pipe.model_hash}


def _print(paths: list[Path], metrics: dict) -> None:
    for path in paths:
        print(path)
    if "fid" in metrics:
        floor = metrics["fid_floor"]
        beside = f" (real-vs-real floor {floor['mean']:.3f} at {floor['n']} images)" if floor else ""
        print(f"FID {metrics['fid']:.3f}{beside}")
    if "adherence" in metrics:
        print(f"adherence {metrics['adherence']['overall']:.1%}")


@contextlib.contextmanager
def _reported(args: argparse.Namespace) -> Iterator[None]:
    """Print a user error as one line through the parser (exit status 2)."""
    try:
        yield
    except UsageError as error:
        teardown()
        args.error(str(error))


def _user_errors(flag: str | None = None, flags: dict[str, str] = _FLAGS) -> contextlib.AbstractContextManager[None]:
    """ValueError, OSError and RuntimeError become a ``UsageError`` naming ``flag`` (else the pipeline field's)."""
    return user_errors(flag, flags, kinds=(ValueError, OSError, RuntimeError))
