"""``unnoise serve``: the HTTP server's flags, one per ``ServeConfig`` field, and its entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from unnoise.pipeline.loading import resolve_model
from unnoise.serve.config import DEFAULT_MODEL, ServeConfig

# ServeConfig fields whose flag is not the field's name with dashes.
_FLAGS = {"vram_budget_gb": "--vram-budget", "api_keys": "--api-key", "timeout_s": "--timeout",
          "drain_timeout_s": "--drain-timeout", "batch_wait_s": "--batch-wait", "lease_s": "--lease"}  # fmt: skip


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to an argparse subparsers object (as ``unnoise.cli`` adds its commands)."""
    d = ServeConfig()
    p = commands.add_parser(
        "serve",
        help="HTTP API (OpenAI Images, AUTOMATIC1111 txt2img, jobs with progress) and a web page",
        description="Serve text-to-image over HTTP with batching, a VRAM budget, progress events, cancellation, "
        "Prometheus metrics and a web page at /. See docs/serving.md. SIGTERM drains: running jobs finish, new "
        "ones get 503, then the server exits. API keys may also come from $UNNOISE_API_KEYS (comma-separated).",
    )
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="an unnoise pipeline folder, a diffusers Stable Diffusion or SDXL folder or a single-file SD "
                   "1.x/2.x or SDXL checkpoint (.safetensors), or 'lcm': the embedded model distilled to 1 step "
                   "(default: the embedded default model)")  # fmt: skip
    p.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="port (default: %(default)s)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="U-Net dtype (default: float16 on "
                   "cuda, float32 on cpu)")  # fmt: skip
    p.add_argument("--cuda-graphs", action="store_true", help="replay the U-Net as CUDA graphs (a CUDA device only)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's; 1 is often "
                   "fastest for small models on a busy machine)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help="jobs waiting before 429 (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="B",
                   help="images in one sampler run, and in one request (default: %(default)s)")  # fmt: skip
    p.add_argument("--batch-wait", type=float, default=d.batch_wait_s, metavar="S", help="seconds a batch may wait "
                   "for the last batch's clients to come back (default: %(default)s)")  # fmt: skip
    p.add_argument("--vram-budget", type=float, metavar="GB", help="memory the planner may fill (default: 90%% of "
                   "the GPU, or half the RAM on cpu)")  # fmt: skip
    p.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accept this key (repeatable); "
                   "with none, no key is needed")  # fmt: skip
    p.add_argument("--db", type=Path, metavar="FILE", help=f"SQLite file of jobs and images: this server's own "
                   f"queue (default: {d.db})")  # fmt: skip
    p.add_argument("--store", metavar="URL", help="a PostgreSQL database (postgresql://user@host/db) holding jobs and "
                   "images instead of --db: a queue shared by several replicas of this server (docs/serving.md, "
                   "'Several replicas')")  # fmt: skip
    p.add_argument("--lease", type=float, default=d.lease_s, metavar="S", help="seconds a job claimed by a worker "
                   "stays its own without a renewal; a crashed worker's jobs run again after it (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--images-dir", type=Path, metavar="DIR", help="keep the PNGs in files of this folder (mounted by "
                   "every replica) instead of the database")  # fmt: skip
    p.add_argument("--timeout", type=float, default=d.timeout_s, metavar="S",
                   help="seconds a job may take from submission, queue included (default: %(default)s)")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, metavar="S",
                   help="on SIGTERM, seconds to wait for accepted jobs (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=d.max_steps, metavar="S", help="(default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, metavar="P",
                   help="width x height at most (default: %(default)s)")  # fmt: skip
    p.add_argument("--any-size", action="store_true",
                   help="also serve sizes that the model does not declare (default: refused)")  # fmt: skip
    p.add_argument("--no-warmup", action="store_true", help="ready without a warm-up generation")
    p.add_argument("--no-safety", action="store_true", help="turn off the prompt and image filters (docs/safety.md)")
    p.add_argument("--safety-clip", type=Path, metavar="DIR", help="a CLIP model folder: also filter images")
    p.add_argument("--lora-dir", type=Path, metavar="DIR", help="LoRA files (*.safetensors) that requests may name "
                   "by file stem in their loras field (loaded on first use)")  # fmt: skip
    p.add_argument("--model-dir", type=Path, metavar="DIR", help="models that AUTOMATIC1111 clients may switch to "
                   "(POST /sdapi/v1/options sd_model_checkpoint): unnoise or diffusers pipeline folders and single "
                   ".safetensors checkpoints, in subfolders too")  # fmt: skip
    p.set_defaults(run=run, error=p.error)
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ``ServeConfig`` of parsed flags; ValueError naming the field if a value is not allowed."""
    return ServeConfig(
        model=args.model if args.model is not None else DEFAULT_MODEL, host=args.host, port=args.port,
        device=args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs, threads=args.threads,
        max_queue=args.max_queue, max_batch=args.max_batch, batch_wait_s=args.batch_wait,
        vram_budget_gb=args.vram_budget, api_keys=tuple(args.api_key), db=args.db or ServeConfig.db,
        store=args.store, lease_s=args.lease, images_dir=args.images_dir, timeout_s=args.timeout,
        drain_timeout_s=args.drain_timeout,
        max_steps=args.max_steps, max_pixels=args.max_pixels, warmup=not args.no_warmup, safety=not args.no_safety,
        safety_clip=args.safety_clip, any_size=args.any_size, lora_dir=args.lora_dir, model_dir=args.model_dir,
    ).with_env_keys()  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """``unnoise serve``: check the flags and the model folder, then serve until SIGTERM."""
    if args.store is not None and args.db is not None:
        args.error("argument --store: not allowed with argument --db (the jobs are in one store: a PostgreSQL "
                   "database shared by replicas, or this server's SQLite file)")  # fmt: skip
    try:
        config = config_from_args(args)
    except ValueError as error:
        field = str(error).split("=")[0].split(":")[0]
        args.error(f"argument {_FLAGS.get(field, '--' + field.replace('_', '-'))}: {error}")
    try:  # the model loads in the background (reported by /ready); what can be checked now is checked now
        resolve_model(args.model if args.model is not None else "default")
    except OSError as error:
        args.error(f"argument --model: {error}")
    if config.lora_dir is not None and not config.lora_dir.is_dir():
        args.error(f"argument --lora-dir: {config.lora_dir} is not a folder")
    if config.model_dir is not None and not config.model_dir.is_dir():
        args.error(f"argument --model-dir: {config.model_dir} is not a folder")
    if config.store is not None:  # a database that cannot be reached: this line, not uvicorn's startup traceback
        from unnoise.serve.store import StoreUnavailable

        try:
            config.open_store().close()
        except StoreUnavailable as error:
            args.error(f"argument --store: {error}")
    from unnoise.serve.server import serve  # fastapi and uvicorn only when serving

    print(f"unnoise serve: {config.model} on http://{config.host}:{config.port}", file=sys.stderr)
    serve(config)


def main(argv: list[str] | None = None) -> None:
    """``python -m unnoise.serve``: the same command without the ``unnoise`` entry point."""
    parser = argparse.ArgumentParser(prog="unnoise")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    args.run(args)
