"""Feature caching (DeepCache) on an SD-1.5-shaped U-Net: U-Net time of a 25-step run and the decoded image's change.

    python benchmarks/feature_cache.py            # writes docs/benchmarks/feature_cache.md
    python benchmarks/feature_cache.py --quick    # fewer repeats, prints only

The networks are benchmarks/models.py's: Stable Diffusion 1.5's U-Net and VAE shapes at reduced width, random
weights, prepared for inference as the pipeline prepares them. One run is 25 DPM-Solver++(2M) steps with
classifier-free guidance (U-Net batch 2, 32x32 latents, 77 context tokens) from fixed noise, then the VAE decode.
Each ``cache_interval`` (1 = no caching) runs in turn, repeatedly, alternating within one process; the U-Net time
is the sum of its forward calls' wall time (the sampler's own arithmetic excluded), and the reported figure is the
median over repeats. The image difference is the largest absolute difference of 8-bit pixels against the uncached
run's image. With random weights the pixel change shows that the approximation is at work, not what it costs a
trained model's images; that is measured on the embedded model (FID and adherence) separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import UNET, VAE  # noqa: E402
from unnoise.core.denoisers import VPDenoiser  # noqa: E402
from unnoise.core.guidance import CFGDenoiser  # noqa: E402
from unnoise.core.samplers import sample  # noqa: E402
from unnoise.models.packing import prepare_for_inference  # noqa: E402
from unnoise.models.unet import UNet, UNetConfig  # noqa: E402
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from unnoise.pipeline.config import SamplingConfig, ScheduleConfig, sampling_grid  # noqa: E402
from unnoise.pipeline.png import to_pil  # noqa: E402

STEPS = 25
INTERVALS = (1, 2, 3, 5)
COMMAND = "python benchmarks/feature_cache.py"


class Timed(torch.nn.Module):
    """The U-Net with its forward calls' wall time summed in ``seconds``."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet, self.seconds = unet, 0.0

    def forward(self, x, t, encoder_hidden_states):
        start = time.perf_counter()
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        self.seconds += time.perf_counter() - start
        return out


def build(seed: int = 0) -> tuple[UNet, AutoencoderKL]:
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.from_diffusers(UNET)).eval()
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(VAE)).eval()
    prepare_for_inference(unet)
    prepare_for_inference(vae)
    return unet, vae


def run(unet: UNet, vae: AutoencoderKL, interval: int) -> tuple[float, float, torch.Tensor]:
    """(U-Net seconds, whole run seconds, uint8 pixels) of one 25-step run with ``cache_interval=interval``."""
    g = torch.Generator().manual_seed(1)
    schedule, sigmas = sampling_grid(ScheduleConfig(), SamplingConfig(), STEPS, "karras")
    context = torch.randn(1, 77, UNET["cross_attention_dim"], generator=g)
    empty = torch.randn(1, 77, UNET["cross_attention_dim"], generator=g)
    timed = Timed(unet)
    vp = VPDenoiser(timed, schedule, "epsilon")
    denoiser = CFGDenoiser(vp, 7.5, {"encoder_hidden_states": empty})
    x = torch.randn(1, 4, 32, 32, generator=g) * vp.prior_std(sigmas[0].item())
    start = time.perf_counter()
    with torch.inference_mode(), unet.caching(interval) as cache:
        latents = sample(denoiser, x, sigmas, "dpmpp_2m", encoder_hidden_states=context)
        pixels = vae.decode(vae.from_latent(latents)).float()
    total = time.perf_counter() - start
    assert cache.full_calls + cache.reused_calls == STEPS
    image = torch.from_numpy(np.array(to_pil(pixels)[0])).to(torch.int16)
    return timed.seconds, total, image


def measure(repeats: int) -> dict:
    unet, vae = build()
    run(unet, vae, 1)  # warm-up: oneDNN primitives, allocator
    rows: dict[int, dict[str, list]] = {i: {"unet": [], "total": []} for i in INTERVALS}
    images: dict[int, torch.Tensor] = {}
    for _ in range(repeats):
        for interval in INTERVALS:
            unet_s, total_s, image = run(unet, vae, interval)
            rows[interval]["unet"].append(unet_s)
            rows[interval]["total"].append(total_s)
            images[interval] = image
    out = {}
    for interval in INTERVALS:
        unet_s, total_s = statistics.median(rows[interval]["unet"]), statistics.median(rows[interval]["total"])
        full = -(-STEPS // interval) if interval > 1 else STEPS  # calls 0, N, 2N, ... are full
        out[interval] = {
            "unet_s": unet_s,
            "total_s": total_s,
            "full_calls": full,
            "max_pixel_difference": int((images[interval] - images[1]).abs().max()),
            "mean_pixel_difference": float((images[interval] - images[1]).abs().float().mean()),
        }
    base = out[1]
    for row in out.values():
        row["unet_speedup"] = base["unet_s"] / row["unet_s"]
        row["total_speedup"] = base["total_s"] / row["total_s"]
    return {"repeats": repeats, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "rows": out}  # fmt: skip


def report(result: dict) -> str:
    lines = [
        "# Feature caching (DeepCache) on an SD-1.5-shaped U-Net",
        "",
        f"Produced by `{COMMAND}` (torch {result['torch']}, {result['threads']} threads, median of "
        f"{result['repeats']} runs per setting, settings alternating in one process).",
        "",
        "SD-1.5 U-Net and VAE shapes at reduced width (benchmarks/models.py), random weights, prepared for inference "
        "as the pipeline does; 25 DPM-Solver++(2M) steps on a Karras grid with guidance 7.5 (U-Net batch 2, 32x32 "
        "latents), then the decode to 256x256. `cache_interval=N`: every N-th U-Net call runs the whole network, "
        "the others only the outermost level (`depth=1`) on the inner levels' cached output. Pixel differences are "
        "of 8-bit images against the uncached run's; with random weights they show the approximation at work, not its "
        "cost to a trained model's images.",
        "",
        "| cache_interval | full U-Net calls | U-Net s | U-Net speed-up | run s | run speed-up | max pixel diff "
        "| mean pixel diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for interval, row in result["rows"].items():
        lines.append(
            f"| {interval} | {row['full_calls']} / {STEPS} | {row['unet_s']:.3f} | {row['unet_speedup']:.2f}x | "
            f"{row['total_s']:.3f} | {row['total_speedup']:.2f}x | {row['max_pixel_difference']} | "
            f"{row['mean_pixel_difference']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, print only")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "feature_cache.md"))
    args = parser.parse_args(argv)
    result = measure(2 if args.quick else args.repeats)
    text = report(result)
    print(text)
    print(json.dumps(result["rows"], indent=1))
    if not args.quick:
        Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    main()
