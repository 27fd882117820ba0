"""Feature extractors for evaluation: the MNIST classifier's features (FID-MNIST) next to the FID Inception network.

``MNISTFeatures`` follows ``unnoise.metrics.FeatureExtractor``: uint8 images in, the classifier's penultimate
features out, named by the classifier's weights so that statistics from a retrained classifier never mix with old
ones. ``load_extractor`` picks it or the Inception extractor (for RGB images, with the user's standard weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from unnoise.files import file_sha256
from unnoise.metrics import InceptionFeatureExtractor, check_images, load_inception
from unnoise.models.classifier import SHIPPED_WEIGHTS, DigitClassifier, load_classifier, prepare_digits

FEATURE_KINDS = ("mnist", "inception")
# PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point, rounded (Convert.c, L24 macro).
_LUMA = (19595, 38470, 7471)


class MNISTFeatures:
    """uint8 digit images ``(B, 1 or 3, H, W)``, H = 28 + 2k -> the classifier's penultimate features ``(B, 128)``.

    RGB input is converted to luminance exactly as PIL's ``convert("L")``; images are center-cropped to 28 x 28
    (``prepare_digits``) and scaled to [-1, 1], as the classifier was trained.
    """

    def __init__(self, classifier: DigitClassifier, *, weights_id: str) -> None:
        self.classifier = classifier.eval().requires_grad_(False)
        self.weights_id = weights_id

    @classmethod
    def load(cls, path: str | Path = SHIPPED_WEIGHTS, *, device: str | torch.device = "cpu") -> MNISTFeatures:
        """The classifier folder at ``path`` (the shipped one by default), named by its weights' sha256."""
        weights = Path(path) / "model.safetensors"
        if not (weights.is_file() and (Path(path) / "config.json").is_file()):
            raise FileNotFoundError(
                f"no MNIST classifier in {path} (needs config.json and model.safetensors); train one with "
                "`unnoise train-classifier --out DIR` and pass DIR"
            )
        digest = file_sha256(weights)[:10]
        return cls(load_classifier(path).to(device), weights_id=digest)

    @property
    def name(self) -> str:
        """The feature space: FID-MNIST values compare only between results with the same name."""
        return f"mnist-classifier-{self.weights_id}"

    @property
    def description(self) -> str:
        return f"penultimate features of the project's MNIST classifier (weights sha256 {self.weights_id}...)"

    @property
    def dim(self) -> int:
        return self.classifier.config.feature_dim

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 ``(B, 1 or 3, H, W)`` -> float32 ``(B, 1, 28, 28)`` in [-1, 1] on the classifier's device."""
        images = check_images(images)  # 1 channel is repeated to 3; the luma of equal channels is that channel
        r, g, b = (images[:, c].to(torch.int64) for c in range(3))
        gray = (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2] + 0x8000) >> 16
        device = self.classifier.head.weight.device
        x = gray[:, None].to(device, torch.float32) / 127.5 - 1.0
        return prepare_digits(x, size=self.classifier.config.size)

    @torch.no_grad()
    def features_and_predictions(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``(B, dim)`` and predicted digits ``(B,)`` in one pass."""
        features = self.classifier.features(self.prepare(images))
        return features, self.classifier.head(features).argmax(dim=1)

    def __call__(self, images: Tensor) -> Tensor:
        return self.features_and_predictions(images)[0]

    def predict(self, images: Tensor) -> Tensor:
        """Predicted digits, int64 ``(B,)``."""
        return self.features_and_predictions(images)[1]


def load_extractor(
    kind: str,
    *,
    classifier: str | Path | None = None,
    inception_weights: str | Path | None = None,
    resize: str = "clean",
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> MNISTFeatures | InceptionFeatureExtractor:
    """The FID feature space ``kind``: "mnist" (``classifier`` folder, default the shipped one) or "inception"
    (weights from ``inception_weights`` or ``$UNNOISE_INCEPTION_WEIGHTS``, resized by ``resize``)."""
    if kind == "mnist":
        return MNISTFeatures.load(SHIPPED_WEIGHTS if classifier is None else classifier, device=device)
    if kind == "inception":
        return load_inception(inception_weights, resize=resize, allow_pickle=allow_pickle, device=device)
    raise ValueError(f"features={kind!r} is not allowed; allowed: {', '.join(FEATURE_KINDS)}")
