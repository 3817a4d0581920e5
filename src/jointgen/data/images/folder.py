"""A folder of image files: custom data, CelebA-HQ 256 and FFHQ 256.

Files (jpg, jpeg, png, webp, searched recursively, hidden folders ignored) are resized so the
shorter side equals ``image_size`` and center-cropped, as torchvision's ``Resize`` +
``CenterCrop`` would; NVAE's 256 px runs do the same plus horizontal flips and 5-bit pixels.
If ``data_dir/<train_dir>`` and ``data_dir/<val_dir>`` both exist they are the splits (use this
for the GLOW CelebA-HQ split, 27k/3k); otherwise one sorted file list is split by
``val_fraction``, either shuffled with ``seed`` or, with ``shuffle_split=false``, taking the
last files as validation (FFHQ's reference split: images 63000..69999). The test loader reads
the validation split.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from jointgen.data.images.common import (
    IMAGE_EXTENSIONS,
    DictImageDataset,
    FileSource,
    ImageDataModule,
    check_positive,
    convert_image,
    scan_images,
)


def iter_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` (any depth), skipping hidden files and folders."""
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if (
            path.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in relative.parts)
            and path.is_file()
        ):
            yield path


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` in a machine-independent order (sorted relative paths)."""
    return sorted(iter_images(root), key=lambda p: p.relative_to(root).as_posix())


def load_resized(path: str, size: int, mode: str) -> Image.Image:
    """Open, apply EXIF rotation, convert to ``mode``, resize the shorter side, center-crop."""
    with Image.open(path) as opened:
        # RGBA drops alpha, L is replicated to RGB, RGB goes to luma, 16-bit grey is scaled
        img = convert_image(ImageOps.exif_transpose(opened), mode)
    w, h = img.size
    # torchvision's Resize(int) rounds the long side down
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class ImageFolderDataModule(ImageDataModule):
    """Images from a folder tree, ``channels`` x ``image_size`` x ``image_size``.

    Args:
        data_dir: Root folder of the images.
        batch_size: Images per batch (NVAE 256 px: 4 per GPU).
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory.
        download: Must be false: there is nothing to download for a local folder.
        image_size: Side of the square output images.
        channels: 1 (converted to grey, mode L) or 3 (converted to RGB).
        num_bits: Bit depth the pixels are floored to (NVAE 256 px: 5).
        val_fraction: Share of the files held out for validation when no train/val folders exist.
        shuffle_split: Shuffle the sorted file list with ``seed`` before splitting; if false the
            last files form the validation split.
        seed: Seed of the split shuffle.
        train_dir: Subfolder of ``data_dir`` used as the training split, if it and ``val_dir``
            exist.
        val_dir: Subfolder of ``data_dir`` used as the validation split.
        class_subfolders: Label each image by its first-level subfolder (sorted names) under
            the split root; otherwise every label is 0.
        random_flip: Random horizontal flips of training images.
    """

    name = "image folder"

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        download: bool = False,
        image_size: int = 64,
        channels: int = 3,
        num_bits: int = 8,
        val_fraction: float = 0.1,
        shuffle_split: bool = True,
        seed: int = 0,
        train_dir: str = "train",
        val_dir: str = "val",
        class_subfolders: bool = False,
        random_flip: bool = True,
    ) -> None:
        check_positive("image_size", image_size)
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            download=download,
            image_shape=(channels, image_size, image_size),
            num_bits=num_bits,
            binary=False,
        )
        self.save_hyperparameters(logger=False)
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.val_fraction = val_fraction
        self.shuffle_split = shuffle_split
        self.seed = seed
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.class_subfolders = class_subfolders
        self.random_flip = random_flip
        self._splits: dict[str, tuple[list[Path], list[int]]] | None = None
        self.classes: list[str] = []

    def _roots(self) -> tuple[Path, Path] | None:
        train, val = self.data_dir / self.train_dir, self.data_dir / self.val_dir
        return (train, val) if train.is_dir() and val.is_dir() else None

    def _check_files(self) -> None:
        roots = self._roots() or (self.data_dir,)
        for root in roots:
            if not root.is_dir() or next(iter_images(root), None) is None:
                raise FileNotFoundError(
                    f"no images found in {root}: expected {'/'.join(IMAGE_EXTENSIONS)} files "
                    f"(searched recursively), optionally split into {self.train_dir}/ and "
                    f"{self.val_dir}/ subfolders"
                )

    def _split_files(self) -> dict[str, tuple[Path, list[Path]]]:
        """Split name -> (root, files) before unreadable files are dropped."""
        roots = self._roots()
        if roots is not None:
            return {
                "train": (roots[0], list_images(roots[0])),
                "val": (roots[1], list_images(roots[1])),
            }
        files = list_images(self.data_dir)
        n_val = int(round(len(files) * self.val_fraction))
        if not 0 < n_val < len(files):
            raise ValueError(
                f"data.val_fraction={self.val_fraction} of {len(files)} images in "
                f"{self.data_dir} leaves an empty train or val split"
            )
        order = np.arange(len(files))
        if self.shuffle_split:
            order = np.random.default_rng(self.seed).permutation(len(files))
        val = set(order[len(files) - n_val :].tolist())
        return {
            "train": (self.data_dir, [f for i, f in enumerate(files) if i not in val]),
            "val": (self.data_dir, [f for i, f in enumerate(files) if i in val]),
        }

    def _prepare_splits(self) -> dict[str, tuple[list[Path], list[int]]]:
        # split first, then drop unreadable files, so one damaged file never moves others
        split_files = self._split_files()

        def class_of(root: Path, path: Path) -> str:
            parts = path.relative_to(root).parts
            return parts[0] if len(parts) > 1 else ""

        if self.class_subfolders:
            names = {class_of(r, p) for r, files in split_files.values() for p in files}
            self.classes = sorted(names)
        index = {name: i for i, name in enumerate(self.classes)}
        splits = {}
        for split, (root, files) in split_files.items():
            keep = scan_images(files, f"{self.data_dir} ({split})")
            if not keep:
                raise FileNotFoundError(f"no readable images in the {split} split of {root}")
            paths = [files[i] for i in keep]
            labels = [index.get(class_of(root, p), 0) for p in paths]
            splits[split] = (paths, labels)
        return splits

    def _build(self, split: str) -> Dataset:
        if self._splits is None:
            self._splits = self._prepare_splits()
        paths, labels = self._splits["train" if split == "train" else "val"]
        loader = partial(load_resized, size=self.image_size, mode=self.mode)
        return DictImageDataset(
            FileSource(paths, labels, loader),
            random_flip=split == "train" and self.random_flip,
            num_bits=self.num_bits,
        )
