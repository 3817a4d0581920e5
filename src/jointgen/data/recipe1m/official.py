"""Adapter for the official im2recipe LMDBs and SEJE's feature pickles (spec §5.5, §5.6).

For users who already hold ``{train,val,test}_lmdb`` + ``{part}_keys.pkl`` (im2recipe) and the
SEJE pickles. Every pickle, including each LMDB value (a Python-2 protocol-2 dict), is read by
the restricted unpickler: plain containers, numbers, strings and numpy arrays only. The LMDB is
opened lazily in each DataLoader worker (read-only, ``lock=False``, ``readahead=False``,
``meminit=False``) and never pickled; keys are the recipe ids as latin-1 bytes. ``lmdb`` is an
optional dependency (``pip install jointgen[lmdb]``).

Batches (B = batch size; padding to the longest item):

| key | type | content |
|---|---|---|
| ``image`` | float (B, 3, S, S) | as in the cache DataModule |
| ``sentence_vectors`` | float (B, N_s, 1024) | skip-instruction vectors (``intrs``, f_sent) |
| ``num_instructions`` | long (B,) | rows of ``intrs`` (clamped to >= 1; a zero row stands in) |
| ``ingredients`` | long (B, N_i) | ``ingrs`` without padding and end token |
| ``num_ingredients`` | long (B,) | |
| ``f_term`` | float (B, 300) | key-term vector from the term pickle (zeros if absent) |
| ``f_cat`` | float (B, 300) | image-category vector of the chosen image (zeros if absent) |
| ``category`` | long (B,) | ``id2class`` pickle, else the LMDB ``classes`` - 1 |
| ``id`` | list[str] | recipe ids |
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from jointgen.data.images.common import IMAGE_ERRORS, convert_image
from jointgen.data.recipe1m.build import image_file
from jointgen.data.recipe1m.dataset import image_transform
from jointgen.data.recipe1m.pickles import load_feature_pickle, restricted_loads
from jointgen.utils.checks import DataFormatError

FEATURE_DIM = 300


def _require_lmdb():
    if importlib.util.find_spec("lmdb") is None:
        raise ModuleNotFoundError(
            "reading the im2recipe LMDBs needs the optional 'lmdb' package: "
            "pip install lmdb (or pip install jointgen[lmdb])"
        )
    import lmdb

    return lmdb


def _vec(
    table: Mapping | None, key: str, index: int | None = None, source: str = ""
) -> torch.Tensor:
    """Row ``key`` (image ``index`` of it) of a feature table: exactly 300 finite floats."""
    if table is None or key not in table:
        return torch.zeros(FEATURE_DIM)
    try:
        v = table[key]
        if index is not None:
            v = v[min(index, len(v) - 1)] if len(v) else np.zeros(FEATURE_DIM)
        v = np.asarray(v, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError, IndexError, KeyError):
        v = None
    if v is None or v.shape != (FEATURE_DIM,) or not np.isfinite(v).all():
        what = (
            "no array"
            if v is None
            else f"{v.size} values" + ("" if np.isfinite(v).all() else " (non-finite)")
        )
        raise DataFormatError(
            f"{source or 'feature table'}: entry {key!r} has {what}, expected {FEATURE_DIM} floats"
        )
    return torch.from_numpy(v)


def _int_array(x: Any) -> np.ndarray:
    """A 1-D int64 array from a list/array of integers; ``TypeError`` for anything else."""
    a = np.asarray(x).reshape(-1)
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"expected integers, got {a.dtype}")
    return a.astype(np.int64)


class OfficialRecipe1MDataset(Dataset):
    """One partition of the im2recipe LMDB with optional SEJE feature pickles.

    Args:
        lmdb_path: ``<root>/<part>_lmdb``.
        keys: Recipe ids in dataset order (from ``<part>_keys.pkl``).
        image_dir: Root of the image folders.
        partition: train, val or test (image folder and augmentation).
        image_partition_folder: Images under ``<image_dir>/<partition>/``.
        term_vectors: {id: float[300]} (``id2tfidf_vec.pkl``) or None.
        image_class_vectors: {id: [float[300] per image]} (``id2img_101_cls_vec.pkl``) or None.
        classes: {id: int} (``id2class_1005.pkl``) or None.
        image_size: Crop side.
        resize: Shorter side before cropping.
        max_images: Train images are drawn among the first ``max_images``.
        max_sentences: Most instruction vectors kept.
        num_classes: Categories must lie in ``0..num_classes-1`` (unchecked when None).
        sources: File of each table (``term``, ``img_cls``, ``classes``) for error messages.
    """

    def __init__(
        self,
        lmdb_path: str | Path,
        keys: list[str],
        image_dir: str | Path,
        partition: str,
        image_partition_folder: bool,
        term_vectors: Mapping | None,
        image_class_vectors: Mapping | None,
        classes: Mapping | None,
        image_size: int,
        resize: int,
        max_images: int,
        max_sentences: int,
        num_classes: int | None = None,
        sources: Mapping[str, str | None] | None = None,
    ) -> None:
        self.lmdb_path, self.keys = str(lmdb_path), list(keys)
        self.num_classes, self.sources = num_classes, dict(sources or {})
        self.image_dir, self.partition = Path(image_dir), partition
        self.partition_folder = image_partition_folder
        self.term_vectors, self.image_class_vectors = term_vectors, image_class_vectors
        self.classes = classes
        self.train = partition == "train"
        self.transform = image_transform(self.train, image_size, resize)
        self.resize, self.max_images, self.max_sentences = resize, max_images, max_sentences
        self._env = None
        self.missing_images = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None}  # each worker opens its own environment

    def __len__(self) -> int:
        return len(self.keys)

    def _raw(self, key: str) -> bytes:
        if self._env is None:
            lmdb = _require_lmdb()
            self._env = lmdb.open(
                self.lmdb_path,
                readonly=True,
                lock=False,
                readahead=False,
                meminit=False,
                max_readers=1,
            )
        with self._env.begin(write=False) as txn:
            value = txn.get(key.encode("latin1"))
        if value is None:
            raise KeyError(f"{self.lmdb_path}: no record for key {key!r}")
        return value

    def record(self, key: str) -> dict:
        """The decoded LMDB value of ``key`` (a dict with intrs, ingrs, classes, imgs)."""
        source = f"{self.lmdb_path}[{key}]"
        rec = restricted_loads(self._raw(key), source=source)
        if not isinstance(rec, dict):
            raise DataFormatError(f"{source}: record is a {type(rec).__name__}, not a dict")
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in rec.items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        rec = self.record(key)
        source = f"{self.lmdb_path}[{key}]"
        try:
            imgs = list(rec.get("imgs", []))[: self.max_images]
            intrs = np.asarray(rec["intrs"], dtype=np.float32).reshape(-1, 1024)
            ingrs = _int_array(rec.get("ingrs", []))
            lmdb_class = int(_int_array(rec.get("classes", 1))[0])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataFormatError(
                f"{source}: malformed record ({type(e).__name__}: {e})"
            ) from None
        if not np.isfinite(intrs).all():
            raise DataFormatError(f"{source}: 'intrs' holds non-finite values")
        intrs = intrs[: self.max_sentences]
        k = int(torch.randint(len(imgs), ())) if self.train and imgs else 0
        if len(intrs) == 0:  # pack_padded_sequence rejects length 0 (spec §8.8)
            intrs = np.zeros((1, 1024), dtype=np.float32)
        ingrs = ingrs[ingrs > 1]  # drop padding (0) and the end token (1)
        if self.classes is not None and key in self.classes:
            category, source = self.classes[key], self.sources.get("classes") or "classes table"
        else:
            category = lmdb_class - 1
            category = max(0, category)
        high = self.num_classes if self.num_classes is not None else 2**31
        if isinstance(category, bool) or not isinstance(category, (int, np.integer)):
            raise DataFormatError(f"{source}: class of {key!r} is {category!r}, not an integer")
        if not 0 <= category < high:
            raise DataFormatError(f"{source}: class {category} of {key!r} outside 0..{high - 1}")
        return {
            "image": self._image(imgs[k] if imgs else None),
            "sentence_vectors": torch.from_numpy(np.ascontiguousarray(intrs)),
            "ingredients": torch.from_numpy(ingrs),
            "f_term": _vec(self.term_vectors, key, source=self.sources.get("term") or ""),
            "f_cat": _vec(
                self.image_class_vectors, key, k, source=self.sources.get("img_cls") or ""
            ),
            "category": int(category),
            "id": key,
        }

    def _image(self, entry: Mapping | None) -> torch.Tensor:
        img = None
        if entry is not None:
            name = entry.get("id", entry.get(b"id")) if isinstance(entry, Mapping) else entry
            name = name.decode("latin1") if isinstance(name, bytes) else name
            if not isinstance(name, str) or len(name) < 5:  # a malformed entry: no image
                name = "????/invalid"
            path = image_file(self.image_dir, self.partition, name, self.partition_folder)
            try:
                with Image.open(path) as f:
                    img = convert_image(f, "RGB")
            except IMAGE_ERRORS:
                self.missing_images += 1
        if img is None:
            img = Image.new("RGB", (self.resize, self.resize), (255, 255, 255))
        return self.transform(img)


def collate_official(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad :class:`OfficialRecipe1MDataset` items into a batch (see the module docstring)."""
    n_s = max(len(x["sentence_vectors"]) for x in items)
    sv = torch.zeros(len(items), n_s, 1024)
    n_i = max([1, *(len(x["ingredients"]) for x in items)])
    ingr = torch.zeros(len(items), n_i, dtype=torch.long)
    for b, x in enumerate(items):
        sv[b, : len(x["sentence_vectors"])] = x["sentence_vectors"]
        ingr[b, : len(x["ingredients"])] = x["ingredients"]
    return {
        "image": torch.stack([x["image"] for x in items]),
        "sentence_vectors": sv,
        "num_instructions": torch.tensor([len(x["sentence_vectors"]) for x in items]),
        "ingredients": ingr,
        "num_ingredients": torch.tensor([len(x["ingredients"]) for x in items]),
        "f_term": torch.stack([x["f_term"] for x in items]),
        "f_cat": torch.stack([x["f_cat"] for x in items]),
        "category": torch.tensor([x["category"] for x in items], dtype=torch.long),
        "id": [x["id"] for x in items],
    }


def _load_keys(path: Path) -> list[str]:
    keys = load_feature_pickle(path)
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, (str, bytes)) for k in keys):
        raise DataFormatError(f"{path}: expected a list of recipe ids (strings)")
    return [k.decode("latin1") if isinstance(k, bytes) else k for k in keys]


class OfficialRecipe1MDataModule(pl.LightningDataModule):
    """im2recipe LMDBs + SEJE pickles (``conf/data/recipe1m_official.yaml``).

    Args:
        lmdb_dir: Folder with ``{part}_lmdb`` and ``{part}_keys.pkl``.
        image_dir: Root of the image folders.
        image_partition_folder: Images under ``<image_dir>/<partition>/``.
        term_vectors_file: SEJE ``id2tfidf_vec.pkl`` or None.
        image_class_vectors_file: SEJE ``id2img_101_cls_vec.pkl`` or None.
        classes_file: SEJE ``id2class_1005.pkl`` or None (then the LMDB ``classes`` - 1).
        num_classes: Category outputs (1005 for SEJE's pickle, 1048 for classes1M).
        image_size, resize, max_images, max_sentences: As in the cache DataModule.
        limit: Keep the first ``limit`` keys of each split (None = all).
        batch_size, num_workers, pin_memory: DataLoader settings.
    """

    def __init__(
        self,
        *,
        lmdb_dir: str,
        image_dir: str,
        image_partition_folder: bool,
        term_vectors_file: str | None,
        image_class_vectors_file: str | None,
        classes_file: str | None,
        num_classes: int,
        image_size: int,
        resize: int,
        max_images: int,
        max_sentences: int,
        limit: int | None,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        super().__init__()
        self.lmdb_dir, self.image_dir = Path(lmdb_dir), Path(image_dir)
        self.files = {
            "term": term_vectors_file,
            "img_cls": image_class_vectors_file,
            "classes": classes_file,
        }
        self.num_classes = num_classes
        self.kw = dict(
            image_partition_folder=image_partition_folder,
            image_size=image_size,
            resize=resize,
            max_images=max_images,
            max_sentences=max_sentences,
        )
        self.limit, self.batch_size = limit, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.datasets: dict[str, OfficialRecipe1MDataset] = {}
        self._tables: dict[str, Mapping | None] | None = None

    def _paths(self, split: str) -> tuple[Path, Path]:
        return self.lmdb_dir / f"{split}_lmdb", self.lmdb_dir / f"{split}_keys.pkl"

    def prepare_data(self) -> None:
        for split in ("train", "val", "test"):
            for p in self._paths(split):
                if not p.exists():
                    raise FileNotFoundError(f"im2recipe LMDB data not found: {p}")
        for f in self.files.values():
            if f and not Path(f).is_file():
                raise FileNotFoundError(f"SEJE feature pickle not found: {f}")
        _require_lmdb()

    def tables(self) -> dict[str, Mapping | None]:
        if self._tables is None:
            self._tables = {
                k: load_feature_pickle(f) if f else None for k, f in self.files.items()
            }
            for k, table in self._tables.items():
                if table is not None and not isinstance(table, dict):
                    raise DataFormatError(
                        f"{self.files[k]}: expected a dict {{recipe id: value}}, "
                        f"found {type(table).__name__}"
                    )
        return self._tables

    def dataset(self, split: str) -> OfficialRecipe1MDataset:
        if split not in self.datasets:
            path, keys_file = self._paths(split)
            t = self.tables()
            self.datasets[split] = OfficialRecipe1MDataset(
                path,
                _load_keys(keys_file)[: self.limit],
                self.image_dir,
                split,
                term_vectors=t["term"],
                image_class_vectors=t["img_cls"],
                classes=t["classes"],
                num_classes=self.num_classes,
                sources=self.files,
                **self.kw,
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in needed.get(stage or "", ("train", "val", "test")):
            self.dataset(split)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=split == "train",
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_official,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
