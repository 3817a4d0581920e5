"""SEJE (Xie, Liu et al., ACM TOIS 2022, arXiv 2110.11592): plain torch modules and losses.

Importable without Lightning; the training wrapper is ``jointgen.models.seje_module``.
"""

from jointgen.models.seje.image import BACKBONES, ImageEncoder, SmallCNN, build_backbone
from jointgen.models.seje.losses import (
    Discriminator,
    category_loss,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    hardest_negatives,
    pairwise_distances,
    triplet_loss,
)
from jointgen.models.seje.net import SEJE, SEJEOutput
from jointgen.models.seje.text import RecipeEncoder

__all__ = [
    "BACKBONES",
    "SEJE",
    "Discriminator",
    "ImageEncoder",
    "RecipeEncoder",
    "SEJEOutput",
    "SmallCNN",
    "build_backbone",
    "category_loss",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
    "hardest_negatives",
    "pairwise_distances",
    "triplet_loss",
]
