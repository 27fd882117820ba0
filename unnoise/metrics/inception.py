"""The FID Inception-v3 network (Szegedy et al. 2016) and the feature extractor for FID, KID, precision/recall and IS.

This is the TensorFlow graph ``inception-2015-12-05`` that FID was defined with, in the module layout of
pytorch-fid's port, so its weight file ``pt_inception-2015-12-05-6726825d.pth`` loads with the identity key map.
It differs from torchvision's Inception-v3 in three places, all quirks of the TF graph: the average pools inside
Mixed_5b-d, Mixed_6b-e and Mixed_7b ignore the zero padding (``count_include_pad=False``), Mixed_7c pools its
last branch with a max pool, and ``fc`` has 1008 classes. There are no auxiliary logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

from unnoise.metrics.features import check_images
from unnoise.models.io import load_state

WEIGHTS_ENV = "UNNOISE_INCEPTION_WEIGHTS"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
# clean: PIL bicubic on float pixels, clipped, not quantized (clean-fid, Parmar et al. 2022); legacy: torch bilinear
# with align_corners=False (pytorch-fid). FID values from the two are not comparable.
RESIZE_MODES = ("clean", "legacy")


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TF's eps 0.001), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], **kwargs: int | tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool(x: Tensor) -> Tensor:
    # TF's average pool divides by the number of real (unpadded) pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-d (35x35): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch5x5_1, self.branch5x5_2),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """Mixed_6b-e (17x17): factorized 7x7 convolutions as 1x7 and 7x1 pairs."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _chain(x, *dbl),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                _chain(x, self.branch3x3_1, self.branch3x3_2),
                _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionE(nn.Module):
    """Mixed_7b-c (8x8): branches that split into parallel 1x3 and 3x1 convolutions.

    ``max_pool``: Mixed_7c of the FID graph pools its last branch with a max pool where Mixed_7b averages.
    """

    def __init__(self, c_in: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        dbl = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in FID: input ``(B, 3, 299, 299)`` in [-1, 1] -> 2048-d pool features and 1008 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pool features ``(B, 2048)`` and bias-free logits ``(B, 1008)``.

        The logits omit ``fc.bias`` because the original Inception Score code multiplies the pool features by
        the softmax weights alone (torch-fidelity's ``logits_unbiased``).
        """
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(F.max_pool2d(x, kernel_size=3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _chain(F.max_pool2d(x, kernel_size=3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)
        x = _chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        features = x.mean(dim=(2, 3))
        return features, features @ self.fc.weight.T


class InceptionFeatureExtractor(nn.Module):
    """uint8 images of any size -> FID Inception pool features, after the ``resize`` mode's resampling to 299."""

    dim = 2048

    def __init__(self, network: FIDInceptionV3, *, resize: str = "clean") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize={resize!r} is not one of {RESIZE_MODES}")
        self.network = network.eval().requires_grad_(False)
        self.resize = resize

    @property
    def name(self) -> str:
        """The feature space, resize mode included: results from different names do not compare."""
        return f"inception-v3-fid-{self.resize}"

    @property
    def description(self) -> str:
        how = "PIL bicubic on float pixels (clean-fid)" if self.resize == "clean" else "torch bilinear (pytorch-fid)"
        return f"FID Inception-v3 (TF inception-2015-12-05) pool features, resized to 299x299 by {how}"

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Frozen: batch norm stays in eval mode."""
        super().train(mode)
        self.network.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``(B, 1 or 3, H, W)`` -> float32 ``(B, 3, 299, 299)`` in [-1, 1] on the network's device."""
        images = check_images(images)
        device = self.network.fc.weight.device
        if self.resize == "clean":
            x = torch.from_numpy(np.stack([_pil_bicubic(image) for image in images.cpu().numpy()])).to(device) / 255
        else:  # pytorch-fid: ToTensor's [0, 1], bilinear resize, then 2x - 1
            x = images.to(device, torch.float32) / 255
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Pool features ``(B, 2048)`` and bias-free logits ``(B, 1008)`` (``softmax`` them for ``inception_score``)."""
        return self.network(self.preprocess(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]


def _pil_bicubic(image: np.ndarray) -> np.ndarray:
    """clean-fid's resize: each channel as a float32 PIL image, bicubic to 299x299, clipped to [0, 255], no rounding."""
    size, bicubic = (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC
    channels = [np.asarray(Image.fromarray(c.astype(np.float32)).resize(size, bicubic)) for c in image]
    # clean-fid clips: bicubic rings ~48 levels past a hard 0/255 edge, and its statistics never saw that overshoot
    return np.stack(channels).clip(0, 255)


def load_inception(
    path: str | Path | None = None,
    *,
    resize: str = "clean",
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> InceptionFeatureExtractor:
    """The FID feature extractor with weights from ``path`` or ``$UNNOISE_INCEPTION_WEIGHTS``.

    ``.safetensors`` files load directly. pytorch-fid's ``.pth`` is a pickle: it loads only with
    ``allow_pickle=True``, and even then through ``torch.load(weights_only=True)``, whose unpickler rebuilds only
    tensors and containers from an allow-list: a second guard for a file that should hold nothing but a state dict.
    """
    path = _weights_path(path)
    network = FIDInceptionV3()
    load_state(network, _with_batch_counters(network, _read_weights(path, allow_pickle)), source=str(path))
    return InceptionFeatureExtractor(network.to(device), resize=resize)


def _read_weights(path: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict in a ``.safetensors`` file, or in a pickled ``.pth`` if ``allow_pickle``."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if not allow_pickle:
        raise ValueError(
            f"{path} is not .safetensors, so it is a pickle, which can run code when loaded; pass allow_pickle=True "
            "if you trust its source (it is then read with torch.load(weights_only=True)), or convert it once: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'pt_inception.safetensors')"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights_path(path: str | Path | None) -> Path:
    """``path``, else ``$UNNOISE_INCEPTION_WEIGHTS``; an existing file, or an error that says how to get one."""
    path = os.environ.get(WEIGHTS_ENV) if path is None else path
    how = (
        f"download pytorch-fid's {WEIGHTS_URL}, and pass its path or set ${WEIGHTS_ENV} to it (a .pth needs "
        "allow_pickle=True; safetensors needs nothing more)"
    )
    if not path:
        raise FileNotFoundError(f"no FID Inception weights given and ${WEIGHTS_ENV} is not set: {how}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"FID Inception weights {path} do not exist: {how}")
    return Path(path)


def _with_batch_counters(network: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Batch norm's ``num_batches_tracked`` counters are optional: older files lack them and eval never reads them."""
    counters = {k: v for k, v in network.state_dict().items() if k.endswith("num_batches_tracked")}
    return {**counters, **state}
