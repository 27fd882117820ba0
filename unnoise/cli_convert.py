"""``unnoise convert SRC DST --to diffusers|single-file|unnoise``: a subcommand for ``unnoise.cli`` (``add_parser``).

A thin layer over ``unnoise.pipeline.convert.convert``; errors are one line ``unnoise convert: error: ...``, exit
status 2, as the other commands print them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from unnoise.core.denoisers import PREDICTIONS
from unnoise.pipeline.convert import LAYOUTS, convert
from unnoise.usage import user_errors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_parser(commands: Any) -> None:
    """Add ``convert`` to ``commands`` (the ``unnoise`` parser's ``add_subparsers()``)."""
    p = commands.add_parser(
        "convert",
        help="convert a model between the single-file, diffusers and unnoise layouts",
        description="Write SRC (a .safetensors/.ckpt single file of Stable Diffusion 1.x/2.x, SDXL base or refiner, "
        "or their inpainting variants, a diffusers folder or an unnoise pipeline folder) to DST in another layout, "
        "one tensor at a time. Tensors are copied bit for bit unless --dtype converts them. A single file holds no "
        "configs: they come from --config or from the configs shipped for its family; its prediction type is "
        "detected (docs/single-file.md).",
    )
    p.add_argument("src", type=Path, help="a single file, a diffusers folder or an unnoise pipeline folder")
    p.add_argument("dst", type=Path, help="the file (.safetensors, for --to single-file) or folder to write")
    p.add_argument("--to", required=True, choices=LAYOUTS, help="the layout to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="convert floating-point tensors (default: keep each's)")
    p.add_argument("--config", type=Path, metavar="DIR", help="single-file SRC: a diffusers or unnoise folder with "
                   "its configs (default: the family's shipped configs)")  # fmt: skip
    p.add_argument("--prediction", choices=PREDICTIONS, help="single-file SRC: the prediction type (default: detected)")
    p.add_argument("--ema", action="store_true", help="single-file SRC: take the EMA U-Net weights (model_ema.*)")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickled .ckpt/.bin (runs code in the file)")
    p.set_defaults(run=convert_command, error=p.error)


def convert_command(args: argparse.Namespace) -> None:
    """``unnoise convert``: write DST and print its path."""
    with user_errors():
        written = convert(
            args.src,
            args.dst,
            to=args.to,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            config=args.config,
            prediction=args.prediction,
            allow_pickle=args.allow_pickle,
            ema=args.ema,
        )
    print(written)
