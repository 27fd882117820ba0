"""GPU benchmark: Stable-Diffusion-1.5-shaped text-to-image, ours against diffusers on identical random weights.

    python benchmarks/gpu.py                      # CUDA: 512x512, fp16, 25 DPM-Solver++(2M) steps, CFG 7.5
    python benchmarks/gpu.py --tiny --device cpu  # a small config on the CPU, to check the script itself

Both sides run the same loop on the same weights, noise and prompt embeddings (random 77x768 stand-ins: the text
encoder is the same for both and outside what is compared): U-Net with classifier-free guidance in one batch of 2,
the scheduler step, and the VAE decode. Reported per side: median latency, images/s, peak memory and model-FLOP
utilization against the card's dense bf16/fp16 peak. It also checks the server's VRAM planner
(`unnoise.serve.vram`) on this config: estimated activation memory of a generation against
`torch.cuda.max_memory_allocated` above the weights, at batch 1 and 4.

diffusers is needed only here. On a machine without network access, put its wheel (and the wheels of what it
needs, such as huggingface_hub) beside this script: pure-Python wheels are imported straight from the zip files.
"""

from __future__ import annotations

import argparse
import copy
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


def build(diffusers, unet_cfg: dict, vae_cfg: dict, seed: int):
    """diffusers' models with random weights, and ours holding exactly the same tensors."""
    torch.manual_seed(seed)
    kwargs = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    d_unet = diffusers.UNet2DConditionModel(**kwargs(unet_cfg))
    d_vae = diffusers.AutoencoderKL(**kwargs(vae_cfg))
    with torch.no_grad():  # diffusers zero-initializes some output layers; random everywhere is a fairer load
        for p in list(d_unet.parameters()) + list(d_vae.parameters()):
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    unet = UNet(UNetConfig.from_diffusers(unet_cfg))
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(vae_cfg))
    for ours, theirs in ((unet, d_unet), (vae, d_vae)):
        load_state(ours, {diffusers_key(k): v.clone() for k, v in theirs.state_dict().items()}, source="diffusers")
    return unet, vae, d_unet, d_vae


def run_ours(unet, vae, latents, cond, uncond, steps, scale):
    schedule = VPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    denoiser = CFGDenoiser(VPDenoiser(unet, schedule), scale, {"encoder_hidden_states": uncond})
    sigmas = schedule.sigmas_for(steps, "linspace", extra_point=True)  # diffusers' DPM-Solver default grid
    # sampler state in float32 whatever the network's dtype (the U-Net casts its input to its weights' dtype)
    x = latents.float() * denoiser.denoiser.prior_std(sigmas[0].item())
    z = sample(denoiser, x, sigmas, "dpmpp_2m", encoder_hidden_states=cond)
    return vae.decode(vae.from_latent(z))


def run_diffusers(diffusers, unet, vae, latents, cond, uncond, steps, scale):
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, final_sigmas_type="zero"
    )
    sched.set_timesteps(steps, device=latents.device)
    context = torch.cat([cond, uncond])
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        out_c, out_u = out.chunk(2)
        x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    return vae.decode(x / vae.config.scaling_factor).sample


class _Context(torch.nn.Module):
    """Stands in for the text encoder in the VRAM planner: its weights are outside what is measured here."""

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length


def planner_check(unet, vae, latents, cond, uncond, scale, device: torch.device, batches=(1, 2, 4)) -> list[dict]:
    """The serve VRAM planner's estimates against measured peaks: a whole 2-step generation, and each phase alone
    (the U-Net on the guidance batch of 2B, the VAE decode of B latents)."""
    from types import SimpleNamespace

    from unnoise.serve.vram import VramPlanner, measured_activations

    pipe = SimpleNamespace(unet=unet, vae=vae, text_encoder=_Context(cond.shape[1]), vae_factor=8)
    planner = VramPlanner(pipe, budget=2**50, max_batch=max(batches))
    size = latents.shape[-1] * 8
    rows = []
    for b in batches:
        x, c, u = latents.repeat(b, 1, 1, 1), cond.repeat(b, 1, 1), uncond.repeat(b, 1, 1)
        estimate = planner.estimate(b, size, size)
        t = torch.full((2 * b,), 500.0, device=device)
        measured = {
            "generation": measured_activations(lambda x=x, c=c, u=u: run_ours(unet, vae, x, c, u, 2, scale), device),
            "unet": measured_activations(
                lambda x=x, c=c, u=u, t=t: unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([c, u])), device
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small channels, to check the script on a CPU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense peak")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--report", default=None, help="also write a Markdown report here (docs/benchmarks/gpu.md)")
    args = parser.parse_args(argv)

    diffusers = import_diffusers()
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if args.tiny else (SD15_UNET, SD15_VAE)
    unet, vae, d_unet, d_vae = build(diffusers, unet_cfg, vae_cfg, seed=0)
    for m in (unet, vae, d_unet, d_vae):
        m.to(device=device, dtype=dtype).eval()
    # ours once more with nearest 2x + 3x3 conv upsampling, as diffusers: what the fused upsamplers change (and, on
    # the CPU, with PyTorch's own conv/linear kernels instead of oneDNN's on reordered weights)
    unet_u, vae_u = copy.deepcopy(unet), copy.deepcopy(vae)
    for m in (unet_u, vae_u):
        set_upsample_fusion(m, False)
        set_weight_packing(m, False)

    gen = torch.Generator().manual_seed(1)
    latent = args.size // 8
    latents = torch.randn(1, 4, latent, latent, generator=gen).to(device, dtype)
    cond = torch.randn(1, 77, unet_cfg["cross_attention_dim"], generator=gen).to(device, dtype)
    uncond = torch.randn(1, 77, unet_cfg["cross_attention_dim"], generator=gen).to(device, dtype)
    steps, scale = args.steps, args.guidance

    with torch.inference_mode():
        ours_fn = lambda: run_ours(unet, vae, latents, cond, uncond, steps, scale)  # noqa: E731
        unfused_fn = lambda: run_ours(unet_u, vae_u, latents, cond, uncond, steps, scale)  # noqa: E731
        theirs_fn = lambda: run_diffusers(diffusers, d_unet, d_vae, latents, cond, uncond, steps, scale)  # noqa: E731
        timings = timed({"ours": ours_fn, "ours_unfused": unfused_fn, "diffusers": theirs_fn}, device, args.runs)
        img_ours, t_ours, _, _ = timings["ours"]
        img_theirs, t_theirs, _, _ = timings["diffusers"]
        context = torch.cat([cond, uncond])
        # the architecture's FLOPs as published (two-step upsampling); the fused upsamplers do fewer
        unet_flops = count_flops(lambda: unet_u(torch.cat([latents, latents]), 500, encoder_hidden_states=context))
        vae_flops = count_flops(lambda: vae_u.decode(latents))
        planner = planner_check(unet, vae, latents, cond, uncond, scale, device)
    flops = unet_flops * steps + vae_flops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in name), None)
    result = {
        "device": name,
        "torch": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "dtype": args.dtype,
        "size": args.size,
        "steps": steps,
        "config": "tiny" if args.tiny else "SD-1.5",
        "model_tflop_per_image": flops / 1e12,
        "max_abs_image_difference": (img_ours.float() - img_theirs.float()).abs().max().item(),
    }
    for side, models in (("ours", (unet, vae)), ("ours_unfused", (unet_u, vae_u)), ("diffusers", (d_unet, d_vae))):
        _, t, mem, _ = timings[side]
        weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
        result[side] = {
            "latency_s": t,
            "images_per_s": 1 / t,
            "weights_gib": weights / 2**30,
            "activation_peak_gib": mem / 2**30,
            "peak_memory_gib": (weights + mem) / 2**30,
            "mfu": flops / t / peak if peak else None,
            "all_latencies_s": timings[side][3],
        }
    result["latency_ratio_ours_over_diffusers"] = t_ours / t_theirs
    result["latency_ratio_fused_over_unfused_upsampling"] = t_ours / timings["ours_unfused"][1]
    result["vram_planner"] = planner
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


def report(result: dict, command: str) -> str:
    """docs/benchmarks/gpu.md from one run's results."""
    rows = [
        f"| {side} | {r['latency_s']:.3f} | {r['images_per_s']:.3f} | {r['peak_memory_gib']:.3f} | "
        f"{r['activation_peak_gib']:.3f} | " + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a") + " | "
        f"{min(r['all_latencies_s']):.3f} - {max(r['all_latencies_s']):.3f} |"
        for side, r in (
            ("ours", result["ours"]),
            ("ours, unfused upsampling", result.get("ours_unfused")),
            ("diffusers", result["diffusers"]),
        )  # fmt: skip
        if r is not None
    ]
    planner = [
        f"| {r['batch']} | {r['phase']} | {r['estimated_gib']:.3f} | {r['measured_gib']:.3f} | "
        f"{r['estimate_over_measured']:.2f} |"
        for r in result["vram_planner"] or []
    ]
    return "\n".join(
        [
            "# GPU benchmark: SD-1.5-shaped text-to-image, ours against diffusers",
            "",
            f"Produced by `{command}` on **{result['device']}** (torch {result['torch']}, diffusers "
            f"{result['diffusers_version']}), {result['date']}.",
            "",
            f"{result['config']} U-Net and VAE configurations with identical random weights on both sides, "
            f"{result['size']}x{result['size']}, {result['dtype']}, {result['steps']} DPM-Solver++(2M) steps with "
            "classifier-free guidance (U-Net batch of 2), then the VAE decode. Median of the timed runs after one "
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
