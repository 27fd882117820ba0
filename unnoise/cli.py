"""The ``unnoise`` command: ``unnoise generate "prompt" ...`` writes PNGs through ``Pipeline``; ``unnoise --help``.

A thin typed layer: flags become ``Pipeline.__call__`` keyword arguments, and the pipeline validates them. User
errors (bad values, unreadable files, a missing model) print one line ``unnoise generate: error: argument FLAG:
...`` and exit with status 2, as argparse does; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from PIL import Image

from unnoise.cli_convert import add_parser as add_convert_parser
from unnoise.cli_safety import add_parser as add_safety_parser
from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS
from unnoise.eval.cli import add_parser as add_eval_parser
from unnoise.pipeline import Pipeline
from unnoise.pipeline.hires import UPSCALERS, Hires
from unnoise.pipeline.images import INPAINTING_FILLS, RESIZE_MODES
from unnoise.pipeline.png import call_arguments, make_grid, parse_parameters, read_png_parameters, save_png
from unnoise.safety import PROVENANCE_KEYS, SafetyConfig, image_verdict
from unnoise.serve.cli import add_parser as add_serve_parser
from unnoise.usage import UsageError, user_errors

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

# Pipeline keyword -> the flag that sets it, so that the pipeline's "name=value is not allowed" names the flag.
_FLAGS = {
    "prompt": "prompt",
    "negative_prompt": "--negative",
    "num_images": "-n",
    "steps": "--steps",
    "sampler": "--sampler",
    "spacing": "--spacing",
    "guidance_scale": "--guidance",
    "seed": "--seed",
    "width": "--size",
    "height": "--size",
    "image": "--init-image",
    "strength": "--strength",
    "mask": "--mask",
    "resize_mode": "--resize-mode",
    "mask_blur": "--mask-blur",
    "mask_invert": "--invert-mask",
    "inpainting_fill": "--inpainting-fill",
    "inpaint_full_res": "--inpaint-full-res",
    "inpaint_full_res_padding": "--inpaint-full-res",
    "paste_back": "--no-paste-back",
    "hires": "--hires",
    "cache_interval": "--cache",
    "cache_range": "--cache-range",
    "hires.scale": "--hires-scale",
    "hires.upscaler": "--hires-upscaler",
    "hires.steps": "--hires-steps",
    "hires.strength": "--hires-strength",
    "guidance_rescale": "--from-png",
    "guidance_interval": "--from-png",
    "loras": "--lora",
    "prompt_syntax": "--plain-prompts",
}
# The setting that the pipeline records when a call was given its initial noise instead of a seed.
_GIVEN_NOISE = "Initial noise"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; expected WIDTHxHEIGHT, e.g. 512x512")
    return int(match[1]), int(match[2])


def _lora(text: str) -> tuple[str, float | None]:
    """``FILE[:SCALE]`` as (FILE, SCALE or None). A path may hold ':' itself: split at the last one only where what
    follows is a number."""
    head, sep, tail = text.rpartition(":")
    try:
        scale = float(tail) if sep and head else None
    except ValueError:
        scale = None
    if scale is None:
        return text, None
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"{text!r}: scale {tail!r} is not allowed; expected a finite number")
    return head, scale


def _folder(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unnoise", description="Image diffusion from scratch: generate, train, evaluate, serve.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(commands)
    _add_train(commands)
    _add_train_classifier(commands)
    add_eval_parser(commands)
    add_serve_parser(commands)
    add_safety_parser(commands)
    add_convert_parser(commands)
    return parser


def _add_train_classifier(commands: Any) -> None:
    p = commands.add_parser(
        "train-classifier",
        help="train the project's MNIST classifier (adherence and FID-MNIST features)",
        description="Train the MNIST digit classifier with the shipped settings (ClassifierTrainConfig) and save it "
        "with metrics.json to OUT.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="OUT", help="folder to write")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: the shipped run's)")
    p.add_argument("--seed", type=int, metavar="S", help="seed (default 0)")
    p.set_defaults(run=train_classifier_command, error=p.error)


def train_classifier_command(args: argparse.Namespace) -> None:
    from unnoise.train.classifier import ClassifierTrainConfig, train_classifier

    given = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    with _user_errors("--steps" if "steps" in given else "--seed"):
        config = ClassifierTrainConfig(**given)
    train_classifier(config, args.out)


def _add_train(commands: Any) -> None:
    p = commands.add_parser(
        "train",
        help="train a diffusion U-Net or an autoencoder from a TOML config",
        description="Train as CONFIG says (see docs/training.md); checkpoints, log.csv, samples/ and the exported "
        "model/ go to its out_dir. Run under `torchrun --nproc_per_node N` for data-parallel training.",
    )
    p.add_argument("config", type=Path, help="the TOML training config")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, VALUE in TOML syntax (e.g. --set train.steps=100 --set out_dir='\"runs/x\"')",
    )
    p.set_defaults(run=train_command, error=p.error)


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"argument --set: {text!r} is not KEY=VALUE")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value  # a bare word: a string


def _add_generate(commands: Any) -> None:
    p = commands.add_parser(
        "generate",
        help="text-to-image, image-to-image and inpainting; writes PNGs with their parameters",
        description="Generate images into OUT as NNNNN-SEED.png, each carrying its generation parameters in a "
        "PNG text chunk (as AUTOMATIC1111), plus grid-NNNNN.png when -n > 1. With --from-png FILE the settings "
        "come from FILE's parameters and any flag given explicitly overrides them; without overrides the image "
        "is reproduced bit-exactly on the same machine and model. The init image and mask are not recorded in "
        "a PNG: pass them again; its LoRAs are found by name among the --lora files and in --lora-dir, and must be "
        "the files it was made with (their hashes are checked). Unset flags take the model's defaults.",
    )
    p.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png)")
    p.add_argument("-n", "--num-images", type=int, metavar="N", help="images in one batch, seeds SEED..SEED+N-1")
    p.add_argument("--steps", type=int, metavar="S", help="sampling steps (default: the model's)")
    p.add_argument("--sampler", choices=list(SAMPLERS), metavar="NAME", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--spacing", choices=SPACINGS, metavar="NAME", help=f"sigma grid, one of {', '.join(SPACINGS)}")
    p.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the first image (default: random)")
    p.add_argument("--size", type=_size, metavar="WxH", help="width x height in pixels (default: the model's)")
    p.add_argument("--model", type=Path, metavar="PATH", help="a diffusers Stable Diffusion or SDXL folder, an "
                   "unnoise pipeline folder, a single-file SD 1.x/2.x or SDXL checkpoint (.safetensors), or 'lcm': the "
                   "embedded model distilled to 1 step (default: the embedded default model)")  # fmt: skip
    p.add_argument("--init-image", type=Path, metavar="F", help="image-to-image from this image")
    p.add_argument("--strength", type=float, metavar="X", help="share of the steps to run from --init-image, (0, 1]")
    p.add_argument("--mask", type=Path, metavar="F", help="inpaint where this image is white (needs --init-image)")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, help="fit --init-image of another size than --size: "
                   "resize (stretch), crop, fill or latent (resize the latents), as AUTOMATIC1111")  # fmt: skip
    p.add_argument("--mask-blur", type=float, metavar="X", help="std in pixels of the mask's blur (default 4)")
    p.add_argument("--invert-mask", action="store_true", help="inpaint where --mask is black")
    p.add_argument("--inpainting-fill", choices=INPAINTING_FILLS, help="what lies under the mask before sampling "
                   "(default original)")  # fmt: skip
    p.add_argument("--inpaint-full-res", type=int, nargs="?", const=32, metavar="PADDING", help="inpaint only the "
                   "mask's box plus PADDING pixels (default 32), at --size, then paste it back")  # fmt: skip
    p.add_argument("--no-paste-back", action="store_true", help="keep the generated pixels outside the mask too")
    p.add_argument("--hires", action="store_true", help="hires fix: a second, upscaled img2img pass (2x, latent)")
    p.add_argument("--hires-scale", type=float, metavar="X", help="hires fix at X times --size (implies --hires)")
    p.add_argument("--hires-upscaler", choices=list(UPSCALERS), metavar="NAME", help="hires fix upscaler, one of "
                   f"{', '.join(UPSCALERS)} (implies --hires)")  # fmt: skip
    p.add_argument("--hires-steps", type=int, metavar="N", help="steps of the hires pass (default: --steps)")
    p.add_argument("--hires-strength", type=float, metavar="X", help="denoising strength of the hires pass "
                   "(default 0.7)")  # fmt: skip
    p.add_argument("--cache", type=int, metavar="N", help="feature caching: a full U-Net call every N calls, "
                   "the outer level only between them (faster, approximate; default 1: none)")  # fmt: skip
    p.add_argument("--cache-range", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"), help="reuse cached "
                   "features only at sigmas in this range (default: everywhere)")  # fmt: skip
    p.add_argument("--from-png", type=Path, metavar="FILE", help="regenerate FILE from its parameters")
    p.add_argument("--lora", type=_lora, action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA file (or the name of one in --lora-dir) at SCALE (default 1; repeatable); its "
                   "name is the file's stem")  # fmt: skip
    p.add_argument("--lora-dir", type=_folder, metavar="DIR", help="LoRA files found by name: those that a "
                   "--from-png image names, and --lora NAME")  # fmt: skip
    p.add_argument("--plain-prompts", action="store_true", help="prompts go to the text encoder as written: no "
                   "(emphasis:1.2), [edit:ing:0.5], BREAK, long-prompt windows or <lora:name:w> tags")  # fmt: skip
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the U-Net as CUDA graphs (a CUDA device only)")
    p.add_argument("--no-safety", action="store_true", help="no prompt filter, image filter or watermark")
    p.add_argument("--safety-clip", type=Path, metavar="DIR", help="a CLIP model folder: also filter images")
    p.add_argument(
        "-o", "--output", type=Path, default=Path("outputs"), metavar="OUT", help="folder (default: %(default)s)"
    )
    p.set_defaults(run=generate, error=p.error)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``unnoise`` console script."""
    args = build_parser().parse_args(argv)
    # Our progress bar only: transformers (imported later, to load text encoders) reads this when it is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args.run(args)
    except UsageError as error:
        args.error(str(error))
    except KeyboardInterrupt:
        print(f"\nunnoise {args.command}: cancelled", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def train_command(args: argparse.Namespace) -> None:
    from unnoise.train import load_config, train

    overrides = dict(_override(item) for item in args.set)
    with _user_errors("config"):
        cfg = load_config(args.config, overrides)
    with _user_errors("config"):
        folder = train(cfg, resume=args.resume)
    print(f"unnoise train: model written to {folder}")


# -- generate -------------------------------------------------------------------------------------------------------


def _user_errors(argument: str | None = None) -> contextlib.AbstractContextManager[None]:
    """ValueError/OSError become a ``UsageError`` naming ``argument`` (else the flag of the pipeline's field)."""
    return user_errors(argument, _FLAGS)


class ProgressBar:
    """A text progress bar on stderr, updated by the pipeline's step callback."""

    def __init__(self, width: int = 30):
        self.width, self.start = width, time.perf_counter()

    def __call__(self, step: int, total: int, sigma: float, preview: torch.Tensor) -> None:
        done = step + 1
        filled = self.width * done // total
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        # sigma is padded: "\r" overwrites the previous line, which a shorter one would leave a tail of
        sys.stderr.write(f"\rsampling [{bar}] {done}/{total} steps, {elapsed:.1f}s, sigma {sigma:<8.3g}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def generate(args: argparse.Namespace) -> None:
    """``unnoise generate``: load the model, run the pipeline with a progress bar, write PNGs, print their paths."""
    settings, keep, recorded = _settings(args)
    pipe = _load(args.model, args.device)
    pipe.prompt_syntax = not args.plain_prompts
    if args.cuda_graphs:
        with _user_errors("--cuda-graphs"):
            pipe.enable_cuda_graphs()
    if not args.no_safety:
        with _user_errors("--safety-clip"):
            pipe.enable_safety(SafetyConfig(clip_model=args.safety_clip))
    if recorded.get("model_hash") not in (None, pipe.model_hash):
        _warn(
            f"{args.from_png} was made with model {recorded.get('model')!r} (hash {recorded['model_hash']}), not "
            f"{pipe.name!r} (hash {pipe.model_hash}); the image will differ"
        )
    loras = _loras(pipe, args, settings.get("loras") or {}, recorded.get("lora_hashes") or {})
    if loras is not None:
        settings["loras"] = loras
    with _user_errors():
        images = pipe(**settings, callback=ProgressBar())
    if keep is not None:
        images = images[keep : keep + 1]
    if pipe.safety is not None:
        images = _delivered(pipe, images)
    with _user_errors("-o"):
        paths = write_images(images, args.output)
    for path in paths:
        print(path)


def _delivered(pipe: Pipeline, images: list[Image.Image]) -> list[Image.Image]:
    """Images as the safety config delivers them: a flagged one is withheld (with a warning) or blurred."""
    out = []
    for i, image in enumerate(images):
        verdict = image_verdict(image)
        if verdict is not None and verdict.flagged:
            _warn(f"image {i} was flagged by the image filter: {verdict.reason}")
        delivered = pipe.safety.deliver(image)
        if delivered is not None:
            out.append(delivered)
    return out


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], int | None, dict[str, Any]]:
    """(pipeline keyword arguments, index of the batch image to keep when replaying a batch, the PNG's parameters)."""
    size = args.size or (None, None)
    given = dict(
        prompt=args.prompt, negative_prompt=args.negative, num_images=args.num_images, steps=args.steps,
        sampler=args.sampler, spacing=args.spacing, guidance_scale=args.guidance, seed=args.seed, width=size[0],
        height=size[1], image=args.init_image, strength=args.strength, mask=args.mask,
        resize_mode=args.resize_mode, mask_blur=args.mask_blur, mask_invert=args.invert_mask or None,
        inpainting_fill=args.inpainting_fill, inpaint_full_res=args.inpaint_full_res is not None or None,
        inpaint_full_res_padding=args.inpaint_full_res, paste_back=False if args.no_paste_back else None,
        cache_interval=args.cache, cache_range=tuple(args.cache_range) if args.cache_range else None,
    )  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    hires = dict(scale=args.hires_scale, upscaler=args.hires_upscaler, steps=args.hires_steps,
                 strength=args.hires_strength)  # fmt: skip
    hires = {k: v for k, v in hires.items() if v is not None}
    settings: dict[str, Any] = {}
    recorded: dict[str, Any] = {"extra": {}}
    keep = None
    if args.from_png is not None:
        with _user_errors("--from-png"):
            recorded = read_png_parameters(args.from_png)
            if "num_images" in given or "seed" in given:  # a new batch from the image's settings
                settings = call_arguments({**recorded, "batch_size": None, "batch_pos": None})[0]
            else:  # regenerate the image's whole batch: bit-exact, as the batch size may change float rounding
                settings, keep = call_arguments(recorded)
        if _GIVEN_NOISE in recorded["extra"] and "seed" not in given:
            raise UsageError(f"argument --from-png: {args.from_png} was made from given initial noise, not a seed")
        ignored = sorted(set(recorded["extra"]) - set(PROVENANCE_KEYS))  # provenance is not a setting
        if ignored:
            _warn(f"{args.from_png}: settings {ignored} are not applied")
    elif args.prompt is None:
        raise UsageError("argument prompt: required unless --from-png FILE is given")
    settings |= given
    if hires or args.hires:  # the flags given change the recorded hires fix, if any
        settings["hires"] = dataclasses.replace(settings.get("hires") or Hires(), **hires)
    if "strength" in settings and "image" not in settings:
        if "strength" in given:
            raise UsageError(f"argument --strength: {args.strength} applies to --init-image, which is not given")
        raise UsageError(
            f"argument --from-png: {args.from_png} was made from an init image (strength {settings['strength']}), "
            "which a PNG does not hold; pass it with --init-image (and --mask if it was inpainted)"
        )
    return settings, keep, recorded


def _loras(
    pipe: Pipeline, args: argparse.Namespace, recorded: dict[str, float], hashes: dict[str, str]
) -> dict[str, float] | None:
    """Load the ``--lora`` files and the adapters that the ``--from-png`` image names (``recorded``, found by name
    among them and in ``--lora-dir``); the request's ``loras`` (None when neither names any).

    A ``--lora`` overrides the image's scale of its adapter when it gives one. A recorded adapter whose file has
    another hash than ``hashes`` records is an error when the file was found by name in ``--lora-dir`` (an image is
    not reproduced with other weights, and same-named versions of a LoRA are common), a warning when the file was
    named with ``--lora`` (the user chose it, as ``--model``: that model's other hash is a warning too)."""
    pipe.lora_dir = args.lora_dir
    wanted, chosen = dict(recorded), set()
    for text, scale in args.lora:
        path = _lora_file(pipe, text, scale)
        with _user_errors("--lora"):
            name = pipe.load_lora(path, 1.0 if scale is None else scale)
        wanted[name] = scale if scale is not None else recorded.get(name, 1.0)
        chosen.add(name)
    available = pipe.available_loras()
    for name in recorded:
        if name not in available:
            where = f"in --lora-dir {args.lora_dir}" if args.lora_dir else "in a --lora-dir"
            digest = hashes.get(name, "not recorded")
            raise UsageError(
                f"argument --from-png: {args.from_png} was made with LoRA {name!r} (hash {digest}), which is not a "
                f"--lora file nor {where}; pass it with --lora FILE or --lora-dir DIR"
            )
        if name not in pipe.lora_info:
            with _user_errors("--lora-dir"):
                pipe.load_lora(available[name], 0.0, name)
        _check_lora_hash(pipe, args.from_png, name, hashes.get(name), name in chosen)
    return wanted if wanted else None


def _lora_file(pipe: Pipeline, text: str, scale: float | None) -> Path:
    """The file of ``--lora TEXT``: a path, else the name of a file of ``--lora-dir``."""
    if Path(text).is_file():
        return Path(text)
    by_name = pipe.available_loras()
    if by_name.get(text) is not None:
        return by_name[text]
    head, _, tail = text.rpartition(":")
    if scale is None and head and (Path(head).is_file() or head in by_name):
        raise UsageError(f"argument --lora: {text!r}: scale {tail!r} is not a number; expected FILE[:SCALE], e.g. "
                         f"{head}:0.8")  # fmt: skip
    if pipe.lora_dir is None:
        raise UsageError(f"argument --lora: {text!r} is not a file (a LoRA name needs --lora-dir DIR)")
    names = ", ".join(sorted(by_name)) or "no .safetensors files"
    raise UsageError(f"argument --lora: {text!r} is not a file nor a LoRA of --lora-dir {pipe.lora_dir} ({names})")


def _check_lora_hash(pipe: Pipeline, image: Path, name: str, recorded: str | None, chosen: bool) -> None:
    actual = pipe.lora_info[name].hash
    if recorded is None:
        _warn(f"{image} records no hash for LoRA {name!r}: cannot check that {pipe.lora_info[name].path} is its file")
        return
    if actual == recorded:
        return
    message = (
        f"{image} was made with LoRA {name!r} of hash {recorded}, but {pipe.lora_info[name].path} has hash {actual}"
    )
    if chosen:
        _warn(f"{message}; the image will differ")
        return
    raise UsageError(f"argument --lora-dir: {message}; pass the file it was made with (--lora FILE to use this one)")


def _load(model: Path | None, device: str | None) -> Pipeline:
    try:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise UsageError(f"argument --device: {error}") from None
    with _user_errors("--model"):
        pipe = Pipeline.from_pretrained(model if model is not None else "default")
    try:
        return pipe.to(target)
    except (RuntimeError, AssertionError) as error:  # torch asserts that it was built with CUDA
        raise UsageError(f"argument --device: {str(target)!r} is not usable here: {error}") from None


def _warn(message: str) -> None:
    print(f"unnoise generate: warning: {message}", file=sys.stderr)


def write_images(images: list[Image.Image], folder: Path) -> list[Path]:
    """Write ``NNNNN-SEED.png`` (numbered on from the folder's highest) with parameters, and a grid if several."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m[1]) for p in folder.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
    first = max(numbers, default=-1) + 1
    paths = []
    for i, image in enumerate(images):
        seed = parse_parameters(image.info["parameters"])["seed"]
        paths.append(folder / f"{first + i:05d}-{seed}.png")
        save_png(image, paths[-1])
    if len(images) > 1:
        paths.append(folder / f"grid-{first:05d}.png")
        make_grid(images).save(paths[-1])
    return paths


if __name__ == "__main__":
    main()
