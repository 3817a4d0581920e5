"""In-domain Fréchet distance on the attribute classifier's penultimate features (spec §5).

torchmetrics' ``FrechetInceptionDistance`` accepts any ``nn.Module`` returning [N, d] as its
feature network, so nothing is downloaded and torch-fidelity is not needed. The numbers live in
the classifier's feature space: they compare models on the captioned shapes only and are never
comparable to Inception FID, so every result carries ``FD_LABEL``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from jointgen.eval.attributes import to_uint8_nhwc
from jointgen.eval.classifier import AttributeClassifier

FD_LABEL = "in-domain FD (not comparable to Inception FID)"


class ClassifierFeatures(nn.Module):
    """Frozen feature network for torchmetrics: uint8 or [0, 1] images [N, 3, H, W] -> [N, d].

    The classifier is copied, because the metric's ``set_dtype(torch.float64)`` converts every
    child module, and it stays in eval mode even when a parent calls ``.train()`` (a
    LightningModule does every epoch), so BatchNorm never switches to batch statistics.

    Args:
        classifier: a trained ``AttributeClassifier``.
    """

    def __init__(self, classifier: AttributeClassifier) -> None:
        super().__init__()
        self.classifier = copy.deepcopy(classifier).eval()
        self.classifier.requires_grad_(False)
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> ClassifierFeatures:
        super().train(mode)
        self.classifier.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def in_domain_fd_metric(
    classifier: AttributeClassifier, reset_real_features: bool = True
) -> FrechetInceptionDistance:
    """A float64 ``FrechetInceptionDistance`` on the classifier's features, for per-stage use.

    Feed it uint8 or [0, 1] float images [N, 3, H, W] with ``update(images, real=...)``.

    Args:
        classifier: a trained ``AttributeClassifier`` at the images' size.
        reset_real_features: ``False`` keeps the real statistics across ``reset()``.
    """
    metric = FrechetInceptionDistance(
        feature=ClassifierFeatures(classifier), reset_real_features=reset_real_features
    )
    return metric.set_dtype(torch.float64)


def frechet_distance(
    real_images: np.ndarray | torch.Tensor,
    fake_images: np.ndarray | torch.Tensor,
    classifier: AttributeClassifier,
    batch_size: int = 512,
) -> dict[str, float | str]:
    """In-domain Fréchet distance between two image sets.

    Args:
        real_images: [N, H, W, 3] or [N, 3, H, W], uint8 or float in [0, 1]; N >= 2.
        fake_images: the same layout; at least 2 images.
        classifier: a trained ``AttributeClassifier`` at the images' size.
        batch_size: images per feature pass.

    Returns:
        ``in_domain_fd``, ``num_real``, ``num_fake`` and ``label`` (``FD_LABEL``).
    """
    device = next(classifier.parameters()).device
    metric = in_domain_fd_metric(classifier).to(device)
    counts = {}
    for real, images in ((True, real_images), (False, fake_images)):
        x = torch.from_numpy(to_uint8_nhwc(images)).permute(0, 3, 1, 2)
        if len(x) < 2:
            raise ValueError(f"the Fréchet distance needs >= 2 images per set, got {len(x)}")
        counts[real] = len(x)
        for start in range(0, len(x), batch_size):
            metric.update(x[start : start + batch_size].to(device), real=real)
    return {
        "in_domain_fd": float(metric.compute()),
        "num_real": float(counts[True]),
        "num_fake": float(counts[False]),
        "label": FD_LABEL,
    }
