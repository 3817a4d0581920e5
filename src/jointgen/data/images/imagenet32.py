"""Downsampled ImageNet 32 x 32 in the pickle (or npz) batch format.

Chrabaszcz, Loshchilov & Hutter, "A Downsampled Variant of ImageNet as an Alternative to the
CIFAR datasets", 2017, https://arxiv.org/abs/1707.08819; files from
https://image-net.org/download-images.php (an ImageNet account is needed, so there is no
download option). Each batch is a dict with ``data`` (uint8 N x 3072, channel-major like
CIFAR), 1-based ``labels`` and usually ``mean``. NVAE reports bpd on the 50,000 validation
images, which serve as both val and test here, and its reference code flips training images.

NVAE's reference code reads an LMDB it calls ``imagenet-oord``, i.e. van den Oord et al.'s
downsampled ImageNet (PNG files, box-resized), not this variant; bpd on the two differ slightly.
The Oord PNG folders can be read with ``ImageFolderDataModule(image_size=32)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from jointgen.data.images.common import (
    ArraySource,
    DictImageDataset,
    ImageDataModule,
    int_labels,
    missing_data_error,
    pick_key,
    restricted_load,
    uint8_rows,
)
from jointgen.utils.checks import DataFormatError

TRAIN_DIRS = ("Imagenet32_train", "Imagenet32_train_npz")
VAL_DIRS = ("Imagenet32_val", "Imagenet32_val_npz")
TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
VAL_FILES = ("val_data",)
SOURCE = "Imagenet32 pickle or npz batches from https://image-net.org/download-images.php"


def read_imagenet32_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 N x 3 x 32 x 32 and 0-based labels from one pickle or npz batch."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as record:
                data, labels = pick_key(record, "data", path), pick_key(record, "labels", path)
        except DataFormatError:
            raise
        # a damaged zip fails with BadZipFile, zlib.error, EOFError, ValueError, ...
        except Exception as e:  # noqa: BLE001
            raise DataFormatError(
                f"{path}: not a readable .npz ({type(e).__name__}: {e})"
            ) from None
    else:
        record = restricted_load(path, encoding="bytes")
        data, labels = pick_key(record, "data", path), pick_key(record, "labels", path)
    data = uint8_rows(data, path, 3 * 32 * 32)
    # labels are 1-based (1..1000)
    labels = int_labels(labels, path, 1, 1000, len(data))
    return data.reshape(-1, 3, 32, 32), labels - 1


class ImageNet32DataModule(ImageDataModule):
    """ImageNet 32 x 32; val and test are the official validation set.

    Args:
        data_dir: Folder containing ``Imagenet32_train/`` and ``Imagenet32_val/`` (or the
            ``_npz`` folders), with ``train_data_batch_1..10`` and ``val_data``, each a pickle or
            ``.npz``.
        batch_size: Images per batch (NVAE: 24 per GPU).
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory.
        download: Must be false: the files need an ImageNet account.
        random_flip: Random horizontal flips of training images (the paper states no
            augmentation; NVAE's reference code flips).
        num_bits: Bit depth the pixels are floored to (8 keeps them as they are).
    """

    name = "ImageNet32"

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int = 24,
        num_workers: int = 4,
        pin_memory: bool = True,
        download: bool = False,
        random_flip: bool = True,
        num_bits: int = 8,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            download=download,
            image_shape=(3, 32, 32),
            num_bits=num_bits,
            binary=False,
        )
        self.save_hyperparameters(logger=False)
        self.random_flip = random_flip
        self._sources: dict[str, ArraySource] = {}

    def _find(self, folders: tuple[str, ...], name: str) -> Path | None:
        for folder in folders:
            for candidate in (name, f"{name}.npz"):
                path = self.data_dir / folder / candidate
                if path.is_file():
                    return path
        return None

    def _paths(self, files: str) -> list[Path | None]:
        if files == "train":
            return [self._find(TRAIN_DIRS, n) for n in TRAIN_FILES]
        return [self._find(VAL_DIRS, n) for n in VAL_FILES]

    def _check_files(self) -> None:
        if any(p is None for p in self._paths("train") + self._paths("val")):
            raise missing_data_error(
                self.name,
                self.data_dir,
                f"{TRAIN_DIRS[0]}/train_data_batch_1..10 and {VAL_DIRS[0]}/val_data "
                "(pickle, or .npz, also accepted in the *_npz folders)",
                SOURCE,
                downloadable=False,
            )

    def _source(self, files: str) -> ArraySource:
        if files not in self._sources:
            chunks, labels = [], []
            for path in self._paths(files):
                data, targets = read_imagenet32_batch(path)
                chunks.append(data)
                labels.append(targets)
            self._sources[files] = ArraySource(chunks, np.concatenate(labels))
        return self._sources[files]

    def _build(self, split: str) -> Dataset:
        train = split == "train"
        return DictImageDataset(
            self._source("train" if train else "val"),
            random_flip=train and self.random_flip,
            num_bits=self.num_bits,
        )
