"""LightningDataModules for the real image datasets NVAE trains on.

Each yields ``{"image": float32 B x C x H x W in [0, 1], "label": int64 B}`` batches and exposes
``image_shape``, ``num_bits`` and ``binary``; files are read from ``data_dir`` and nothing is
downloaded unless ``download=True``.
"""

from jointgen.data.images.celeba import CelebA64DataModule
from jointgen.data.images.cifar10 import CIFAR10DataModule
from jointgen.data.images.common import ImageDataModule, RestrictedUnpickler
from jointgen.data.images.folder import ImageFolderDataModule
from jointgen.data.images.imagenet32 import ImageNet32DataModule
from jointgen.data.images.mnist import MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CelebA64DataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNet32DataModule",
    "MNISTDataModule",
    "RestrictedUnpickler",
]
