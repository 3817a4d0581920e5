"""Recipe1M for the joint caption-image VAE: food photos with their titles as captions.

Batch contract (dict; the joint model's, spec joint_vae.md §3.7 and §3.9, without ``attrs``):

| key | type | content |
|---|---|---|
| ``image`` | float (B, 3, S, S) | pixels in [0, 1]; zeros where ``mask_image`` is False |
| ``tokens`` | long (B, L) | caption ids, EOS then PAD; all PAD where ``mask_text`` is False |
| ``mask_image`` / ``mask_text`` | bool (B,) | which modalities the sample has |
| ``index`` | long (B,) | position in the split |

Images: the shorter side resized to S = ``image_size``, then a centre crop to S x S; train
draws one of the first ``max_images`` images of a recipe, val/test take the first. Captions:
the title (``caption=title``) or the title, ``|`` and the valid ingredient phrases
(``title_ingredients``), in the caption vocabulary of :mod:`jointgen.data.recipe1m.captions`,
truncated to ``max_caption_len - 1`` words plus EOS.

Missing modalities are masked, never replaced: a recipe without images (or whose images are
all unreadable or excluded) is caption-only, one with an empty caption is image-only, and one
with neither is dropped at setup. An empty caption whose image turns out unreadable at load
time is served as an EOS-only caption, so every sample keeps one modality.

The cache, word2vec file and preparation steps are those of
:class:`~jointgen.data.recipe1m.datamodule.Recipe1MDataModule` (this class extends it):
``jointgen-preprocess data=recipe1m stage=cache`` and ``jointgen-w2v data=recipe1m``, or
``data.prepare=true``. Key-term features are not needed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from jointgen.data.images.common import IMAGE_ERRORS, convert_image
from jointgen.data.recipe1m.build import image_file
from jointgen.data.recipe1m.cache import SPLITS, Recipe1MCache
from jointgen.data.recipe1m.captions import (
    SEP,
    caption_ids,
    caption_vocabulary,
    check_caption_options,
    embedding_matrix,
    pad_caption,
)
from jointgen.data.recipe1m.datamodule import Recipe1MDataModule
from jointgen.data.shapes.vocab import PAD, Vocabulary
from jointgen.data.word2vec import load_vectors
from jointgen.utils.checks import ConfigError

log = logging.getLogger(__name__)


class JointRecipe1MDataset(Dataset):
    """One split of the cache as joint-model samples (see the module docstring).

    Args:
        cache: The preprocessed cache.
        indices: Cache rows of this split (recipes with neither modality already removed).
        remap: Internal word id -> caption id.
        sep_id: Caption id of the title/ingredients separator (None for ``title``).
        caption: ``title`` or ``title_ingredients``.
        max_len: Caption length L, EOS and PAD included.
        image_dir: Root of the image folders.
        image_partition_folder: Images under ``<image_dir>/<partition>/``.
        train: Draw the image at random among the first ``max_images``.
        image_size: Side S of the square images.
        max_images: Images considered per recipe.
        exclude_images: Image names never served.
    """

    def __init__(
        self,
        cache: Recipe1MCache,
        indices: np.ndarray,
        remap: np.ndarray,
        sep_id: int | None,
        caption: str,
        max_len: int,
        image_dir: Path,
        image_partition_folder: bool,
        train: bool,
        image_size: int,
        max_images: int,
        exclude_images: frozenset[str] = frozenset(),
    ) -> None:
        self.cache, self.indices, self.remap, self.sep_id = cache, indices, remap, sep_id
        self.caption, self.max_len = caption, max_len
        self.image_dir, self.partition_folder = image_dir, image_partition_folder
        self.train, self.max_images, self.exclude = train, max_images, exclude_images
        self.image_size = image_size
        size = image_size
        self.transform = transforms.Compose(
            [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]
        )
        self.unreadable = 0

    def __len__(self) -> int:
        return len(self.indices)

    def caption_tokens(self, k: int) -> torch.Tensor | None:
        """Tokens ``(L,)`` of sample ``k``, or None when its caption is empty."""
        ids = caption_ids(self.cache, int(self.indices[k]), self.remap, self.caption, self.sep_id)
        return pad_caption(ids, self.max_len) if len(ids) else None

    def load_image(self, k: int) -> torch.Tensor | None:
        """Image ``(3, S, S)`` in [0, 1] of sample ``k``, or None when it has none readable."""
        i = int(self.indices[k])
        names = [n for n in self.cache.image_names(i) if n not in self.exclude]
        names = names[: self.max_images]
        if not names:
            return None
        first = int(torch.randint(len(names), ())) if self.train else 0
        part = SPLITS[int(self.cache.partition.array[i])]
        for name in names[first:] + names[:first]:  # the next image when one is unreadable
            path = image_file(self.image_dir, part, name, self.partition_folder)
            try:
                with Image.open(path) as f:
                    return self.transform(convert_image(f, "RGB"))
            except IMAGE_ERRORS as e:
                self.unreadable += 1
                if self.unreadable & (self.unreadable - 1) == 0:  # 1, 2, 4, 8...
                    log.warning("%d unreadable image(s); latest %s (%s)",
                                self.unreadable, path, type(e).__name__)  # fmt: skip
        return None

    def pairs(self, n: int) -> dict[str, torch.Tensor]:
        """``images`` and ``tokens`` of the first ``n`` samples with both modalities."""
        items = []
        for k in range(len(self)):
            item = self[k]
            if bool(item["mask_image"]) and bool(item["mask_text"]):
                items.append(item)
            if len(items) == n:
                break
        if not items:
            raise ValueError("no sample of this split has both an image and a caption")
        return {
            "images": torch.stack([x["image"] for x in items]),
            "tokens": torch.stack([x["tokens"] for x in items]),
        }

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        tokens, image = self.caption_tokens(k), self.load_image(k)
        if tokens is None and image is None:  # keep one modality: an EOS-only caption
            tokens = pad_caption(np.zeros(0, dtype=np.int64), self.max_len)
            has_text = True
        else:
            has_text = tokens is not None
        return {
            "image": image if image is not None else torch.zeros(3, *(self.image_size,) * 2),
            "tokens": tokens if tokens is not None else torch.full((self.max_len,), PAD),
            "mask_image": torch.tensor(image is not None),
            "mask_text": torch.tensor(has_text),
            "index": torch.tensor(k, dtype=torch.int64),
        }


class JointRecipe1MDataModule(Recipe1MDataModule):
    """Recipe1M images with titles (or titles and ingredients) as captions for the joint VAE.

    Exposes ``vocab`` (a :class:`~jointgen.data.shapes.vocab.Vocabulary` with ``encode`` and
    ``decode``), ``image_shape`` and ``num_bits`` for the model checks and the sampling CLI.

    Args:
        data_dir: Folder with layer1.json, layer2.json, det_ingrs.json.
        image_dir: Root of the image folders.
        image_partition_folder: Images under ``<image_dir>/<partition>/`` or not.
        cache_dir: Preprocessed cache (``jointgen-preprocess data=recipe1m stage=cache``).
        vocab: The ``conf/data/vocab.yaml`` node (word2vec file, corpus, training flags).
        preprocess: Arguments of ``preprocess_recipe1m`` (used when ``prepare`` builds it).
        synthetic: Arguments of ``make_recipe1m`` (generate raw files when absent) or None.
        prepare: Run missing steps (cache, word2vec) instead of failing with the command.
        caption: ``title`` or ``title_ingredients``.
        max_caption_len: Caption tokens L, EOS and PAD included.
        caption_vocab_size: Token ids in all (special tokens, words, ``<unused>`` padding);
            must equal ``model.net.text.vocab_size``.
        image_size: Side S of the square images (32 or 64 for the joint model).
        max_images: Train draws one of the first ``max_images`` images (val/test: the first).
        limit: Keep only the first ``limit`` recipes of each split (None = all).
        exclude_images_file: Text file of image names never served, or None.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Page-locked batches (useful on CUDA only).
    """

    def __init__(
        self,
        *,
        data_dir: str,
        image_dir: str,
        image_partition_folder: bool,
        cache_dir: str,
        vocab: Mapping[str, Any],
        preprocess: Mapping[str, Any],
        synthetic: Mapping[str, Any] | None,
        prepare: bool,
        caption: str,
        max_caption_len: int,
        caption_vocab_size: int,
        image_size: int,
        max_images: int,
        limit: int | None,
        exclude_images_file: str | None,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        if max_caption_len < 2:
            raise ConfigError(f"data.max_caption_len must be at least 2, got {max_caption_len}")
        check_caption_options(caption, caption_vocab_size)
        # the SEJE-only arguments of the parent (key terms, instructions) are never served here
        super().__init__(
            data_dir=data_dir, image_dir=image_dir, image_partition_folder=image_partition_folder,
            cache_dir=cache_dir, vocab=vocab, preprocess=preprocess, features={},
            synthetic=synthetic, prepare=prepare, keyterms=False, image_size=image_size,
            resize=image_size, max_images=max_images, max_sentences=1, max_words=1,
            max_ingredients=max_caption_len, max_title=max_caption_len, limit=limit,
            exclude_images_file=exclude_images_file, batch_size=batch_size,
            num_workers=num_workers, pin_memory=pin_memory,
        )  # fmt: skip
        self.caption, self.max_caption_len = caption, max_caption_len
        self.caption_vocab_size = caption_vocab_size
        self._caption_vocab: Vocabulary | None = None
        self._caption_remap: np.ndarray | None = None
        self.datasets: dict[str, JointRecipe1MDataset] = {}

    # --- vocabulary and shapes ------------------------------------------------------------

    def _build_caption_vocab(self) -> None:
        if self._caption_vocab is not None:
            return
        missing = not (self.cache_dir / "meta.json").is_file()
        if self.prepare and (missing or not Path(self.word_vectors_path).is_file()):
            self.prepare_data()
        self._load_vocab()  # word2vec words (a missing file names the command)
        self._caption_vocab, self._caption_remap = caption_vocabulary(
            self.cache, self._words, self.caption, self.caption_vocab_size
        )

    @property
    def vocab(self) -> Vocabulary:
        """The caption vocabulary (built from the cache and word2vec on first use)."""
        self._build_caption_vocab()
        return self._caption_vocab

    def caption_embeddings(self, seed: int) -> torch.Tensor:
        """``(len(vocab), dim)`` word2vec rows of the caption vocabulary (``embedding_matrix``)."""
        words, vectors = load_vectors(self.word_vectors_path)
        return embedding_matrix(self.vocab, words, vectors, seed)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.caps["image_size"], self.caps["image_size"])

    @property
    def num_bits(self) -> int:
        return 8

    # --- datasets and loaders -------------------------------------------------------------

    def dataset(self, split: str) -> JointRecipe1MDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self.datasets:
            self._build_caption_vocab()
            idx = self.cache.split_indices(split)[: self.limit]
            has_image = self.cache.images.lengths()[idx] > 0
            has_text = self.cache.title.lengths()[idx] > 0
            if self.caption == "title_ingredients":
                has_text |= self.cache.ingredients.lengths()[idx] > 0
            dropped = int((~(has_image | has_text)).sum())
            if dropped:
                log.info("%s: %d recipes with neither image nor caption dropped", split, dropped)
            idx = idx[has_image | has_text]
            if len(idx) == 0:
                raise ValueError(f"{self.cache_dir}: the {split} split is empty")
            exclude = frozenset()
            if self.exclude_images_file:
                exclude = frozenset(Path(self.exclude_images_file).read_text().split())
            sep = self.vocab.stoi.get(SEP) if self.caption == "title_ingredients" else None
            self.datasets[split] = JointRecipe1MDataset(
                self.cache, idx, self._caption_remap, sep, self.caption, self.max_caption_len,
                self.image_dir, self.image_partition_folder, split == "train",
                self.caps["image_size"], self.caps["max_images"], exclude,
            )  # fmt: skip
        return self.datasets[split]

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(self.dataset(split)) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
