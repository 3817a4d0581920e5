"""Items of one Recipe1M split read from the cache, and the collate function that pads them
into the batch contract of :mod:`jointgen.data.recipe1m.datamodule`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from jointgen.data.images.common import IMAGE_ERRORS, convert_image
from jointgen.data.recipe1m.build import image_file
from jointgen.data.recipe1m.cache import SPLITS, Ragged, Recipe1MCache

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_transform(train: bool, image_size: int, resize: int) -> transforms.Compose:
    """SEJE's pixel pipeline (spec §4): random crop + flip in train, centre crop otherwise."""
    steps: list[Any] = [transforms.Resize(resize)]
    if train:
        steps += [
            transforms.CenterCrop(resize),
            transforms.RandomCrop(image_size),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps.append(transforms.CenterCrop(image_size))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


class Recipe1MDataset(Dataset):
    """One split of the cache; items are unpadded, :func:`collate_recipes` pads a batch.

    Args:
        cache: The preprocessed cache.
        indices: Cache rows of this split.
        remap: Internal word id -> contract word id (0 PAD, 1 UNK, row + 2).
        image_dir: Root of the image folders.
        image_partition_folder: Whether images live under ``<image_dir>/<partition>/``.
        train: Random image choice and augmentation.
        caps: ``max_images``, ``max_sentences``, ``max_words``, ``max_ingredients``,
            ``max_title``, ``image_size``, ``resize``.
        num_keyterms: Width of the key-term vector (terms read from the cache when > 0 and
            ``use_keyterms``).
        use_keyterms: Serve the cached key-term weights (else a zero row).
        exclude_images: Image names never served.
    """

    def __init__(
        self,
        cache: Recipe1MCache,
        indices: np.ndarray,
        remap: np.ndarray,
        image_dir: Path,
        image_partition_folder: bool,
        train: bool,
        caps: Mapping[str, int],
        num_keyterms: int,
        use_keyterms: bool,
        exclude_images: frozenset[str] = frozenset(),
    ) -> None:
        self.cache, self.indices, self.remap = cache, indices, remap
        self.image_dir, self.partition_folder = image_dir, image_partition_folder
        self.train, self.caps = train, dict(caps)
        self.transform = image_transform(train, caps["image_size"], caps["resize"])
        self.num_keyterms, self.use_keyterms = num_keyterms, use_keyterms
        self.exclude = exclude_images
        self.kt_ids = Ragged(cache.dir, "keyterms", np.int32) if use_keyterms else None
        self.kt_w = Ragged(cache.dir, "keyterm_weights", np.float32) if use_keyterms else None
        self.missing_images = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _ids(self, values: np.ndarray, cap: int) -> torch.Tensor:
        return torch.from_numpy(self.remap[np.asarray(values[:cap], dtype=np.int64)])

    def _image(self, i: int) -> torch.Tensor:
        names = [n for n in self.cache.image_names(i) if n not in self.exclude]
        names = names[: self.caps["max_images"]]
        part = SPLITS[int(self.cache.partition.array[i])]
        img = None
        if names:
            k = int(torch.randint(len(names), ())) if self.train else 0
            path = image_file(self.image_dir, part, names[k], self.partition_folder)
            try:
                with Image.open(path) as f:
                    img = convert_image(f, "RGB")
            except IMAGE_ERRORS as e:
                self.missing_images += 1
                if self.missing_images & (self.missing_images - 1) == 0:  # 1, 2, 4, 8...
                    log.warning(
                        "%d unreadable image(s) replaced by white; latest %s (%s)",
                        self.missing_images,
                        path,
                        type(e).__name__,
                    )
        if img is None:
            img = Image.new("RGB", (self.caps["resize"],) * 2, (255, 255, 255))
        return self.transform(img)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.indices[k])
        c, cache = self.caps, self.cache
        sents = cache.recipe_sentences(i)[: c["max_sentences"]]
        ingr = cache.ingredients[i][cache.ingredient_valid[i].astype(bool)]
        kt = torch.zeros(self.num_keyterms)
        if self.use_keyterms:
            kt[torch.from_numpy(self.kt_ids[i].astype(np.int64))] = torch.from_numpy(
                np.array(self.kt_w[i])
            )
        return {
            "image": self._image(i),
            "instructions": [self._ids(s, c["max_words"]) for s in sents],
            "ingredients": self._ids(ingr, c["max_ingredients"]),
            "title": self._ids(cache.title[i], c["max_title"]),
            "keyterms": kt,
            "category": int(cache.category.array[i]),
            "id": cache.recipe_id(i),
        }


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out = torch.zeros(len(rows), max([1, *(len(r) for r in rows)]), dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out, lengths


def collate_recipes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of :class:`Recipe1MDataset` items into the batch contract."""
    n_s = max(1, max(len(x["instructions"]) for x in items))
    n_w = max([1, *(len(s) for x in items for s in x["instructions"])])
    instr = torch.zeros(len(items), n_s, n_w, dtype=torch.long)
    lengths = torch.zeros(len(items), n_s, dtype=torch.long)
    for b, x in enumerate(items):
        for j, s in enumerate(x["instructions"]):
            instr[b, j, : len(s)] = s
            lengths[b, j] = len(s)
    ingredients, n_ingr = _pad([x["ingredients"] for x in items])
    title, n_title = _pad([x["title"] for x in items])
    return {
        "image": torch.stack([x["image"] for x in items]),
        "instructions": instr,
        "num_instructions": torch.tensor([len(x["instructions"]) for x in items]),
        "instruction_lengths": lengths,
        "ingredients": ingredients,
        "num_ingredients": n_ingr,
        "title": title,
        "title_length": n_title,
        "keyterms": torch.stack([x["keyterms"] for x in items]),
        "category": torch.tensor([x["category"] for x in items], dtype=torch.long),
        "id": [x["id"] for x in items],
    }
