"""The fused upsampler's two algorithms against nearest 2x + 3x3 conv, per Stable Diffusion 1.5 upsampler shape.

    python benchmarks/upsample.py            # CUDA: fp16, SD-1.5's VAE (512px) and U-Net (64x64 latents) shapes
    python benchmarks/upsample.py --small    # small shapes, to check the script on a CPU

Columns: the two-step path (`fused=False`), the phase convolution (2x2 kernel, four phases as output channels,
then an interleaving copy: the CPU's fused path) and the stride-2 transposed convolution (CUDA's fused path),
each the median of timed calls after a warm-up (CUDA events on a GPU), with the largest absolute difference from
the two-step output. Then a whole SD-1.5 VAE decode (random weights) with and without fusion.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import SD15_VAE  # noqa: E402
from unnoise.models import layers  # noqa: E402
from unnoise.models.layers import Upsample2D, set_upsample_fusion  # noqa: E402
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

# (channels, input size, batch): the VAE decoder's three upsamplers at 512x512 output, the U-Net's three at 64x64
# latents with the guidance batch of 2
SD15_SHAPES = [(512, 64, 1), (512, 128, 1), (256, 256, 1), (1280, 8, 2), (1280, 16, 2), (640, 32, 2)]
SMALL_SHAPES = [(32, 16, 1), (16, 32, 2)]


def median_ms(fn, device: torch.device, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(runs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def with_algorithm(up: Upsample2D, x: torch.Tensor, phase: bool):
    """A call of ``up`` forced to one fused algorithm, whatever the device."""
    devices = (x.device.type,) if phase else ()

    def call():
        saved, layers.PHASE_CONV_DEVICES = layers.PHASE_CONV_DEVICES, devices
        try:
            return up(x)
        finally:
            layers.PHASE_CONV_DEVICES = saved

    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small shapes and VAE, to check the script on a CPU")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, torch {torch.__version__}")
    print("| channels | size | batch | two-step ms | phase conv ms (max diff) | transposed conv ms (max diff) |")
    print("|---|---|---|---|---|---|")
    for channels, size, batch in SMALL_SHAPES if args.small else SD15_SHAPES:
        fused = Upsample2D(channels).to(device, dtype)
        plain = Upsample2D(channels, fused=False).to(device, dtype)
        plain.load_state_dict(fused.state_dict())
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
        phase, transposed = with_algorithm(fused, x, True), with_algorithm(fused, x, False)
        with torch.inference_mode():
            want = plain(x).float()
            errors = [(f().float() - want).abs().max().item() for f in (phase, transposed)]
        times = [median_ms(f, device, args.runs) for f in (lambda p=plain, x=x: p(x), phase, transposed)]
        print(f"| {channels} | {size}->{2 * size} | {batch} | {times[0]:.3f} | {times[1]:.3f} ({errors[0]:.1e}) | "
              f"{times[2]:.3f} ({errors[1]:.1e}) |")  # fmt: skip
    config = {**SD15_VAE, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8} if args.small else SD15_VAE
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(config)).to(device, dtype).eval()
    z = torch.randn(1, 4, 16 if args.small else 64, 16 if args.small else 64, device=device, dtype=dtype)
    for enabled in (True, False):
        set_upsample_fusion(vae, enabled)
        print(f"VAE decode, fused={enabled}: {median_ms(lambda: vae.decode(z), device, max(args.runs // 3, 3)):.2f} ms")


if __name__ == "__main__":
    main()
