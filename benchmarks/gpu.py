"""GPU benchmark: SD-1.5- or SDXL-shaped text-to-image, ours against diffusers on identical random weights.

    python benchmarks/gpu.py                      # CUDA: SD-1.5, 512x512, fp16, 25 DPM-Solver++(2M) steps, CFG 7.5
    python benchmarks/gpu.py --model sdxl         # CUDA: SDXL base, 1024x1024, the same loop, VAE decode in fp32
    python benchmarks/gpu.py --tiny --device cpu  # a small config on the CPU, to check the script itself

Both sides run the same loop on the same weights, noise and prompt embeddings (random stand-ins: 77x768 hidden
states for SD-1.5; for SDXL 77x2048 hidden states, a 1280-wide pooled embedding and the six size/crop time ids; the
text encoders are the same for both and outside what is compared): U-Net with classifier-free guidance in one batch
of 2, the scheduler step, and the VAE decode (for SDXL in float32, as diffusers' SDXL pipeline does for a VAE whose
config sets ``force_upcast``). Reported per side: median latency, images/s, peak memory and model-FLOP
utilization against the card's dense bf16/fp16 peak. It also checks the server's VRAM planner
(`unnoise.serve.vram`) on this config: estimated activation memory of a generation against
`torch.cuda.max_memory_allocated` above the weights, at the batches of ``--planner-batches`` (1, 2 and 4).

diffusers is needed only here. On a machine without network access, put its wheel (and the wheels of what it
needs, such as huggingface_hub) beside this script: pure-Python wheels are imported straight from the zip files.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unnoise.core.denoisers import VPDenoiser  # noqa: E402
from unnoise.core.guidance import CFGDenoiser  # noqa: E402
from unnoise.core.samplers import sample  # noqa: E402
from unnoise.core.schedules import VPSchedule  # noqa: E402
from unnoise.models.graphs import GraphedUNet  # noqa: E402
from unnoise.models.io import diffusers_key, load_state  # noqa: E402
from unnoise.models.layers import set_upsample_fusion  # noqa: E402
from unnoise.models.packing import set_weight_packing  # noqa: E402
from unnoise.models.unet import UNet, UNetConfig  # noqa: E402
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

# Stable Diffusion 1.5's published unet/ and vae/ config.json (architecture only).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
TINY_UNET = {**SD15_UNET, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64, "norm_num_groups": 8}
TINY_VAE = {**SD15_VAE, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8}

# SDXL 1.0 base's published unet/ config.json (architecture; the keys left out hold diffusers' defaults): 2.57e9
# parameters, attention from the second level on with [1, 2, 10] transformer layers, 2048-wide context, and a
# 1280-wide pooled text embedding plus six time ids of 256 sinusoidal features each added to the time embedding.
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],  # diffusers reads these as head counts: 64 channels per head
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 * 256
    "norm_num_groups": 32,
}
# Its vae/ config.json: SD-1.5's architecture, another latent scale, and float32 advised for the decode.
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
TINY_SDXL_UNET = {
    **SDXL_UNET,
    **dict(block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4]),
    **dict(cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
    "norm_num_groups": 8,
}
TINY_SDXL_VAE = {**SDXL_VAE, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8}


@dataclasses.dataclass(frozen=True)
class Model:
    """One benchmarked model: published architecture configs, a tiny variant for the CPU, its native size."""

    name: str
    unet: dict
    vae: dict
    tiny_unet: dict
    tiny_vae: dict
    size: int
    # diffusers' SDXL pipeline runs an fp16 VAE's decode in float32 when its config sets force_upcast (here any
    # half dtype is upcast, as unnoise's Pipeline.to does); its SD-1.5 pipeline ignores the flag (which diffusers'
    # AutoencoderKL defaults to True) and decodes in the U-Net's dtype
    honours_force_upcast: bool


MODELS = {
    "sd15": Model("SD-1.5", SD15_UNET, SD15_VAE, TINY_UNET, TINY_VAE, 512, honours_force_upcast=False),
    "sdxl": Model("SDXL base", SDXL_UNET, SDXL_VAE, TINY_SDXL_UNET, TINY_SDXL_VAE, 1024, honours_force_upcast=True),
}

# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets.
PEAKS = {"H100 SXM": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312.0e12}


def import_diffusers(wheel_dir: str | None = None):
    """Import diffusers, falling back to wheels in ``wheel_dir`` (default: beside this script)."""
    try:
        import diffusers
    except ImportError:
        here = wheel_dir or os.path.dirname(os.path.abspath(__file__))
        wheels = sorted(glob.glob(os.path.join(here, "*.whl")))
        if not wheels:
            raise SystemExit(f"diffusers is not installed and no *.whl lies in {here}") from None
        sys.path[:0] = wheels
        import diffusers
    return diffusers


def build(diffusers, unet_cfg: dict, vae_cfg: dict, seed: int, device: torch.device, dtypes: dict):
    """diffusers' models with random weights, and ours holding exactly the same tensors, built on ``device`` (the
    host never holds SDXL's 2.6e9 parameters) and cast to ``dtypes["unet"]`` / ``dtypes["vae"]``."""
    torch.manual_seed(seed)
    kwargs = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    with torch.device(device):  # each network built in float32 and cast before the next is built
        d_unet = diffusers.UNet2DConditionModel(**kwargs(unet_cfg)).to(dtypes["unet"])
        d_vae = diffusers.AutoencoderKL(**kwargs(vae_cfg)).to(dtypes["vae"])
        with torch.no_grad():  # diffusers zero-initializes some output layers; random everywhere is a fairer load
            for p in list(d_unet.parameters()) + list(d_vae.parameters()):
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
        unet = UNet(UNetConfig.from_diffusers(unet_cfg)).to(dtypes["unet"])
        vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(vae_cfg)).to(dtypes["vae"])
    for ours, theirs in ((unet, d_unet), (vae, d_vae)):
        load_state(ours, {diffusers_key(k): v.clone() for k, v in theirs.state_dict().items()}, source="diffusers")
    return unet.eval(), vae.eval(), d_unet.eval(), d_vae.eval()


def prompt_stand_ins(unet_cfg: dict, size: int, gen: torch.Generator) -> tuple[dict, dict]:
    """Random conditional and unconditional U-Net keyword arguments of the text encoders' shapes (batch 1 each):
    hidden states, and for SDXL the pooled embedding and the time ids (original size, crop 0, 0, target size)."""
    width = unet_cfg["cross_attention_dim"]
    cond = {"encoder_hidden_states": torch.randn(1, 77, width, generator=gen)}
    uncond = {"encoder_hidden_states": torch.randn(1, 77, width, generator=gen)}
    if unet_cfg.get("addition_embed_type") == "text_time":
        pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        for side in (cond, uncond):
            side.update(text_embeds=torch.randn(1, pooled, generator=gen), time_ids=time_ids)
    return cond, uncond


def guidance_batch(cond: dict, uncond: dict) -> dict:
    """The U-Net keyword arguments of the classifier-free-guidance batch ``[cond; uncond]``."""
    return {k: torch.cat([cond[k], uncond[k]]) for k in cond}


def diffusers_unet(unet, x, t, batch: dict):
    """diffusers' U-Net on our keyword arguments: SDXL's text_embeds and time_ids go in ``added_cond_kwargs``."""
    added = {k: v for k, v in batch.items() if k != "encoder_hidden_states"}
    return unet(x, t, encoder_hidden_states=batch["encoder_hidden_states"], added_cond_kwargs=added or None).sample


def run_ours(unet, vae, latents, cond, uncond, steps, scale):
    schedule = VPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    denoiser = CFGDenoiser(VPDenoiser(unet, schedule), scale, uncond)
    sigmas = schedule.sigmas_for(steps, "linspace", extra_point=True)  # diffusers' DPM-Solver default grid
    # sampler state in float32 whatever the network's dtype (the U-Net casts its input to its weights' dtype)
    x = latents.float() * denoiser.denoiser.prior_std(sigmas[0].item())
    z = sample(denoiser, x, sigmas, "dpmpp_2m", **cond)
    return vae.decode(vae.from_latent(z))  # decode casts to the VAE's dtype (float32 when upcast)


def run_diffusers(diffusers, unet, vae, latents, cond, uncond, steps, scale):
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, final_sigmas_type="zero"
    )
    sched.set_timesteps(steps, device=latents.device)
    batch = guidance_batch(cond, uncond)
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        out = diffusers_unet(unet, torch.cat([x, x]), t, batch)
        out_c, out_u = out.chunk(2)
        x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    # as StableDiffusionXLPipeline with an upcast VAE: latents cast to the VAE's dtype, then unscaled
    return vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample


class _Context(torch.nn.Module):
    """Stands in for the text encoder in the VRAM planner: its weights are outside what is measured here."""

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length

    def lora_networks(self) -> dict:
        return {}


def planner_check(unet, vae, latents, cond, uncond, scale, device: torch.device, batches=(1, 2, 4)) -> list[dict]:
    """The serve VRAM planner's estimates against measured peaks: a whole 2-step generation, and each phase alone
    (the U-Net on the guidance batch of 2B, the VAE decode of B latents)."""
    from types import SimpleNamespace

    from unnoise.serve.vram import VramPlanner, measured_activations

    tokens = cond["encoder_hidden_states"].shape[1]
    pipe = SimpleNamespace(unet=unet, vae=vae, text_encoder=_Context(tokens), vae_factor=8)
    planner = VramPlanner(pipe, budget=2**50, max_batch=max(batches, default=1))
    size = latents.shape[-1] * 8
    repeat = lambda tensors, b: {k: v.repeat(b, *[1] * (v.ndim - 1)) for k, v in tensors.items()}  # noqa: E731
    rows = []
    for b in batches:
        x, c, u = latents.repeat(b, 1, 1, 1), repeat(cond, b), repeat(uncond, b)
        estimate = planner.estimate(b, size, size)
        t = torch.full((2 * b,), 500.0, device=device)
        measured = {
            "generation": measured_activations(lambda x=x, c=c, u=u: run_ours(unet, vae, x, c, u, 2, scale), device),
            "unet": measured_activations(
                lambda x=x, c=c, u=u, t=t: unet(torch.cat([x, x]), t, **guidance_batch(c, u)), device
            ),
            "vae": measured_activations(lambda x=x: vae.decode(x), device),
        }
        estimated = {"generation": estimate.activations, "unet": estimate.unet, "vae": estimate.vae}
        for phase, m in measured.items():
            e = estimated[phase]
            rows.append({"batch": b, "phase": phase, "estimated_gib": e / 2**30, "measured_gib": m / 2**30,
                         "estimate_over_measured": e / m if m else None})  # fmt: skip
    return rows


def timed(fns: dict, device: torch.device, runs: int) -> dict:
    """Each side's output, median wall time of ``runs`` calls and peak memory of a call above what was allocated
    before it (activations and workspaces; both sides' weights stay on the device throughout). One warm-up call
    each, then the sides alternate call by call, so a drift of the card's clocks or of the machine hits both."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in fns.values():
        fn()
    sync()
    times = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0)
    outs = {}
    for _ in range(runs):
        for name, fn in fns.items():
            if cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            outs[name] = fn()
            sync()
            times[name].append(time.perf_counter() - start)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - base)
    return {
        name: (outs[name], statistics.median(times[name]), peaks[name] if cuda else float("nan"), times[name])
        for name in fns
    }


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=sorted(MODELS), help="SD-1.5 (default) or SDXL base")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's, 512 or 1024)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small channels, to check the script on a CPU")
    parser.add_argument(
        "--graphs", action="store_true", help="also ours with the U-Net replayed as CUDA graphs (unnoise.models.graphs)"
    )
    parser.add_argument(
        "--planner-batches",
        type=lambda text: tuple(int(b) for b in text.split(",") if b),
        default=(1, 2, 4),
        help="batches at which the VRAM planner is checked, comma-separated (default 1,2,4; empty: none)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense peak")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--report", default=None, help="also write a Markdown report here (docs/benchmarks/gpu.md)")
    return parser.parse_args(argv)


def networks(diffusers, model: Model, args: argparse.Namespace) -> tuple[dict, dict]:
    """Each side's (U-Net, VAE): ours, ours with unfused upsampling, diffusers'; and the U-Net's and VAE's dtypes."""
    unet_cfg, vae_cfg = (model.tiny_unet, model.tiny_vae) if args.tiny else (model.unet, model.vae)
    dtype = DTYPES[args.dtype]
    upcast = model.honours_force_upcast and AutoencoderKLConfig.from_diffusers(vae_cfg).force_upcast
    dtypes = {"unet": dtype, "vae": torch.float32 if upcast else dtype}
    unet, vae, d_unet, d_vae = build(diffusers, unet_cfg, vae_cfg, 0, torch.device(args.device), dtypes)
    # ours once more with nearest 2x + 3x3 conv upsampling, as diffusers: what the fused upsamplers change (and, on
    # the CPU, with PyTorch's own conv/linear kernels instead of oneDNN's on reordered weights)
    unet_u, vae_u = copy.deepcopy(unet), copy.deepcopy(vae)
    for m in (unet_u, vae_u):
        set_upsample_fusion(m, False)
        set_weight_packing(m, False)
    return {"ours": (unet, vae), "ours_unfused": (unet_u, vae_u), "diffusers": (d_unet, d_vae)}, dtypes


def side_summary(models: tuple, timing: tuple, flops: float, peak: float | None) -> dict:
    """One side's row: latency, throughput, weights and peak memory, MFU."""
    _, t, mem, all_times = timing
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return {
        "latency_s": t,
        "images_per_s": 1 / t,
        "weights_gib": weights / 2**30,
        "activation_peak_gib": mem / 2**30,
        "peak_memory_gib": (weights + mem) / 2**30,
        "mfu": flops / t / peak if peak else None,
        "all_latencies_s": all_times,
    }


def graph_summary(graphed: GraphedUNet, timings: dict) -> dict:
    """The CUDA-graph side against plain ours: latency ratio, largest image difference, what the wrapper did."""
    return {
        "latency_ratio_graphs_over_ours": timings["ours_graphs"][1] / timings["ours"][1],
        "max_abs_image_difference_graphs": (timings["ours_graphs"][0].float() - timings["ours"][0].float())
        .abs()
        .max()
        .item(),
        "graph_stats": dataclasses.asdict(graphed.stats),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    diffusers = import_diffusers()
    device, model, dtype = torch.device(args.device), MODELS[args.model], DTYPES[args.dtype]
    sides, dtypes = networks(diffusers, model, args)
    (unet, vae), (unet_u, vae_u), (d_unet, d_vae) = sides["ours"], sides["ours_unfused"], sides["diffusers"]

    size = args.size or model.size
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device, dtype)
    prompts = prompt_stand_ins(model.tiny_unet if args.tiny else model.unet, size, gen)
    cond, uncond = ({k: v.to(device, dtype) for k, v in side.items()} for side in prompts)
    steps, scale = args.steps, args.guidance

    with torch.inference_mode():
        ours_fn = lambda: run_ours(unet, vae, latents, cond, uncond, steps, scale)  # noqa: E731
        unfused_fn = lambda: run_ours(unet_u, vae_u, latents, cond, uncond, steps, scale)  # noqa: E731
        theirs_fn = lambda: run_diffusers(diffusers, d_unet, d_vae, latents, cond, uncond, steps, scale)  # noqa: E731
        fns = {"ours": ours_fn, "ours_unfused": unfused_fn, "diffusers": theirs_fn}
        if args.graphs:  # the same U-Net and VAE as "ours", the U-Net's calls replayed from one captured graph
            sides["ours_graphs"] = (graphed := GraphedUNet(unet), vae)
            fns["ours_graphs"] = lambda: run_ours(graphed, vae, latents, cond, uncond, steps, scale)
        timings = timed(fns, device, args.runs)
        # the architecture's FLOPs as published (two-step upsampling); the fused upsamplers do fewer
        batch = guidance_batch(cond, uncond)
        unet_flops = count_flops(lambda: unet_u(torch.cat([latents, latents]), 500, **batch))
        vae_flops = count_flops(lambda: vae_u.decode(latents))
        planner = planner_check(unet, vae, latents, cond, uncond, scale, device, args.planner_batches)
    flops = unet_flops * steps + vae_flops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in name), None)
    img_ours, img_theirs = timings["ours"][0], timings["diffusers"][0]
    result = {
        "device": name,
        "torch": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "model": model.name,
        "dtype": args.dtype,
        "vae_dtype": next(k for k, v in DTYPES.items() if v == dtypes["vae"]),
        "size": size,
        "steps": steps,
        "config": f"tiny {model.name}" if args.tiny else model.name,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "model_tflop_per_image": flops / 1e12,
        "max_abs_image_difference": (img_ours.float() - img_theirs.float()).abs().max().item(),
        **{side: side_summary(models, timings[side], flops, peak) for side, models in sides.items()},
        "latency_ratio_ours_over_diffusers": timings["ours"][1] / timings["diffusers"][1],
        "latency_ratio_fused_over_unfused_upsampling": timings["ours"][1] / timings["ours_unfused"][1],
        **(graph_summary(graphed, timings) if args.graphs else {}),
        "vram_planner": planner,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.report:
        with open(args.report, "w") as f:
            f.write(
                report(result, " ".join(["python benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]))
            )
    return result


def graphs_paragraph(result: dict) -> list[str]:
    """What the CUDA-graph row adds to the report (nothing for a run without ``--graphs``)."""
    if "ours_graphs" not in result:
        return []
    stats = result["graph_stats"]
    return [
        "",
        "Ours + CUDA graphs: the same U-Net and VAE as the first row, the U-Net's calls replayed from a graph captured "
        "once (`unnoise.models.graphs.GraphedUNet`: three warm-up calls on a side stream, then the capture, in the "
        "side's warm-up call; its memory pool stays allocated between calls and is not in the activation column); "
        "the sampler step and the VAE decode run as before. Latency with graphs / without: "
        f"**{result['latency_ratio_graphs_over_ours']:.3f}x**; largest absolute difference between the two decoded "
        f"images {result['max_abs_image_difference_graphs']:.3g}; graphs captured {stats['captured']}, U-Net calls "
        f"replayed {stats['replayed']}, run eagerly {stats['eager']}.",
    ]


def report(result: dict, command: str) -> str:
    """docs/benchmarks/gpu.md from one run's results."""
    rows = [
        f"| {side} | {r['latency_s']:.3f} | {r['images_per_s']:.3f} | {r['peak_memory_gib']:.3f} | "
        f"{r['activation_peak_gib']:.3f} | " + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a") + " | "
        f"{min(r['all_latencies_s']):.3f} - {max(r['all_latencies_s']):.3f} |"
        for side, r in (
            ("ours", result["ours"]),
            ("ours, unfused upsampling", result.get("ours_unfused")),
            ("ours + CUDA graphs", result.get("ours_graphs")),
            ("diffusers", result["diffusers"]),
        )  # fmt: skip
        if r is not None
    ]
    planner = [
        f"| {r['batch']} | {r['phase']} | {r['estimated_gib']:.3f} | {r['measured_gib']:.3f} | "
        f"{r['estimate_over_measured']:.2f} |"
        for r in result["vram_planner"] or []
    ]
    upcast = result.get("vae_dtype", result["dtype"]) != result["dtype"]
    decode = (
        f" in {result['vae_dtype']} on both sides (the VAE config's force_upcast, as diffusers' SDXL pipeline: the "
        "VAE's weights are kept in that dtype and its FLOPs count against the same fp16/bf16 peak)"
        if upcast
        else ""
    )
    return "\n".join(
        [
            f"# GPU benchmark: {result.get('model', 'SD-1.5')}-shaped text-to-image, ours against diffusers",
            "",
            f"Produced by `{command}` on **{result['device']}** (torch {result['torch']}, diffusers "
            f"{result['diffusers_version']}), {result['date']}.",
            "",
            f"{result['config']} U-Net and VAE configurations with identical random weights on both sides, "
            f"{result['size']}x{result['size']}, {result['dtype']}, {result['steps']} DPM-Solver++(2M) steps with "
            f"classifier-free guidance (U-Net batch of 2), then the VAE decode{decode}. Median of the timed runs "
            "after one "
            "warm-up each, the sides alternating call by call; peak memory is the side's own weights plus "
            "`torch.cuda.max_memory_allocated` over its timed runs above what was allocated before them (both "
            "sides' weights stay on the card throughout); MFU counts the U-Net's FLOPs (`torch.utils.flop_counter`) "
            "times the steps plus the decode, over the card's dense fp16/bf16 peak, the same count for every row.",
            "",
            "| side | latency s | images/s | peak memory GiB | of which above weights GiB | MFU | runs' range s |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Latency ours / diffusers: **{result['latency_ratio_ours_over_diffusers']:.3f}x**; model FLOPs per image "
            f"{result['model_tflop_per_image']:.2f} TFLOP; largest absolute difference between the two decoded "
            f"images {result['max_abs_image_difference']:.3g} (pixel range [-1, 1]). Our fused upsamplers (the "
            "default; one convolution on the low-resolution map, a transposed convolution on CUDA, instead of "
            "nearest 2x + 3x3 conv) against the unfused layout: "
            f"**{result.get('latency_ratio_fused_over_unfused_upsampling', float('nan')):.3f}x**.",
            *graphs_paragraph(result),
            "",
            "The serve VRAM planner (`unnoise.serve.vram`) on this configuration: estimated activation memory of a "
            "2-step generation, and of each phase alone (U-Net on the guidance batch of 2B, VAE decode of B), "
            "against the measured peak above what was allocated before it (`torch.cuda.max_memory_allocated`).",
            "",
            "| batch B | phase | estimated GiB | measured GiB | estimate / measured |",
            "|---|---|---|---|---|",
            *planner,
            "",
        ]
    )


if __name__ == "__main__":
    main()
