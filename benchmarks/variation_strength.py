"""The default strength of an OpenAI-style variation (docs/serving.md, "Edits and variations"), on the embedded model.

    python benchmarks/variation_strength.py      # prints one line per strength (a few minutes on 2 cores)

30 digits from the embedded model (3 per digit, seeds 100 * digit), 4 variations of each with the empty prompt at
strengths 0.4 .. 1.0 (the model's default sampler and steps): how often the MNIST classifier reads the input's digit
in a variation, how far a variation moves from its input and how far the variations of one input lie from each
other (mean absolute pixel difference, 0..255).
"""

import time

import numpy as np
import torch

from unnoise import Pipeline
from unnoise.eval.adherence import images_to_tensor
from unnoise.models.classifier import load_classifier, prepare_digits

STRENGTHS = (0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def main() -> None:
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained("default")
    classifier = load_classifier()
    inputs = []
    for digit in range(10):
        inputs += [(digit, image) for image in pipe(f"a handwritten digit {digit}", num_images=3, seed=100 * digit)]
    with torch.no_grad():
        read = classifier(prepare_digits(images_to_tensor([image for _, image in inputs]))).argmax(1).numpy()
    print("inputs classified as prompted:", np.mean(read == np.array([digit for digit, _ in inputs])))
    start = time.time()
    for strength in STRENGTHS:
        keep, moved, spread = [], [], []
        for k, (_, image) in enumerate(inputs):
            outs = pipe("", image=image, strength=strength, num_images=4, seed=7 + k)
            with torch.no_grad():
                predicted = classifier(prepare_digits(images_to_tensor(outs))).argmax(1).numpy()
            keep.append(np.mean(predicted == read[k]))
            a = np.stack([np.asarray(o, np.float64) for o in outs])
            moved.append(np.abs(a - np.asarray(image, np.float64)).mean())
            spread.append(np.abs(a[:, None] - a[None]).mean() * 4 / 3)  # the mean over distinct pairs
        print(
            f"strength {strength}: same digit {np.mean(keep):.1%}, |variation - input| {np.mean(moved):.1f}/255, "
            f"|variation - variation| {np.mean(spread):.1f}/255  ({time.time() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
