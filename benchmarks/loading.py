"""Loading a full-size single file: our ``load_single_file`` against diffusers' ``from_single_file``, time and memory.

    python benchmarks/loading.py                  # SD-1.5-shaped random fp16 file (2.1 GB), 2 runs each, to stdout
    python benchmarks/loading.py --dtype fp32     # the same in float32 (4.3 GB)
    python benchmarks/loading.py --tiny           # a tiny model: checks that the script runs (the test does this)

The benchmark writes its own file: every tensor of SD 1.5's U-Net, VAE and CLIP text encoder in the original layout
(random values; plus the noise-schedule buffers real files carry), and a diffusers config folder for diffusers (the
configs shipped in ``unnoise/weights/families/sd1``). Each load runs in a fresh process, the file warm in the page
cache for both, runs alternating; reported: the best wall time of the load call, the peak resident memory it added
(the process's high-water mark minus its resident memory before the call) and that peak over the bytes of the
networks it built. Both load in the file's dtype (ours: ``dtype=``, the VAE in float32 as ``force_upcast`` asks;
diffusers: ``torch_dtype=``), so model bytes may differ slightly; the ratio is each one's own.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import shutil
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
from unnoise.models.unet import UNet, UNetConfig  # noqa: E402
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
FAMILY = sf.FAMILY_CONFIGS / "sd1"


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
    """A diffusers folder without weights, which ``from_single_file(config=...)`` reads its configs from."""
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
    unet = sf.meta_network(lambda: UNet(unet_config)).state_dict()
    vae = sf.meta_network(lambda: AutoencoderKL(vae_config)).state_dict()
    text = sf.meta_network(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(text_json)))
    names = sf.text_keys(text)
    text_state = {ours: text.state_dict()[name] for ours, name in names.items()}
    g = torch.Generator().manual_seed(0)

    def random(shape: tuple[int, ...], _: torch.dtype | None = None) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    def lazy(state: dict) -> dict[str, sf.Lazy]:
        return {k: sf.Lazy(tuple(v.shape), dtype, functools.partial(random, tuple(v.shape))) for k, v in state.items()}

    tensors = sf.to_ldm(sf.unet_plan(unet_config, unet), lazy(unet))
    tensors |= sf.to_ldm(sf.vae_plan(vae_config, vae), lazy(vae))
    tensors |= sf.to_ldm(sf.clip_plan(names), lazy(text_state))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    for name, value in (("betas", betas), ("alphas_cumprod", torch.cumprod(1 - betas, 0))):
        tensors[name] = sf.Lazy((1000,), torch.float32, lambda _=None, v=value: v.float())
    sf.write_safetensors(path, tensors, metadata={"format": "pt"})
    return path.stat().st_size


def child(which: str, file: str, config: str, dtype_name: str) -> dict:
    """One load in this (fresh) process: seconds, peak resident bytes added, bytes of the networks built."""
    dtype = DTYPES[dtype_name]
    import transformers  # both load CLIPTextModel: its import is not part of either load

    transformers.CLIPTextModel  # noqa: B018 (transformers imports it lazily, on first access)
    if which == "diffusers":
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.StableDiffusionPipeline  # noqa: B018
    else:
        from unnoise.pipeline.loading import load_single_file
    before = _rss()
    start = time.perf_counter()
    if which == "diffusers":
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            file, config=config, local_files_only=True, torch_dtype=dtype
        )
        nets = (pipe.unet, pipe.vae, pipe.text_encoder)
    else:
        parts = load_single_file(file, config=config if "tiny" in config else None, dtype=dtype)
        nets = (parts.unet, parts.vae, parts.text_encoder)
    seconds = time.perf_counter() - start
    peak = _peak() - before
    tensors = [t for net in nets for t in (*net.parameters(), *net.buffers())]
    with torch.no_grad():  # what a first generation does to memory-mapped weights: every page read (one value each)
        for t in tensors:
            t.reshape(-1)[:: max(1, resource.getpagesize() // t.element_size())].sum()
    ready = time.perf_counter() - start
    model = sum(t.numel() * t.element_size() for t in tensors)
    return {"seconds": seconds, "peak_bytes": peak, "ready_seconds": ready, "ready_peak_bytes": _peak() - before,
            "model_bytes": model}  # fmt: skip


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--child", choices=["ours", "diffusers"])
    p.add_argument("--file")
    p.add_argument("--config")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.file, args.config, args.dtype)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / ("tiny-config" if args.tiny else "config")
        write_config_folder(config, args.tiny)
        file = Path(tmp) / "sd15.safetensors"
        size = write_random_file(file, DTYPES[args.dtype], args.tiny)
        results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        for _ in range(args.runs):
            for which in results:
                results[which].append(run(which, file, config, args.dtype))
        shutil.rmtree(config)
    summary = {"file_bytes": size, "dtype": args.dtype, "machine": machine()}
    for which, runs in results.items():
        best = min(runs, key=lambda r: r["seconds"])
        summary[which] = {key: min(r[key] for r in runs) for key in ("seconds", "ready_seconds")}
        summary[which] |= {key: max(r[key] for r in runs) for key in ("peak_bytes", "ready_peak_bytes")}
        summary[which]["model_bytes"] = best["model_bytes"]
    for key in ("seconds", "ready_seconds"):
        summary[f"{key}_ratio"] = summary["ours"][key] / summary["diffusers"][key]
    print(report(summary))
    return summary


def report(s: dict) -> str:
    gib = 2**30

    def row(who: str) -> str:
        r = s[who]
        return (
            f"| {who} | {r['seconds']:.2f} | {r['peak_bytes'] / gib:.2f} | {r['ready_seconds']:.2f} | "
            f"{r['ready_peak_bytes'] / gib:.2f} | {r['model_bytes'] / gib:.2f} | "
            f"{r['ready_peak_bytes'] / r['model_bytes']:.2f} |"
        )

    return "\n".join([
        f"Single-file load, SD-1.5 shapes, {s['dtype']} file of {s['file_bytes'] / gib:.2f} GiB; {s['machine']}",
        "",
        "| loader | load s | peak added GiB | load + every weight read s | peak added GiB | model GiB | peak / model |",
        "|---|---|---|---|---|---|---|",
        row("ours"),
        row("diffusers"),
        "",
        f"time ours / diffusers: load {s['seconds_ratio']:.2f}, and every weight read {s['ready_seconds_ratio']:.2f}",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
