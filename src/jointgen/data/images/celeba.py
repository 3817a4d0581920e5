"""CelebA at 64 x 64, preprocessed as in NVAE.

Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015,
https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html. Files follow torchvision's layout
(``celeba/img_align_celeba/*.jpg`` and ``celeba/list_eval_partition.txt``) but are read here with
PIL, since ``torchvision.datasets.CelebA`` insists on gdown and md5 checks. NVAE crops the aligned
178 x 218 faces to the box (15, 40, 163, 188), resizes to 64 and flips during training; it reports
results on the **validation** split (19,867 images), so the test loader reads that split too
unless ``eval_split="test"``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from jointgen.data.images.common import (
    DictImageDataset,
    FileSource,
    ImageDataModule,
    convert_image,
    missing_data_error,
    scan_images,
)
from jointgen.utils.checks import DataFormatError

FOLDER = "celeba"
IMAGES = "img_align_celeba"
PARTITION = "list_eval_partition.txt"
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
ALIGNED_SIZE = (178, 218)  # width x height of every img_align_celeba file
CROP_BOX = (15, 40, 163, 188)  # NVAE's CropCelebA64: left, upper, right, lower (148 x 148)
SIZE = 64
SOURCE = (
    "aligned & cropped JPEGs and the partition file from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
)


def load_celeba64(path: str) -> Image.Image:
    """Crop the face box and resize to 64 x 64 (PIL bilinear, antialiased when downsampling)."""
    with Image.open(path) as img:
        if img.size != ALIGNED_SIZE:  # the box only fits aligned faces; PIL would pad black
            raise ValueError(f"{path} is {img.size[0]}x{img.size[1]}, not {ALIGNED_SIZE}")
        rgb = convert_image(img, "RGB")
    return rgb.crop(CROP_BOX).resize((SIZE, SIZE), Image.BILINEAR)


def read_partition(path: Path) -> dict[int, list[str]]:
    """File names per split id from ``list_eval_partition.txt`` (``000001.jpg 0`` per line)."""
    splits: dict[int, list[str]] = {0: [], 1: [], 2: []}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataFormatError(f"{path}:{number}: expected '<file>.jpg <0|1|2>', got {line!r}")
        splits[int(parts[1])].append(parts[0])
    return splits


class CelebA64DataModule(ImageDataModule):
    """CelebA 64 x 64; val is the validation split, test is ``eval_split``; labels are all 0.

    Args:
        data_dir: Folder containing ``celeba/``.
        batch_size: Images per batch (NVAE: 16 per GPU).
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory.
        download: Fetch the files with torchvision (needs the ``gdown`` package and network).
        random_flip: Random horizontal flips of training images.
        num_bits: Bit depth the pixels are floored to (8 keeps them as they are).
        eval_split: Split behind the test loader: ``valid`` (what NVAE reports) or ``test``.
    """

    name = "CelebA"
    download_source = SOURCE

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int = 16,
        num_workers: int = 4,
        pin_memory: bool = True,
        download: bool = False,
        random_flip: bool = True,
        num_bits: int = 8,
        eval_split: str = "valid",
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            download=download,
            image_shape=(3, SIZE, SIZE),
            num_bits=num_bits,
            binary=False,
        )
        if eval_split not in ("valid", "test"):
            raise ValueError(f"data.eval_split must be 'valid' or 'test', got {eval_split!r}")
        self.save_hyperparameters(logger=False)
        self.random_flip = random_flip
        self.eval_split = eval_split
        self._partition: dict[int, list[str]] | None = None

    @property
    def root(self) -> Path:
        return self.data_dir / FOLDER

    def _check_files(self) -> None:
        if not ((self.root / IMAGES).is_dir() and (self.root / PARTITION).is_file()):
            raise missing_data_error(
                self.name,
                self.data_dir,
                f"{FOLDER}/{IMAGES}/*.jpg and {FOLDER}/{PARTITION}",
                SOURCE,
                downloadable=True,
            )

    def _download(self) -> None:
        from torchvision.datasets import CelebA

        # torchvision writes the same celeba/ layout; it needs gdown for the Google Drive files
        CelebA(str(self.data_dir), split="all", target_type=[], download=True)

    def _build(self, split: str) -> Dataset:
        if self._partition is None:
            self._partition = read_partition(self.root / PARTITION)
        name = {"train": "train", "val": "valid", "test": self.eval_split}[split]
        paths = [self.root / IMAGES / f for f in self._partition[SPLIT_IDS[name]]]
        keep = scan_images(paths, f"CelebA {name}", size=ALIGNED_SIZE)
        if not keep:
            raise missing_data_error(
                f"CelebA {name} images",
                self.root / IMAGES,
                f"readable files listed with split {SPLIT_IDS[name]} in {PARTITION}",
                SOURCE,
                downloadable=True,
            )
        source = FileSource([paths[i] for i in keep], [0] * len(keep), load_celeba64)
        return DictImageDataset(
            source, random_flip=split == "train" and self.random_flip, num_bits=self.num_bits
        )
