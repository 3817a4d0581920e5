"""On-disk layout of the preprocessed Recipe1M cache: flat arrays plus offsets.

Every variable-length field (title tokens, instruction tokens, ingredient ids, image names...) is
stored as ``<name>.bin`` (all values back to back) and ``<name>.offsets.bin`` (int64, N + 1
entries), so item ``i`` is ``values[offsets[i]:offsets[i + 1]]``. Readers memory-map the files on
first access, which keeps them cheap to pickle into DataLoader workers: each worker maps the
files itself and the pages are shared through the OS cache.

Files (``N`` kept recipes, ``S`` instruction sentences):

| file | dtype | per | content |
|---|---|---|---|
| ``meta.json`` | | | counts, parameters and the preprocessing report |
| ``words.txt`` | | | line ``k`` is internal word id ``k + 2`` (0 = PAD, 1 = UNK) |
| ``recipe_ids`` | uint8 | recipe | the id as ASCII |
| ``partition.bin`` | uint8 | recipe | 0 train, 1 val, 2 test |
| ``category.bin`` | int32 | recipe | classes1M class (0 = background or unknown) |
| ``title`` | int32 | recipe | word ids |
| ``sentences`` | int32 | sentence | word ids of one instruction |
| ``instructions`` | (offsets only) | recipe | range of the recipe's sentences |
| ``ingredients`` / ``ingredient_valid`` | int32 / uint8 | recipe | detected phrase ids / flags |
| ``images`` | uint8 | recipe | image file names joined by newlines |
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from jointgen.utils.checks import DataFormatError

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
PAD, UNK = 0, 1
_FLUSH = 1 << 20  # values buffered before a write


class RaggedWriter:
    """Appends variable-length rows to ``<name>.bin`` and their offsets to ``<name>.offsets.bin``.

    Args:
        directory: Cache folder.
        name: Field name.
        typecode: ``array`` type code of the values (``"i"`` int32, ``"B"`` uint8, ``"f"``
            float32); ``None`` stores offsets only (the values live in another field).
    """

    def __init__(self, directory: Path, name: str, typecode: str | None) -> None:
        self.typecode = typecode
        self.values = open(directory / f"{name}.bin", "wb") if typecode else None
        self.offsets = open(directory / f"{name}.offsets.bin", "wb")
        self._vbuf = array(typecode) if typecode else None
        self._obuf = array("q", [0])
        self.total = 0
        self.rows = 0

    def append(self, values: Any = (), length: int | None = None) -> None:
        """Add one row: ``values`` (a sequence or bytes) or, offsets only, its ``length``."""
        if self._vbuf is not None:
            if isinstance(values, bytes):
                self._vbuf.frombytes(values)
            else:
                self._vbuf.extend(values)
            length = len(values)
        self.total += length
        self.rows += 1
        self._obuf.append(self.total)
        if len(self._obuf) > _FLUSH or (self._vbuf is not None and len(self._vbuf) > _FLUSH):
            self.flush()

    def append_rows(self, rows: list[list[int]]) -> None:
        """Add several rows at once (one call per recipe for its sentences)."""
        for r in rows:
            self._vbuf.extend(r)
            self.total += len(r)
            self._obuf.append(self.total)
        self.rows += len(rows)
        if len(self._obuf) > _FLUSH or len(self._vbuf) > _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self._vbuf is not None:
            self._vbuf.tofile(self.values)
            del self._vbuf[:]
        self._obuf.tofile(self.offsets)
        del self._obuf[:]

    def close(self) -> None:
        self.flush()
        if self.values:
            self.values.close()
        self.offsets.close()


def _map(path: Path, dtype: Any) -> np.ndarray:
    """Read-only memory map; an empty file maps to an empty array (mmap refuses size 0)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Ragged:
    """Lazily memory-mapped reader of a field written by :class:`RaggedWriter`."""

    def __init__(self, directory: Path, name: str, dtype: Any = None) -> None:
        self.directory, self.name, self.dtype = Path(directory), name, dtype
        self._values: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # maps are re-opened in each worker process instead of being pickled
        return {**self.__dict__, "_values": None, "_offsets": None}

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = _map(self.directory / f"{self.name}.offsets.bin", np.int64)
        return self._offsets

    @property
    def values(self) -> np.ndarray:
        if self._values is None:
            self._values = _map(self.directory / f"{self.name}.bin", self.dtype)
        return self._values

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        o = self.offsets
        return self.values[o[i] : o[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class Flat:
    """Lazily memory-mapped fixed-size array (one value per recipe)."""

    def __init__(self, path: Path, dtype: Any) -> None:
        self.path, self.dtype = Path(path), dtype
        self._a: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_a": None}

    @property
    def array(self) -> np.ndarray:
        if self._a is None:
            self._a = _map(self.path, self.dtype)
        return self._a


class Recipe1MCache:
    """Read access to a preprocessed cache folder (see the module docstring for the files)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        meta = self.dir / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(
                f"Recipe1M cache not found: {meta} is missing (run `jointgen-preprocess "
                "data=recipe1m` to build it)"
            )
        try:
            self.meta = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(self.meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataFormatError(
                f"{meta}: unreadable ({e}); rebuild the cache with `jointgen-preprocess "
                "data=recipe1m overwrite=true`"
            ) from None
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{meta}: cache version {self.meta.get('version')} != {CACHE_VERSION}; "
                "rebuild it with `jointgen-preprocess data=recipe1m overwrite=true`"
            )
        self.recipe_ids = Ragged(self.dir, "recipe_ids", np.uint8)
        self.partition = Flat(self.dir / "partition.bin", np.uint8)
        self.category = Flat(self.dir / "category.bin", np.int32)
        self.title = Ragged(self.dir, "title", np.int32)
        self.sentences = Ragged(self.dir, "sentences", np.int32)
        self.instructions = Ragged(self.dir, "instructions")
        self.ingredients = Ragged(self.dir, "ingredients", np.int32)
        self.ingredient_valid = Ragged(self.dir, "ingredient_valid", np.uint8)
        self.images = Ragged(self.dir, "images", np.uint8)

    def __len__(self) -> int:
        return int(self.meta["num_recipes"])

    def words(self) -> list[str]:
        """Internal vocabulary: entry ``k`` is word id ``k + 2``."""
        return (self.dir / "words.txt").read_text(encoding="utf-8").split("\n")[:-1]

    def recipe_id(self, i: int) -> str:
        return self.recipe_ids[i].tobytes().decode("ascii")

    def image_names(self, i: int) -> list[str]:
        raw = self.images[i].tobytes().decode("utf-8")
        return raw.split("\n") if raw else []

    def recipe_sentences(self, i: int) -> list[np.ndarray]:
        lo, hi = self.instructions.offsets[i], self.instructions.offsets[i + 1]
        return [self.sentences[s] for s in range(lo, hi)]

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.partition.array == SPLITS.index(split))

    def has_keyterms(self) -> bool:
        return (self.dir / "keyterm_names.txt").is_file() and "keyterms" in self.meta
