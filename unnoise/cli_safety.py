"""``unnoise watermark detect|embed`` and ``unnoise redteam``: subcommands for ``unnoise.cli`` (``add_parser``).

Each ``add_*`` takes the ``add_subparsers()`` object and sets ``run`` (called with the parsed arguments) and
``error`` (the subparser's one-line usage error, exit status 2) as the other commands do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from unnoise.pipeline.png import add_provenance, read_provenance
from unnoise.safety import watermark
from unnoise.safety.provenance import WATERMARK, watermark_note

EXIT_NOT_FOUND = 1  # `watermark detect`: the file carries no watermark (as grep's "no match")


def add_parser(commands: Any) -> None:
    """Add ``watermark`` and ``redteam`` to ``commands`` (the ``unnoise`` parser's ``add_subparsers()``)."""
    add_watermark_parser(commands)
    add_redteam_parser(commands)


def add_watermark_parser(commands: Any) -> None:
    p = commands.add_parser(
        "watermark",
        help="detect or embed the invisible watermark",
        description="The invisible DWT-DCT watermark that generated images carry (docs/safety.md).",
    )
    actions = p.add_subparsers(dest="watermark_command", required=True, metavar="ACTION")
    detect = actions.add_parser(
        "detect",
        help="print the payload and confidence of FILE's watermark",
        description="Print the watermark payload and its confidence (the share of the 768 embedded slots that "
        "agree with the decoded payload: about 0.6 for an unmarked image, near 1 for a marked one). Exit status 0 "
        "when a watermark is found, 1 when not.",
    )
    detect.add_argument("file", type=Path, help="an image file (PNG, JPEG, ...)")
    detect.add_argument("--key", type=_integer, default=watermark.DEFAULT_KEY, metavar="K", help="watermark key")
    detect.set_defaults(run=detect_command, error=detect.error)
    embed = actions.add_parser(
        "embed",
        help="write a watermarked copy of an image",
        description="Write OUT, a copy of FILE carrying the watermark (PNG keeps FILE's parameters chunk, with a "
        f"{WATERMARK!r} entry added). Images under {watermark.MIN_SIDE} px on a side are refused.",
    )
    embed.add_argument("file", type=Path, help="the image to mark")
    embed.add_argument("out", type=Path, help="where to write the marked image (format from the extension)")
    embed.add_argument("--payload", type=_integer, default=watermark.DEFAULT_PAYLOAD, metavar="N",
                       help="32-bit payload, decimal or 0x hex (default: 0x%(default)08x)")  # fmt: skip
    embed.add_argument("--key", type=_integer, default=watermark.DEFAULT_KEY, metavar="K", help="watermark key")
    embed.set_defaults(run=embed_command, error=embed.error)


def add_redteam_parser(commands: Any) -> None:
    p = commands.add_parser(
        "redteam",
        help="run the prompt filter's red-team suite and write the report",
        description="Run the red-team suite through the prompt filter and print the report (block rate per "
        "category and obfuscation, false positives, misses); with --report, write it into that markdown file. "
        "With --calibrate, first refit the semantic layer and its thresholds from categories.toml and "
        "calibration.toml in DATA.",
    )
    p.add_argument("--suite", type=Path, metavar="FILE", help="suite TOML (default: the package's redteam.toml)")
    p.add_argument("--data", type=Path, metavar="DIR", help="filter data folder (default: the package's)")
    p.add_argument("--report", type=Path, metavar="FILE", help="markdown file to write the report into")
    p.add_argument("--calibrate", action="store_true", help="refit the semantic layer and thresholds first")
    p.set_defaults(run=redteam_command, error=p.error)


def detect_command(args: argparse.Namespace) -> None:
    """``unnoise watermark detect FILE``."""
    image = _open(args, args.file)
    detection = watermark.detect(image, key=args.key)
    print(f"{args.file}: {detection.describe()}")
    recorded = image.info.get("parameters")
    if isinstance(recorded, str):
        note = read_provenance(recorded).get(WATERMARK)
        if note is not None:
            print(f"{args.file}: its parameters record {WATERMARK}: {note}")
    if not detection.detected:
        raise SystemExit(EXIT_NOT_FOUND)


def embed_command(args: argparse.Namespace) -> None:
    """``unnoise watermark embed FILE OUT``."""
    image = _open(args, args.file)
    try:
        marked = watermark.embed(image, args.payload, key=args.key)
    except ValueError as error:
        args.error(f"argument file: {error}")
    add_provenance(marked, {WATERMARK: watermark_note(args.payload)})
    info = PngImagePlugin.PngInfo()
    if "parameters" in marked.info:
        info.add_text("parameters", marked.info["parameters"])
    options = {"pnginfo": info} if args.out.suffix.lower() == ".png" else {}
    try:
        marked.save(args.out, **options)
    except (OSError, ValueError) as error:
        args.error(f"argument out: cannot write {args.out}: {error}")
    print(args.out)


def redteam_command(args: argparse.Namespace) -> None:
    """``unnoise redteam``: optionally recalibrate, then run the suite and print or write the report."""
    from unnoise.safety.prompt_filter import DATA, PromptFilter
    from unnoise.safety.redteam import load_suite, render_report, run_suite, write_report

    data = args.data or DATA
    suite = args.suite or DATA / "redteam.toml"
    for name, path in (("--data", data), ("--suite", suite)):
        if not path.exists():
            args.error(f"argument {name}: {path} does not exist")
    if args.calibrate:
        _calibrate(data)
    prompt_filter = PromptFilter.load(data)
    try:
        cases = load_suite(suite)
    except (ValueError, OSError) as error:
        args.error(f"argument --suite: {error}")
    results, seconds = run_suite(prompt_filter, cases)
    command = "unnoise redteam" + (" --calibrate" if args.calibrate else "")
    command += f" --report {args.report}" if args.report else ""
    shown = suite.name if args.suite is None else str(suite)
    report = render_report(results, seconds, suite=shown, command=command)
    if args.report is None:
        print(report)
        return
    try:
        write_report(report, args.report)
    except (ValueError, OSError) as error:
        args.error(f"argument --report: {error}")
    print(args.report)


def _calibrate(data: Path) -> None:
    from unnoise.models.text import MiniLMEncoder
    from unnoise.safety.calibrate import calibrate, write_calibration

    probe, report = calibrate(MiniLMEncoder.from_package(), data / "categories.toml", data / "calibration.toml")
    write_calibration(probe, report, data / "semantic.safetensors", data / "thresholds.json")
    stats = report["calibration"]
    print(
        f"unnoise redteam: calibrated on {stats['harmful_prompts']} harmful and {stats['benign_prompts']} benign "
        f"prompts: out of fold, {stats['harmful_blocked']} harmful and {stats['benign_blocked']} benign blocked; "
        f"wrote {data / 'thresholds.json'}",
        file=sys.stderr,
    )


def _open(args: argparse.Namespace, path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.copy()  # loads the pixels; keeps info (the PNG text chunks)
    except (OSError, UnidentifiedImageError) as error:
        args.error(f"argument file: cannot read {path} as an image: {error}")
        raise  # unreachable: error exits


def _integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (decimal or 0x hex)") from None
