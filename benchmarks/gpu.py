"""GPU benchmark: Stable-Diffusion-1.5-shaped text-to-image, ours against diffusers on identical random weights.

    python benchmarks/gpu.py                      # CUDA: 512x512, fp16, 25 DPM-Solver++(2M) steps, CFG 7.5
    python benchmarks/gpu.py --tiny --device cpu  # a small config on the CPU, to check the script itself

Both sides run the same loop on the same weights, noise and prompt embeddings (random 77x768 stand-ins: the text
encoder is the same for both and outside what is compared): U-Net with classifier-free guidance in one batch of 2,
the scheduler step, and the VAE decode. Reported per side: median latency, images/s, peak memory and model-FLOP
utilization against the card's dense bf16/fp16 peak.

diffusers is needed only here. On a machine without network access, put its wheel (and the wheels of what it
needs, such as huggingface_hub) beside this script: pure-Python wheels are imported straight from the zip files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unnoise.denoisers import VPDenoiser  # noqa: E402
from unnoise.guidance import CFGDenoiser  # noqa: E402
from unnoise.models.io import diffusers_key, load_state  # noqa: E402
from unnoise.models.unet import UNet, UNetConfig  # noqa: E402
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from unnoise.samplers import sample  # noqa: E402
from unnoise.schedules import VPSchedule  # noqa: E402

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


def timed(fn, device: torch.device, runs: int):
    """Median wall time of ``runs`` calls after one warm-up, and the peak memory of one call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return out, statistics.median(times), peak


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
    args = parser.parse_args(argv)

    diffusers = import_diffusers()
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if args.tiny else (SD15_UNET, SD15_VAE)
    unet, vae, d_unet, d_vae = build(diffusers, unet_cfg, vae_cfg, seed=0)
    for m in (unet, vae, d_unet, d_vae):
        m.to(device=device, dtype=dtype).eval()

    gen = torch.Generator().manual_seed(1)
    latent = args.size // 8
    latents = torch.randn(1, 4, latent, latent, generator=gen).to(device, dtype)
    cond = torch.randn(1, 77, unet_cfg["cross_attention_dim"], generator=gen).to(device, dtype)
    uncond = torch.randn(1, 77, unet_cfg["cross_attention_dim"], generator=gen).to(device, dtype)
    steps, scale = args.steps, args.guidance

    with torch.inference_mode():
        ours_fn = lambda: run_ours(unet, vae, latents, cond, uncond, steps, scale)  # noqa: E731
        theirs_fn = lambda: run_diffusers(diffusers, d_unet, d_vae, latents, cond, uncond, steps, scale)  # noqa: E731
        img_ours, t_ours, mem_ours = timed(ours_fn, device, args.runs)
        img_theirs, t_theirs, mem_theirs = timed(theirs_fn, device, args.runs)
        context = torch.cat([cond, uncond])
        unet_flops = count_flops(lambda: unet(torch.cat([latents, latents]), 500, encoder_hidden_states=context))
        vae_flops = count_flops(lambda: vae.decode(latents))
    flops = unet_flops * steps + vae_flops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in name), None)
    result = {
        "device": name,
        "dtype": args.dtype,
        "size": args.size,
        "steps": steps,
        "config": "tiny" if args.tiny else "SD-1.5",
        "model_tflop_per_image": flops / 1e12,
        "max_abs_image_difference": (img_ours.float() - img_theirs.float()).abs().max().item(),
    }
    for side, t, mem in (("ours", t_ours, mem_ours), ("diffusers", t_theirs, mem_theirs)):
        result[side] = {
            "latency_s": t,
            "images_per_s": 1 / t,
            "peak_memory_gib": mem / 2**30,
            "mfu": flops / t / peak if peak else None,
        }
    result["latency_ratio_ours_over_diffusers"] = t_ours / t_theirs
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
