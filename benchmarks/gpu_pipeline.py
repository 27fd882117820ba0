"""GPU benchmark of the embedded default model end to end: ``Pipeline.generate`` with the U-Net called eagerly
against the U-Net replayed as CUDA graphs (``unnoise.models.graphs``), in one run on the same card.

    python benchmarks/gpu_pipeline.py --json $OUT/pipeline.json --report $OUT/pipeline.md   # CUDA, fp16
    python benchmarks/gpu_pipeline.py --device cpu --dtype fp32 --steps 2 --runs 1 --batches 1  # check it

Each batch size runs the model's default request (20 DPM-Solver++(2M) steps, CFG 3, 32x32; the U-Net sees a
guidance batch of 2B) as the server does, text encoding, sampling, decoding and the 8-bit PIL images included; the
two modes alternate call by call after a warm-up each (the graphs' warm-up captures them), timed as
``benchmarks/gpu.py`` times its sides. A profile of one call per mode counts the kernel launches the host makes and
the GPU time of the kernels (``torch.profiler``). On a CPU the graph wrapper runs eagerly (its fallback), so both
modes compute the same; the numbers then check the script.

The device machines have no network and may lack the MiniLM text encoder's package: ``--embeddings FILE`` takes
the prompts' embeddings from a file written beforehand by ``--save-embeddings FILE`` (with the real encoder), the
same tensors the encoder would give; the report says which was used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.gpu import timed  # noqa: E402
from unnoise.models.graphs import GraphedUNet  # noqa: E402
from unnoise.models.io import load_model, read_json  # noqa: E402
from unnoise.models.text import TextEmbedding  # noqa: E402
from unnoise.pipeline import Pipeline  # noqa: E402
from unnoise.pipeline.config import PipelineConfig  # noqa: E402
from unnoise.pipeline.inputs import Request  # noqa: E402
from unnoise.pipeline.loading import resolve_model  # noqa: E402

PROMPT = "a handwritten seven"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class RecordedTextEncoder(nn.Module):
    """Stands in for the MiniLM encoder with its recorded outputs for a few texts (``--embeddings``)."""

    def __init__(self, texts: list[str], hidden_states: Tensor, pooled: Tensor, max_length: int):
        super().__init__()
        self.texts, self.max_length = list(texts), max_length
        self.register_buffer("hidden_states", hidden_states)
        self.register_buffer("pooled", pooled)

    @property
    def dim(self) -> int:
        return self.hidden_states.shape[-1]

    def encode(self, texts: list[str]) -> TextEmbedding:
        missing = sorted(set(texts) - set(self.texts))
        if missing:
            raise ValueError(f"texts {missing} were not recorded; recorded: {self.texts}")
        index = torch.tensor([self.texts.index(t) for t in texts], device=self.hidden_states.device)
        hidden = self.hidden_states[index]
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return TextEmbedding(hidden, mask, self.pooled[index])

    def empty(self) -> TextEmbedding:
        return self.encode([""])

    def lora_networks(self) -> dict:
        return {}


def save_embeddings(path: str, texts: list[str], encoder: nn.Module | None = None) -> None:
    """Record the default model's text encoder outputs for ``texts`` (run where its package is installed)."""
    encoder = encoder if encoder is not None else Pipeline.from_pretrained("default").text_encoder
    out = encoder.encode(texts)
    record = {"texts": texts, "hidden_states": out.hidden_states, "pooled": out.pooled}
    torch.save({**record, "max_length": encoder.max_length}, path)


def load_default(embeddings: str | None) -> tuple[Pipeline, str]:
    """The embedded default model, with its MiniLM encoder, or with the outputs recorded in ``embeddings``."""
    if embeddings is None:
        return Pipeline.from_pretrained("default"), "MiniLM"
    folder = resolve_model("default")
    config = PipelineConfig.from_dict(read_json(folder / "pipeline.json"))
    record = torch.load(embeddings, weights_only=True)
    encoder = RecordedTextEncoder(record["texts"], record["hidden_states"], record["pooled"], record["max_length"])
    unet, vae = load_model(folder / "unet"), load_model(folder / "vae")
    pipe = Pipeline(unet, vae, encoder, config, name=folder.name, unet_weights=folder / "unet" / "model.safetensors")
    pipe.prompt_syntax = False  # plain prompts: encode() alone, no tokenizer (the benchmark's prompt has no syntax)
    return pipe, f"recorded MiniLM outputs ({os.path.basename(embeddings)})"


def kernel_profile(fn, device: torch.device) -> dict:
    """Kernel (and graph) launches the host makes in one call of ``fn``, the kernels the GPU ran and their GPU time
    (``torch.profiler``); a profiler failure is recorded, not raised."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    try:
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        names = [event.name for event in prof.events()]
        on_gpu = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        return {
            "kernel_launches": sum("LaunchKernel" in name for name in names),
            "graph_launches": sum("GraphLaunch" in name for name in names),
            "gpu_events": len(on_gpu),
            "gpu_time_ms": sum(e.self_device_time_total for e in prof.key_averages()) / 1e3,
        }
    except Exception as error:  # noqa: BLE001 - a profile is extra; the timings above still count
        return {"error": f"{type(error).__name__}: {error}"}


def max_level_difference(a: list, b: list) -> int:
    """Largest difference of two lists of 8-bit PIL images, in levels."""
    import numpy as np

    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b, strict=True))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="U-Net dtype (the server's: fp16)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--embeddings", default=None, help="recorded text-encoder outputs (see --save-embeddings)")
    parser.add_argument("--save-embeddings", default=None, metavar="FILE", help="record them here and exit")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.save_embeddings:
        save_embeddings(args.save_embeddings, [PROMPT, ""])
        return None
    device = torch.device(args.device)
    pipe, encoder = load_default(args.embeddings)
    pipe.to(device, DTYPES[args.dtype])
    graphed = GraphedUNet(pipe.unet)

    def generate(batch: int, graphs: bool):
        pipe.graphed_unet = graphed if graphs else None
        return pipe.generate([Request(PROMPT, num_images=batch, steps=args.steps, seed=0)])[0]

    rows = []
    for batch in args.batches:
        fns = {"eager": lambda b=batch: generate(b, False), "graphs": lambda b=batch: generate(b, True)}
        timing = timed(fns, device, args.runs)  # (images, median s, activation peak bytes, all s) per mode
        (eager_images, eager, eager_peak, eager_all), (graph_images, graphs, graph_peak, graph_all) = timing.values()
        rows.append({
            "batch": batch,
            "eager_latency_s": eager, "graphs_latency_s": graphs,
            "eager_images_per_s": batch / eager, "graphs_images_per_s": batch / graphs,
            "latency_ratio_graphs_over_eager": graphs / eager,
            "eager_all_s": eager_all, "graphs_all_s": graph_all,
            "eager_activation_peak_gib": eager_peak / 2**30, "graphs_activation_peak_gib": graph_peak / 2**30,
            "max_level_difference": max_level_difference(eager_images, graph_images),
            "eager_profile": None, "graphs_profile": None,
        })  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "model": pipe.name,
        "dtype": args.dtype,
        "steps": args.steps,
        "sampler": pipe.config.sampling.sampler,
        "guidance_scale": pipe.config.sampling.guidance_scale,
        "size": list(pipe.default_size),
        "text_encoder": encoder,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "graph_stats": dataclasses.asdict(graphed.stats),
        "rows": rows,
    }
    command = " ".join(["python benchmarks/gpu_pipeline.py", *(argv if argv is not None else sys.argv[1:])])
    write(result, args, command)  # before the profile: a profiler crash leaves the timings
    for mode in ("eager", "graphs"):
        rows[0][f"{mode}_profile"] = kernel_profile(lambda m=mode: generate(args.batches[0], m == "graphs"), device)
    result["graph_stats"] = dataclasses.asdict(graphed.stats)
    write(result, args, command)
    print(json.dumps(result, indent=2))
    return result


def write(result: dict, args: argparse.Namespace, command: str) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report(result, command))


def report(result: dict, command: str) -> str:
    """The default-model section of docs/benchmarks/gpu.md from one run's results."""
    rows = [
        f"| {r['batch']} | {r['eager_latency_s'] * 1e3:.1f} | {r['graphs_latency_s'] * 1e3:.1f} | "
        f"{r['latency_ratio_graphs_over_eager']:.3f}x | {r['eager_images_per_s']:.2f} | "
        f"{r['graphs_images_per_s']:.2f} | {r['max_level_difference']} |"
        for r in result["rows"]
    ]
    profiles = [
        f"| {mode} | profiler failed: {p['error']} | | | |"
        if "error" in p
        else f"| {mode} | {p['kernel_launches']} | {p['graph_launches']} | {p['gpu_events']} | {p['gpu_time_ms']:.1f} |"
        for r in result["rows"]
        for mode, p in (("eager", r["eager_profile"]), ("CUDA graphs", r["graphs_profile"]))
        if p is not None
    ]
    first = result["rows"][0]["batch"]
    stats = result["graph_stats"]
    w, h = result["size"]
    return "\n".join(
        [
            "## The embedded default model end to end: eager against CUDA graphs",
            "",
            f"Produced by `{command}` on **{result['device']}** (torch {result['torch']}), {result['date']}.",
            "",
            f"`Pipeline.generate` on the default model ({result['model']}, {result['unet_parameters'] / 1e6:.1f}M "
            f"U-Net parameters, {result['dtype']}): one request of B images, {w}x{h}, {result['steps']} "
            f"{result['sampler']} steps with guidance {result['guidance_scale']} (a U-Net batch of 2B), text "
            f"encoding ({result['text_encoder']}), sampling, VAE decode and 8-bit images. The U-Net is called eagerly, "
            "or replayed from CUDA graphs (the wrapper that `Pipeline.enable_cuda_graphs` installs, "
            "`unnoise.models.graphs`); the two modes alternate call by call after one warm-up each (which captures the "
            "graphs); median wall time.",
            "",
            "| B | eager ms | CUDA graphs ms | graphs / eager | eager images/s | graphs images/s | max difference "
            "(8-bit levels) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"One call at B={first} under `torch.profiler`: kernel launches made by the host (`cudaLaunchKernel` and "
            "kin), graph launches, what ran on the GPU (kernels and copies) and its GPU time.",
            "",
            "| mode | kernel launches | graph launches | GPU events | GPU time ms |",
            "|---|---|---|---|---|",
            *profiles,
            "",
            f"The wrapper captured {stats['captured']} graphs, replayed {stats['replayed']} U-Net calls and ran "
            f"{stats['eager']} eagerly over the run.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
