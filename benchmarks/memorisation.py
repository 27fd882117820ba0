"""Memorisation check of the embedded default model: how close each generated digit is to its nearest training
digit, against how close unseen (held-out) digits are to theirs.

    python benchmarks/memorisation.py                        # 50 per digit; writes docs/benchmarks/memorisation.md
    python benchmarks/memorisation.py --per-digit 4 --quick  # a small run that only prints

Generated: the default model with its own settings (prompt "a handwritten <digit>", per-image seeds). Reference: the
9000 training digits the model was trained on (``MNIST("train")``, split seed 0, padded to 32x32). Baseline: the
1000 held-out digits (``MNIST("val")``). Distance: Euclidean between images in [0, 1] pixels (1024 values). A model
that reproduces training digits puts many samples closer to a training digit than held-out digits ever come: the
report gives the distance quantiles of both sets, the share of samples under the held-out 1st and 5th percentiles
(about 1% and 5% without copying), overall and per prompted digit, and the closest samples beside their nearest
training digits (a PNG).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unnoise import Pipeline  # noqa: E402
from unnoise.data.captions import DIGIT_WORDS  # noqa: E402
from unnoise.data.mnist import MNIST  # noqa: E402

QUANTILES = (0.01, 0.05, 0.25, 0.5)


def nearest(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to and index of the nearest reference image for each query (both (N, H, W) in [0, 1])."""
    q = torch.from_numpy(queries.reshape(len(queries), -1)).double()
    r = torch.from_numpy(reference.reshape(len(reference), -1)).double()
    d = torch.cdist(q, r)
    dist, index = d.min(dim=1)
    return dist.numpy(), index.numpy()


def generate(pipe: Pipeline, per_digit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for digit, word in enumerate(DIGIT_WORDS):
        out = pipe(f"a handwritten {word}", num_images=per_digit, seed=10_000 * (digit + 1))
        images += [np.asarray(img.convert("L"), dtype=np.float64) / 255 for img in out]
        labels += [digit] * per_digit
    return np.stack(images), np.array(labels)


def pairs_png(samples: np.ndarray, train: np.ndarray, order: np.ndarray, index: np.ndarray, path: Path) -> None:
    """Top row: the closest samples; bottom row: their nearest training digits."""
    top = np.concatenate([samples[i] for i in order], axis=1)
    bottom = np.concatenate([train[index[i]] for i in order], axis=1)
    grid = (np.concatenate([top, bottom], axis=0) * 255).round().astype(np.uint8)
    Image.fromarray(grid, mode="L").resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-digit", type=int, default=50)
    parser.add_argument("--model", default="default")
    parser.add_argument("--quick", action="store_true", help="print only; write no report")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "memorisation.md")
    args = parser.parse_args(argv)
    train = MNIST("train").images.astype(np.float64) / 255
    val = MNIST("val").images.astype(np.float64) / 255
    pipe = Pipeline.from_pretrained(args.model)
    start = time.perf_counter()
    samples, labels = generate(pipe, args.per_digit)
    seconds = time.perf_counter() - start
    d_gen, i_gen = nearest(samples, train)
    d_val, _ = nearest(val, train)
    q_gen, q_val = np.quantile(d_gen, QUANTILES), np.quantile(d_val, QUANTILES)
    under = {q: float(np.mean(d_gen < np.quantile(d_val, q))) for q in (0.01, 0.05)}
    same_label = float(np.mean(MNIST("train").labels[i_gen] == labels))
    # per digit: simple digits (a "1" is a few pixels) lie close to training digits whoever drew them, so compare
    # each sample with the held-out digits of its own class too
    val_labels = MNIST("val").labels
    per_class = {q: float(np.mean([d < np.quantile(d_val[val_labels == y], q) for d, y in zip(d_gen, labels)]))
                 for q in (0.01, 0.05)}  # fmt: skip
    result = {"samples": len(samples), "quantiles_generated": q_gen.tolist(), "quantiles_val": q_val.tolist(),
              "share_under_val_p1": under[0.01], "share_under_val_p5": under[0.05], "min_generated": float(d_gen.min()),
              "min_val": float(d_val.min()), "nearest_has_prompted_digit": same_label,
              "share_under_class_val_p1": per_class[0.01], "share_under_class_val_p5": per_class[0.05]}  # fmt: skip
    command = "python benchmarks/memorisation.py" + ("" if argv is None else " " + " ".join(argv))
    lines = [
        "# Memorisation check of the default model",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} (torch {torch.__version__}, CPU; "
        f"{len(samples)} images generated in {seconds:.0f} s). See the script's docstring for the method.",
        "",
        "Distance to the nearest of the 9000 training digits (Euclidean, pixels in [0, 1], 32x32):",
        "",
        "| set | n | " + " | ".join(f"{int(q * 100)}th pct" for q in QUANTILES) + " | minimum |",
        "|---|---|" + "---|" * len(QUANTILES) + "---|",
        f"| generated | {len(samples)} | " + " | ".join(f"{v:.2f}" for v in q_gen) + f" | {d_gen.min():.2f} |",
        f"| held-out digits | {len(val)} | " + " | ".join(f"{v:.2f}" for v in q_val) + f" | {d_val.min():.2f} |",
        "",
        f"Generated images closer to a training digit than the held-out 1st percentile: **{100 * under[0.01]:.1f}%**"
        f" (about 1% expected without copying); under the 5th percentile: **{100 * under[0.05]:.1f}%** (about 5%).",
        f"Against the held-out digits of the prompted class (each digit's own percentiles): "
        f"**{100 * per_class[0.01]:.1f}%** under the 1st, **{100 * per_class[0.05]:.1f}%** under the 5th.",
        f"The nearest training digit shows the prompted digit for {100 * same_label:.1f}% of the samples.",
        "",
        "The 10 generated images closest to a training digit (top) and those training digits (bottom):",
        "",
        "![closest pairs](memorisation-closest.png)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        args.out.write_text(text)
        pairs_png(samples, train, np.argsort(d_gen)[:10], i_gen, args.out.with_name("memorisation-closest.png"))
    return result


if __name__ == "__main__":
    main()
