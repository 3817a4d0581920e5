"""CIFAR-10 from torchvision's python-pickle layout.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009,
https://www.cs.toronto.edu/~kriz/cifar.html. NVAE trains on the 50k training images with
horizontal flips and reports bpd on the official 10k test split, so validation and test both
read ``test_batch``. The pickles are parsed here (through a restricted unpickler) rather than by
``torchvision.datasets.CIFAR10``, whose md5 check rejects anything but the official files.
"""

from __future__ import annotations

from collections.abc import Sequence
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

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
SOURCE = "python pickle version from https://www.cs.toronto.edu/~kriz/cifar.html"


def read_cifar_batches(paths: Sequence[Path]) -> ArraySource:
    """Read CIFAR pickle batches (``data`` uint8 N x 3072, channel-major) into one source."""
    chunks, labels = [], []
    for path in paths:
        record = restricted_load(path, encoding="bytes")
        data = uint8_rows(pick_key(record, "data", path), path, 3 * 32 * 32)
        # rows store the 1024 red, then green, then blue values: a plain reshape gives CHW
        chunks.append(data.reshape(-1, 3, 32, 32))
        labels.append(int_labels(pick_key(record, "labels", path), path, 0, 9, len(data)))
    return ArraySource(chunks, np.concatenate(labels))


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10, 3 x 32 x 32; val and test are the official test split.

    Args:
        data_dir: Folder containing ``cifar-10-batches-py/``.
        batch_size: Images per batch (NVAE: 32 per GPU).
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory.
        download: Fetch the archive with torchvision in ``prepare_data`` when files are missing.
        random_flip: Random horizontal flips of training images.
        num_bits: Bit depth the pixels are floored to (8 keeps them as they are).
    """

    name = "CIFAR-10"
    download_source = SOURCE

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int = 32,
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

    def _check_files(self) -> None:
        folder = self.data_dir / FOLDER
        if not all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES):
            raise missing_data_error(
                self.name,
                self.data_dir,
                f"{FOLDER}/data_batch_1..5 and test_batch",
                SOURCE,
                downloadable=True,
            )

    def _download(self) -> None:
        from torchvision.datasets import CIFAR10

        # downloads and extracts both splits; skipped when the md5 of present files matches
        CIFAR10(str(self.data_dir), train=True, download=True)

    def _source(self, files: str) -> ArraySource:
        if files not in self._sources:
            names = TRAIN_FILES if files == "train" else TEST_FILES
            self._sources[files] = read_cifar_batches([self.data_dir / FOLDER / n for n in names])
        return self._sources[files]

    def _build(self, split: str) -> Dataset:
        train = split == "train"
        return DictImageDataset(
            self._source("train" if train else "test"),
            random_flip=train and self.random_flip,
            num_bits=self.num_bits,
        )
