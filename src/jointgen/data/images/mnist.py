"""MNIST from torchvision's raw IDX layout, dynamically binarised.

LeCun et al., "Gradient-Based Learning Applied to Document Recognition", 1998,
http://yann.lecun.com/exdb/mnist/. NVAE (like IWAE before it) draws a fresh binary image
``bernoulli(pixel / 255)`` every time an item is loaded, for training **and** validation, and
reports nats on the official test split, so val and test both read the t10k files. Images stay
28 x 28; the model pads them to 32 itself.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from jointgen.data.images.common import (
    ArraySource,
    DictImageDataset,
    ImageDataModule,
    missing_data_error,
)
from jointgen.utils.checks import DataFormatError

FOLDER = Path("MNIST") / "raw"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # 0x0803 / 0x0801: unsigned bytes, 3 or 1 dimensions
SOURCE = "IDX files, plain or .gz, from https://yann.lecun.com/exdb/mnist/"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (plain or ``.gz``) and check its magic number and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # a damaged gzip stream
        raise DataFormatError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4:
        raise DataFormatError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataFormatError(f"{path}: wrong IDX magic number {found}, expected {magic}")
    ndim = magic & 0xFF  # the low byte of the magic number counts the dimensions
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(
            f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header})"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)
    if len(raw) - header < count:
        raise DataFormatError(
            f"{path}: truncated IDX file, dims {dims} need {count} bytes after the header, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


class MNISTDataModule(ImageDataModule):
    """MNIST, 1 x 28 x 28; val and test are the official test split.

    Args:
        data_dir: Folder containing ``MNIST/raw/``.
        batch_size: Images per batch (NVAE: 200 per GPU).
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory.
        download: Fetch the files with torchvision in ``prepare_data`` when missing.
        binarize: Draw ``bernoulli(pixel / 255)`` afresh on every load (all splits); the
            images are then exactly 0 or 1.
        num_bits: Bit depth of the grey levels when ``binarize`` is false (unused otherwise).
    """

    name = "MNIST"
    download_source = SOURCE

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int = 200,
        num_workers: int = 4,
        pin_memory: bool = True,
        download: bool = False,
        binarize: bool = True,
        num_bits: int = 8,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            download=download,
            image_shape=(1, 28, 28),
            num_bits=num_bits,
            binary=binarize,
        )
        self.save_hyperparameters(logger=False)
        self.binarize = binarize
        self._sources: dict[str, ArraySource] = {}

    def _find(self, name: str) -> Path | None:
        for candidate in (name, f"{name}.gz"):
            path = self.data_dir / FOLDER / candidate
            if path.is_file():
                return path
        return None

    def _check_files(self) -> None:
        if any(self._find(n) is None for pair in FILES.values() for n in pair):
            raise missing_data_error(
                self.name,
                self.data_dir,
                f"{FOLDER}/" + ", ".join(n for pair in FILES.values() for n in pair),
                SOURCE,
                downloadable=True,
            )

    def _download(self) -> None:
        from torchvision.datasets import MNIST

        MNIST(str(self.data_dir), train=True, download=True)  # fetches all four files

    def _source(self, files: str) -> ArraySource:
        if files not in self._sources:
            image_path, label_path = (self._find(n) for n in FILES[files])
            images = read_idx(image_path, IMAGE_MAGIC)
            labels = read_idx(label_path, LABEL_MAGIC)
            if images.shape[1:] != (28, 28):
                raise DataFormatError(f"{image_path}: images are {images.shape[1:]}, not 28 x 28")
            if len(images) != len(labels):
                raise DataFormatError(
                    f"{image_path} holds {len(images)} images but {label_path} "
                    f"{len(labels)} labels"
                )
            if labels.size and labels.max() > 9:
                raise DataFormatError(f"{label_path}: label {labels.max()} outside 0..9")
            self._sources[files] = ArraySource([images[:, None]], labels)
        return self._sources[files]

    def _build(self, split: str) -> Dataset:
        return DictImageDataset(
            self._source("train" if split == "train" else "test"),
            num_bits=self.num_bits,
            binarize=self.binarize,
        )
