"""Recipe1M LightningDataModule over the preprocessed cache (SEJE data side, issue 4).

Batch contract (dict; B = batch size; padding to the longest item of the batch):

| key | type | content |
|---|---|---|
| ``image`` | float (B, 3, S, S) | ImageNet mean/std normalised pixels (see below) |
| ``instructions`` | long (B, N_s, N_w) | word ids per instruction sentence (0 = PAD) |
| ``num_instructions`` | long (B,) | sentences per recipe (>= 1) |
| ``instruction_lengths`` | long (B, N_s) | words per sentence (0 for padding sentences) |
| ``ingredients`` | long (B, N_i) | ids of the valid detected ingredient phrases (0 = PAD) |
| ``num_ingredients`` | long (B,) | |
| ``title`` / ``title_length`` | long (B, N_t) / long (B,) | |
| ``keyterms`` | float (B, V_kt) | weighted key-term vector (a zero row when ``keyterms=false``) |
| ``category`` | long (B,) | classes1M class (0 = background/unknown) |
| ``id`` | list[str] | recipe ids |

Images: train Resize(resize), CenterCrop(resize), RandomCrop(S), random horizontal flip;
val/test Resize(resize), CenterCrop(S); S = ``image_size`` (default 224), ``resize`` 256.

Word ids: 0 = PAD, 1 = UNK, id ``i >= 2`` is row ``i - 2`` of
``jointgen.data.word2vec.load_vectors(word_vectors_path)``. The module exposes ``vocab_size``
(rows + 2), ``word_vectors_path``, ``num_keyterms``, ``keyterm_names``, ``keyterm_word_ids`` and
``num_classes``. One image per recipe: uniform among the first ``max_images`` in train, the first
in val/test; a missing or undecodable image becomes a white image (counted and logged at counts
1, 2, 4, 8... per worker). Caps: ``max_sentences``, ``max_words``, ``max_ingredients``,
``max_title``; ``limit`` keeps the first ``limit`` recipes of each split. Splits come from
layer1's ``partition``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from jointgen.data.recipe1m import pipeline
from jointgen.data.recipe1m.cache import SPLITS, UNK, Recipe1MCache
from jointgen.data.recipe1m.dataset import Recipe1MDataset, collate_recipes
from jointgen.data.word2vec import load_vectors, word_index
from jointgen.utils.checks import DataFormatError

log = logging.getLogger(__name__)


class Recipe1MDataModule(pl.LightningDataModule):
    """Recipe1M (real or synthetic) served from the preprocessed cache; see the module docstring.

    Args:
        data_dir: Folder with layer1.json, layer2.json, det_ingrs.json (and classes1M.pkl).
        image_dir: Root of the image folders.
        image_partition_folder: Images under ``<image_dir>/<partition>/`` (SEJE, ACME) or not.
        cache_dir: Preprocessed cache (built by ``jointgen-preprocess``).
        vocab: The ``conf/data/vocab.yaml`` node: ``path`` (vocab.bin), ``txt_path``, ``corpus``,
            ``train`` (word2vec flags).
        preprocess: Arguments of ``preprocess_recipe1m`` (filters, image checks, classes file).
        features: Arguments of ``write_keyterms`` (term rating and vocabulary).
        synthetic: Arguments of ``make_recipe1m``; when set, ``prepare_data`` generates the raw
            files into ``data_dir`` if absent.
        prepare: Let ``prepare_data`` run the missing steps (cache, word2vec, key terms); when
            false a missing piece is an error naming the command that makes it.
        keyterms: Serve key-term vectors (else zero rows).
        image_size: Crop side S.
        resize: Shorter side after resizing, before cropping.
        max_images: Train images are drawn among the first ``max_images``.
        max_sentences: Most instruction sentences per recipe.
        max_words: Most words per sentence.
        max_ingredients: Most ingredient phrases per recipe.
        max_title: Most title words.
        limit: Keep only the first ``limit`` recipes of each split (None = all).
        exclude_images_file: Text file of image names never served (one per line), or None.
        batch_size: Recipes per batch.
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
        features: Mapping[str, Any],
        synthetic: Mapping[str, Any] | None,
        prepare: bool,
        keyterms: bool,
        image_size: int,
        resize: int,
        max_images: int,
        max_sentences: int,
        max_words: int,
        max_ingredients: int,
        max_title: int,
        limit: int | None,
        exclude_images_file: str | None,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        super().__init__()
        for key, value in [
            ("image_size", image_size),
            ("resize", resize),
            ("max_images", max_images),
            ("max_sentences", max_sentences),
            ("max_words", max_words),
            ("max_ingredients", max_ingredients),
            ("max_title", max_title),
            ("batch_size", batch_size),
        ]:
            if value <= 0:
                raise ValueError(f"data.{key} must be positive, got {value}")
        if resize < image_size:
            raise ValueError(f"data.resize={resize} is smaller than data.image_size={image_size}")
        if limit is not None and limit <= 0:
            raise ValueError(f"data.limit must be positive or null, got {limit}")
        self.data_dir, self.image_dir = Path(data_dir), Path(image_dir)
        self.cache_dir = Path(cache_dir)
        self.image_partition_folder = image_partition_folder
        self.vocab_cfg = {k: v for k, v in dict(vocab).items()}
        self.vocab_cfg["train"] = dict(vocab["train"])
        self.preprocess_cfg = dict(preprocess)
        self.features_cfg = dict(features)
        self.synthetic = dict(synthetic) if synthetic else None
        self.prepare, self.use_keyterms = prepare, keyterms
        self.caps = dict(
            image_size=image_size,
            resize=resize,
            max_images=max_images,
            max_sentences=max_sentences,
            max_words=max_words,
            max_ingredients=max_ingredients,
            max_title=max_title,
        )
        self.limit, self.exclude_images_file = limit, exclude_images_file
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.datasets: dict[str, Recipe1MDataset] = {}
        self._cache: Recipe1MCache | None = None
        self._words: list[str] | None = None
        self._remap: np.ndarray | None = None
        self._keyterm_names: list[str] | None = None

    # --- preparation ----------------------------------------------------------------------

    @property
    def word_vectors_path(self) -> str:
        return str(self.vocab_cfg["path"])

    def prepare_data(self) -> None:
        """Run the missing steps when ``prepare`` is set; otherwise check they were run."""
        if self.synthetic is not None:
            pipeline.generate_synthetic(self.data_dir, self.synthetic)
        if not (self.cache_dir / "meta.json").is_file():
            self._need("cache", self.cache_dir / "meta.json", "jointgen-preprocess data=recipe1m")
            pipeline.build_cache(
                self.data_dir,
                self.cache_dir,
                self.image_dir,
                self.image_partition_folder,
                self.preprocess_cfg,
                self.vocab_cfg["corpus"],
            )
        if not Path(self.word_vectors_path).is_file():
            self._need("word vectors", self.word_vectors_path, "jointgen-w2v data=recipe1m")
            pipeline.build_vocab(self.vocab_cfg)
        if self.use_keyterms and not Recipe1MCache(self.cache_dir).has_keyterms():
            self._need(
                "key-term features",
                self.cache_dir / "keyterm_names.txt",
                "jointgen-preprocess data=recipe1m stage=features",
            )
            pipeline.build_features(self.cache_dir, self.features_cfg)

    def _need(self, what: str, path: Any, command: str) -> None:
        if not self.prepare:
            raise FileNotFoundError(
                f"Recipe1M {what} not found: {path} (run `{command}`, or set data.prepare=true)"
            )

    # --- vocabulary and key terms ---------------------------------------------------------

    @property
    def cache(self) -> Recipe1MCache:
        if self._cache is None:
            self._cache = Recipe1MCache(self.cache_dir)
        return self._cache

    def _load_vocab(self) -> None:
        if self._remap is not None:
            return
        if not Path(self.word_vectors_path).is_file():
            self._need("word vectors", self.word_vectors_path, "jointgen-w2v data=recipe1m")
            raise FileNotFoundError(f"word vectors not found: {self.word_vectors_path}")
        self._words, _ = load_vectors(self.word_vectors_path)
        index = word_index(self._words)
        internal = self.cache.words()
        if len(internal) + 2 != self.cache.meta.get("num_words"):  # ids would index past it
            raise DataFormatError(
                f"{self.cache_dir / 'words.txt'}: {len(internal)} words but meta.json says "
                f"{self.cache.meta.get('num_words')} - 2; rebuild the cache"
            )
        self._remap = np.array([0, UNK] + [index.get(w, UNK) for w in internal], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        """Rows of the word vectors + 2 (PAD and UNK)."""
        self._load_vocab()
        return len(self._words) + 2

    @property
    def keyterm_names(self) -> list[str]:
        if self._keyterm_names is None:
            path = self.cache_dir / "keyterm_names.txt"
            if self.use_keyterms or path.is_file():
                self._keyterm_names = path.read_text(encoding="utf-8").split("\n")[:-1]
            else:
                self._keyterm_names = []
        return self._keyterm_names

    @property
    def num_keyterms(self) -> int:
        """V_kt; 1 (a constant zero column) when no key terms exist and features are off."""
        return max(1, len(self.keyterm_names))

    @property
    def keyterm_word_ids(self) -> torch.Tensor:
        """Word id of each key term (UNK when word2vec has no vector for it)."""
        self._load_vocab()
        index = word_index(self._words)
        return torch.tensor([index.get(t, UNK) for t in self.keyterm_names], dtype=torch.long)

    @property
    def num_classes(self) -> int:
        """Category outputs: classes1M classes including background (at least 1)."""
        return max(1, int(self.cache.meta.get("num_classes", 1)))

    # --- datasets and loaders -------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in needed.get(stage or "", SPLITS):
            self.dataset(split)

    def dataset(self, split: str) -> Recipe1MDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self.datasets:
            if self.use_keyterms and not self.cache.has_keyterms():
                self._need(
                    "key-term features",
                    self.cache_dir / "keyterm_names.txt",
                    "jointgen-preprocess data=recipe1m stage=features",
                )
            self._load_vocab()
            idx = self.cache.split_indices(split)[: self.limit]
            if len(idx) == 0:
                raise ValueError(f"{self.cache_dir}: the {split} split is empty")
            exclude = frozenset()
            if self.exclude_images_file:
                exclude = frozenset(Path(self.exclude_images_file).read_text().split())
            self.datasets[split] = Recipe1MDataset(
                self.cache,
                idx,
                self._remap,
                self.image_dir,
                self.image_partition_folder,
                split == "train",
                self.caps,
                self.num_keyterms,
                self.use_keyterms,
                exclude,
            )
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
            collate_fn=collate_recipes,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
