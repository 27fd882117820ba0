"""Loading a full-size single file: our ``Pipeline.from_single_file`` against diffusers' ``from_single_file``, time and
memory.

    python benchmarks/loading.py --report docs/benchmarks/loading.md  # fp32, fp16, bf16 files, 5 runs (~10 min)
    python benchmarks/loading.py --dtypes fp16 --runs 3               # one file, the table to stdout
    python benchmarks/loading.py --tiny --runs 1                      # a tiny model: checks that the script runs

The benchmark writes its own files: every tensor of SD 1.5's U-Net, VAE and CLIP text encoder in the original
layout (random values, about 1.07e9 parameters; plus the noise-schedule buffers real files carry), one file per
dtype, and a diffusers config folder (the configs shipped in ``unnoise/weights/families/sd1``) that both loaders are
given as ``config=``. Both load the same file into the same dtype (ours ``dtype=``, diffusers ``torch_dtype=``).
Both end with the same dtypes everywhere: SD 1.5's VAE config says ``force_upcast`` (diffusers' default), which
SD 1.x/2.x pipelines ignore, ours (``loading.vae_dtype``) as diffusers'; only SDXL's VAE is upcast.

Method: each load runs in a fresh process. The file is read once before the runs (page cache warm for both) and
each loader loads it once untimed (warm imports); then the loaders alternate, ``--runs`` times, and the report gives
medians. Time: wall seconds of the load call alone (imports done before). Memory: the process's peak resident set
(``ru_maxrss``) after the load and after reading one value from every page of every weight, as a first generation
does, minus its resident set just before the call (the interpreter with its imports done); both map the file, so a
weight in the file's dtype becomes resident only when read. Model bytes: the loaded networks' parameters and buffers.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine  # noqa: E402
from unnoise.models import single_file as sf  # noqa: E402
from unnoise.models import single_file_keys as keys  # noqa: E402
from unnoise.models.tensor_files import Lazy, meta_network, text_keys, write_safetensors  # noqa: E402
from unnoise.models.unet import UNet, UNetConfig  # noqa: E402
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FAMILY = sf.FAMILY_CONFIGS / "sd1"
LOADERS = ("ours", "diffusers")
GOAL_TIME, GOAL_MEMORY = 0.5, 1.15  # issue 17: load time <= 0.5x diffusers', peak resident memory <= 1.15x the model


def _configs(tiny: bool) -> tuple[dict, dict, dict]:
    unet, vae, text = (json.loads((FAMILY / p / "config.json").read_text()) for p in ("unet", "vae", "text_encoder"))
    if tiny:
        unet |= dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, norm_num_groups=8,
                     cross_attention_dim=32, attention_head_dim=4)  # fmt: skip
        vae |= dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=32)
        vae |= dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
        text |= dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return unet, vae, text


def write_config_folder(folder: Path, tiny: bool) -> None:
    """A diffusers folder without weights, which both loaders read their configs from."""
    unet, vae, text = _configs(tiny)
    for name, data in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(data))
    (folder / "scheduler").mkdir()
    scheduler = json.loads((FAMILY / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "prediction_type": "epsilon"}))
    sf.write_clip_tokenizer(folder / "tokenizer", sf.FAMILIES["sd1"])
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False}
    index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None]}
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    index |= {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    index |= {"scheduler": ["diffusers", "PNDMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))


def write_random_file(path: Path, dtype: torch.dtype, tiny: bool) -> int:
    """An SD-1.5-shaped single file of random tensors in ``dtype``, written one tensor at a time; returns its bytes."""
    import transformers

    unet_json, vae_json, text_json = _configs(tiny)
    unet_config, vae_config = UNetConfig.from_diffusers(unet_json), AutoencoderKLConfig.from_diffusers(vae_json)
    unet = meta_network(lambda: UNet(unet_config)).state_dict()
    vae = meta_network(lambda: AutoencoderKL(vae_config)).state_dict()
    text = meta_network(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(text_json)))
    names = text_keys(text)
    text_state = {ours: text.state_dict()[name] for ours, name in names.items()}
    g = torch.Generator().manual_seed(0)

    def random(shape: tuple[int, ...], _: torch.dtype | None = None) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    def lazy(state: dict) -> dict[str, Lazy]:
        return {k: Lazy(tuple(v.shape), dtype, functools.partial(random, tuple(v.shape))) for k, v in state.items()}

    tensors = keys.to_ldm(keys.unet_plan(unet_config, unet), lazy(unet))
    tensors |= keys.to_ldm(keys.vae_plan(vae_config, vae), lazy(vae))
    tensors |= keys.to_ldm(keys.clip_plan(names), lazy(text_state))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    for name, value in (("betas", betas), ("alphas_cumprod", torch.cumprod(1 - betas, 0))):
        tensors[name] = Lazy((1000,), torch.float32, lambda _=None, v=value: v.float())
    write_safetensors(path, tensors, metadata={"format": "pt"})
    return path.stat().st_size


# -- one load, in a fresh process --------------------------------------------------------------------------------------


def child(which: str, file: str, config: str, dtype_name: str) -> dict:
    """One load in this (fresh) process: seconds, peak resident bytes added, bytes and dtypes of the networks."""
    dtype = DTYPES[dtype_name]
    import transformers  # both load CLIPTextModel: its import is not part of either load

    transformers.CLIPTextModel  # noqa: B018 (transformers imports it lazily, on first access)
    if which == "diffusers":
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.StableDiffusionPipeline  # noqa: B018
    else:
        from unnoise import Pipeline
    before = _rss()
    start, cpu = time.perf_counter(), time.process_time()
    if which == "diffusers":
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            file, config=config, local_files_only=True, torch_dtype=dtype
        )
        nets = (pipe.unet, pipe.vae, pipe.text_encoder)
    else:
        pipe = Pipeline.from_single_file(file, config=config, dtype=dtype)
        nets = (pipe.unet, pipe.vae, pipe.text_encoder.model)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak() - before
    tensors = [t for net in nets for t in (*net.parameters(), *net.buffers())]
    with torch.no_grad():  # what a first generation does to memory-mapped weights: every page read (one value each)
        for t in tensors:
            t.reshape(-1)[:: max(1, resource.getpagesize() // t.element_size())].sum()
    ready = time.perf_counter() - start
    dtypes = "/".join(str(next(net.parameters()).dtype).removeprefix("torch.") for net in nets)
    model = sum(t.numel() * t.element_size() for t in tensors)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak, "ready_seconds": ready,
            "ready_peak_bytes": _peak() - before, "model_bytes": model, "dtypes": dtypes}  # fmt: skip


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run(which: str, file: Path, config: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", which, "--file", str(file), "--config", str(config), "--dtype", dtype],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the cases ---------------------------------------------------------------------------------------------------------


def measure(dtype: str, runs: int, tiny: bool, tmp: Path) -> dict:
    """Both loaders on one file and config folder: the median of ``runs`` alternating fresh-process loads each."""
    config = tmp / "config"
    if not config.exists():
        write_config_folder(config, tiny)
    file = tmp / f"sd15-{dtype}.safetensors"
    size = file.stat().st_size if file.exists() else write_random_file(file, DTYPES[dtype], tiny)
    with open(file, "rb") as f:  # the page cache warm for both
        while f.read(1 << 24):
            pass
    for which in LOADERS:  # warm imports (bytecode, shared libraries), not timed
        run(which, file, config, dtype)
    results: dict[str, list[dict]] = {which: [] for which in LOADERS}
    for _ in range(runs):
        for which in LOADERS:
            results[which].append(run(which, file, config, dtype))
    case = {"dtype": dtype, "file_bytes": size, "runs": runs}
    for which, rows in results.items():
        case[which] = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "dtypes"}
        case[which]["dtypes"] = rows[0]["dtypes"]
        case[which]["seconds_range"] = (min(r["seconds"] for r in rows), max(r["seconds"] for r in rows))
    case["ratio"] = case["ours"]["seconds"] / case["diffusers"]["seconds"]
    case["ratios"] = sorted(o["seconds"] / d["seconds"] for o, d in zip(results["ours"], results["diffusers"]))
    return case


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES), help="file dtypes")
    p.add_argument("--runs", type=int, default=5, help="alternating fresh-process loads per loader and case")
    p.add_argument("--tiny", action="store_true", help="a tiny model (to check that the script runs)")
    p.add_argument("--report", type=Path, help="write the markdown report here (else print it)")
    p.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.file, args.config, args.dtype)))
        return []
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            cases.append(measure(dtype, args.runs, args.tiny, Path(tmp)))
            (Path(tmp) / f"sd15-{dtype}.safetensors").unlink()
    command = "python benchmarks/loading.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(cases, command.strip(), args.tiny)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    else:
        print(text)
    return cases


def report(cases: list[dict], command: str, tiny: bool) -> str:
    import diffusers
    import safetensors
    import transformers

    gib = 2**30
    versions = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, safetensors "
    versions += f"{safetensors.__version__}, Python {sys.version.split()[0]}"
    shape = "a tiny SD-1.5-like model" if tiny else "SD 1.5's shapes, random weights"
    lines = [
        "# Loading a single file: ours against diffusers' `from_single_file` (CPU)",
        "",
        f"Produced by `{command}` (method in the script's docstring), {time.strftime('%Y-%m-%d', time.gmtime())}.",
        f"Machine: {machine()}; {versions}.",
        "",
        f"The file: {shape}, in the original single-file layout. Each figure is the median of {cases[0]['runs']} "
        "fresh-process loads per loader, the two loaders alternating, page cache warm. Load s: the load call; read "
        "s: the load and a read of every weight page; peak: the resident-set high-water mark after that read minus "
        "the resident set before the call; model: the loaded networks' bytes. dtypes: U-Net / VAE / text encoder.",
        "",
        "| file | loader | dtypes | load s (range) | load CPU s | read s | peak GiB | model GiB | peak / model "
        "| load time ours / diffusers (range) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        for which in LOADERS:
            r = c[which]
            low, high = r["seconds_range"]
            ratio = f"{c['ratio']:.2f} ({c['ratios'][0]:.2f}-{c['ratios'][-1]:.2f})" if which == "ours" else ""
            lines.append(
                f"| {c['dtype']}, {c['file_bytes'] / gib:.2f} GiB | {which} | {r['dtypes']} | "
                f"{r['seconds']:.3f} ({low:.3f}-{high:.3f}) | {r['cpu_seconds']:.3f} | {r['ready_seconds']:.3f} | "
                f"{r['ready_peak_bytes'] / gib:.2f} | {r['model_bytes'] / gib:.2f} | "
                f"{r['ready_peak_bytes'] / r['model_bytes']:.2f} | {ratio} |"
            )
    goal = f"Goal (issue 17): load time <= {GOAL_TIME}x diffusers', peak <= {GOAL_MEMORY}x the model's bytes."
    lines += ["", goal, ""]
    for c in cases:
        memory = c["ours"]["ready_peak_bytes"] / c["ours"]["model_bytes"]
        verdict = [
            f"time {c['ratio']:.2f}x ({'met' if c['ratio'] <= GOAL_TIME else 'not met'})",
            f"memory {memory:.2f}x ({'met' if memory <= GOAL_MEMORY else 'not met'})",
        ]
        lines.append(f"- {c['dtype']} file: {', '.join(verdict)}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
