"""Shared pieces of the image DataModules.

Every module yields ``{"image": float32 B x C x H x W in [0, 1], "label": int64 B}``. The pixel
pipeline (horizontal flip, bit reduction or dynamic binarisation) lives here so that every
dataset quantises identically; the dataset files only say where the uint8 pixels come from.

Contents: argument checks and error messages, a restricted unpickler for the CIFAR-10 and
ImageNet32 pickles, pixel helpers, two pixel sources (in-memory arrays, image files), the
dict-batch dataset wrapper and the base DataModule with the three loaders.
"""

from __future__ import annotations

import bisect
import logging
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from jointgen.utils.checks import DataFormatError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# what PIL raises for missing, unreadable, truncated or absurdly large files
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# --- argument checks and error messages -------------------------------------------------------


def check_positive(key: str, value: float) -> None:
    """Raise ``ValueError`` naming ``data.<key>`` unless ``value`` is positive."""
    if value <= 0:
        raise ValueError(f"data.{key} must be positive, got {value}")


def check_num_bits(num_bits: int) -> None:
    """Raise ``ValueError`` unless ``num_bits`` is a bit depth in 1..8."""
    if not 1 <= num_bits <= 8:
        raise ValueError(f"data.num_bits must be in 1..8, got {num_bits}")


def missing_data_error(
    name: str, directory: Path, expected: str, source: str, downloadable: bool
) -> FileNotFoundError:
    """One-line error naming the directory, the expected files and how to get them."""
    hint = ", or set data.download=true" if downloadable else ""
    return FileNotFoundError(
        f"{name} not found in {directory}: expected {expected} ({source}){hint}"
    )


def pick_key(record: Mapping[Any, Any], key: str, source: Path) -> Any:
    """Read ``key`` from an unpickled dict whose keys may be ``str`` or Python-2 ``bytes``."""
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{source}: expected a dict, found {type(record).__name__}")
    for candidate in (key, key.encode()):
        if candidate in record:
            return record[candidate]
    found = sorted(map(str, record))[:8]
    raise DataFormatError(f"{source}: no '{key}' entry (found keys {found})")


def uint8_rows(data: Any, source: Path, row_size: int) -> np.ndarray:
    """``data`` as a uint8 N x ``row_size`` array; anything else is refused, never cast
    (float pixels in [0, 1] cast to uint8 would silently become black images)."""
    try:
        data = np.asarray(data)
    except ValueError as e:  # ragged nested lists
        raise DataFormatError(f"{source}: 'data' is not an array ({e})") from None
    if data.dtype != np.uint8:
        raise DataFormatError(f"{source}: 'data' must hold uint8 pixels, found {data.dtype}")
    if data.ndim != 2 or data.shape[1] != row_size:
        raise DataFormatError(f"{source}: expected data of shape N x {row_size}, got {data.shape}")
    return data


def int_labels(labels: Any, source: Path, low: int, high: int, count: int) -> np.ndarray:
    """``count`` integer labels in ``low..high`` as int64, or a :class:`DataFormatError`."""
    try:
        labels = np.asarray(labels)
    except ValueError as e:
        raise DataFormatError(f"{source}: 'labels' is not an array ({e})") from None
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise DataFormatError(
            f"{source}: 'labels' must be a list of integers, found {labels.dtype} "
            f"of shape {labels.shape}"
        )
    if len(labels) != count:
        raise DataFormatError(f"{source}: {count} images but {len(labels)} labels")
    if labels.size and (labels.min() < low or labels.max() > high):
        bad = labels[(labels < low) | (labels > high)][0]
        raise DataFormatError(f"{source}: label {bad} outside {low}..{high}")
    return labels.astype(np.int64)


# --- restricted unpickling ---------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` limited to latin1, which protocol-2 pickles use to store ``bytes``."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing codec {encoding!r} in a dataset pickle")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    try:  # numpy >= 2 moved numpy.core to numpy._core; files written by either name both load
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        # protocol-5 pickles rebuild arrays from an in-band buffer with this function
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits plain containers, numbers, strings, bytes and numpy arrays only.

    The dataset pickles need nothing more, and refusing every other global means a tampered
    file cannot run code (a ``__reduce__`` that calls ``os.system`` is rejected before it runs).

    Args:
        file: Binary file object to read from.
        source: Path shown in error messages.
        encoding: How Python-2 ``str`` objects are decoded (``"bytes"`` keeps them as bytes).
    """

    def __init__(self, file: Any, *, source: str | Path, encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = str(source)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        target = self._allowed.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load global '{module}.{name}' "
                "(dataset pickles may only contain plain containers and numpy arrays)"
            )
        return target


class PickleFormatError(DataFormatError, pickle.UnpicklingError):
    """A truncated or damaged pickle, or one that refers to a forbidden global (names the file)."""


def pickle_error(source: str | Path, err: BaseException) -> PickleFormatError:
    """One-line :class:`PickleFormatError` naming ``source`` for any unpickling failure."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, pickle.UnpicklingError) and msg.startswith(str(source)):
        return PickleFormatError(msg)  # a refused global: the message already names the file
    return PickleFormatError(f"{source}: not a readable pickle ({type(err).__name__}: {msg})")


def restricted_load(path: Path, encoding: str = "bytes") -> Any:
    """Load one pickle file through :class:`RestrictedUnpickler`.

    Raises:
        PickleFormatError: the file is damaged or refers to a forbidden global.
    """
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=path, encoding=encoding).load()
        # a damaged pickle can fail in many ways (EOFError, KeyError, TypeError, ...); no
        # foreign code runs in here, so every failure is a property of the file
        except Exception as e:  # noqa: BLE001
            raise pickle_error(path, e) from None


# --- pixels ------------------------------------------------------------------------------------


def reduce_bits(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Floor uint8 pixels to ``num_bits`` and rescale to [0, 1] (max value 2^bits - 1)."""
    return (x >> (8 - num_bits)).to(torch.float32) / (2**num_bits - 1)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """A fresh Bernoulli draw with p = pixel / 255 (dynamic binarisation)."""
    return torch.bernoulli(x.to(torch.float32) / 255.0)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image (mode L or RGB) to a uint8 C x H x W tensor."""
    if img.mode not in ("L", "RGB"):  # a silent uint8 cast of other modes would be wrong
        raise ValueError(f"expected an L or RGB image, got mode {img.mode}")
    array = np.array(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` (L or RGB) without PIL's silent pitfalls.

    PIL converts 16-bit grey (PNG ``I;16``, or ``I``) to L or RGB by clipping at 255, which
    turns most pixels white: it is scaled to 8 bits here instead. Palette transparency goes
    through RGBA; alpha is then dropped, as torchvision's loader does; grey is replicated to
    RGB. Floating-point images (mode F) have no 0..255 range and are refused (a ``ValueError``,
    which the loaders count as an unreadable image).
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("floating-point image (mode F) has no 0..255 range")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert(mode)  # always a loaded copy: the caller may close the file


def scan_images(
    paths: Sequence[Path], name: str, size: tuple[int, int] | None = None
) -> list[int]:
    """Indices of the files whose header PIL can read; logs one summary line for the rest.

    Only the header is parsed here (cheap); a file that is damaged further in is caught at
    load time by :class:`FileSource`. With ``size`` (width, height), images of any other size
    are skipped too and summarised on their own line.
    """
    keep, bad, odd = [], [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                if size is not None and img.size != tuple(size):
                    odd.append(f"{path} {img.size[0]}x{img.size[1]}")
                else:
                    keep.append(i)
        except IMAGE_ERRORS:
            bad.append(str(path))
    for what, items in (("unreadable images", bad), (f"images not {size}", odd)):
        if items:
            shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
            log.warning("%s: skipped %d of %d %s (%s)", name, len(items), len(paths), what, shown)
    return keep


# --- pixel sources and the dict-batch wrapper --------------------------------------------------


class ArraySource:
    """uint8 N x C x H x W arrays held in memory, possibly in several chunks.

    Chunks avoid concatenating (and so doubling the memory of) ImageNet32's ten train batches.

    Args:
        chunks: uint8 arrays of shape N_i x C x H x W.
        labels: int labels, one per image across all chunks.
    """

    def __init__(self, chunks: Sequence[np.ndarray], labels: np.ndarray) -> None:
        self.chunks = list(chunks)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ends = np.cumsum([len(c) for c in self.chunks]).tolist()
        if not self.ends or self.ends[-1] != len(self.labels):
            raise ValueError(
                f"{self.ends[-1] if self.ends else 0} images but {len(labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        c = bisect.bisect_right(self.ends, index)
        start = self.ends[c - 1] if c else 0
        # copy: arrays parsed from bytes are read-only, which torch.from_numpy warns about
        return torch.from_numpy(self.chunks[c][index - start].copy()), int(self.labels[index])


class FileSource:
    """Images decoded from files on every access by ``loader`` (path -> PIL image).

    A file that fails to decode is replaced by the next readable one (with a warning the first
    time, naming the file and how many have failed so far in this process) so a single damaged
    image never stops a long run; the pair stays consistent (the replacement's own label).

    Args:
        paths: Image files.
        labels: int labels, one per file.
        loader: Picklable callable returning the preprocessed PIL image (mode L or RGB).
    """

    max_attempts = 64

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], loader: Callable[[str], Image.Image]
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.loader = loader
        self._failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.paths)
        for offset in range(min(n, self.max_attempts)):
            i = (index + offset) % n
            try:
                return pil_to_uint8(self.loader(self.paths[i])), int(self.labels[i])
            except IMAGE_ERRORS as err:
                if self.paths[i] not in self._failed:
                    self._failed.add(self.paths[i])
                    log.warning(
                        "skipping undecodable image %s (%s); %d skipped so far",
                        self.paths[i],
                        err,
                        len(self._failed),
                    )
        raise DataFormatError(
            f"{min(n, self.max_attempts)} images in a row failed to decode, "
            f"from {self.paths[index]}"
        )


class DictImageDataset(Dataset):
    """Wraps a pixel source into ``{"image", "label"}`` items.

    Args:
        source: Indexable returning ``(uint8 C x H x W tensor, label)``.
        random_flip: Flip horizontally with probability 1/2 (training augmentation).
        num_bits: Bit depth the pixels are floored to before scaling to [0, 1].
        binarize: Return a fresh Bernoulli(pixel / 255) draw instead (values exactly 0 or 1).
    """

    def __init__(
        self, source: Any, *, random_flip: bool = False, num_bits: int = 8, binarize: bool = False
    ) -> None:
        check_num_bits(num_bits)
        self.source = source
        self.random_flip = random_flip
        self.num_bits = num_bits
        self.binarize = binarize

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x, label = self.source[index]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        image = binarize(x) if self.binarize else reduce_bits(x, self.num_bits)
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64)}


# --- base DataModule -----------------------------------------------------------------------------


class ImageDataModule(LightningDataModule, ABC):
    """Loaders and checks shared by the image DataModules.

    Subclasses implement ``_check_files`` (raise ``FileNotFoundError``), ``_build(split)`` for
    ``split`` in train/val/test and, where a public source exists, ``_download``.

    Args:
        data_dir: Folder holding the dataset files.
        batch_size: Images per batch (per device under DDP).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies.
        download: Fetch missing files in ``prepare_data`` (only where a public source exists).
        image_shape: C, H, W of the yielded images.
        num_bits: Bit depth of the yielded pixel values.
        binary: Whether images are 0/1 draws.
    """

    name = "images"
    download_source: str | None = None  # set by subclasses whose files can be fetched

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        download: bool,
        image_shape: tuple[int, int, int],
        num_bits: int,
        binary: bool,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_num_bits(num_bits)
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if download and self.download_source is None:
            raise ValueError(
                f"data.download=true is not supported for {self.name}: "
                "place the files in data.data_dir yourself"
            )
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.download = download
        self._image_shape = image_shape
        self._num_bits = num_bits
        self._binary = binary
        self._datasets: dict[str, Dataset] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C, H, W of the images in a batch."""
        return self._image_shape

    @property
    def num_bits(self) -> int:
        """Bit depth of the pixel values (8, or 5 for the 256 px runs)."""
        return self._num_bits

    @property
    def binary(self) -> bool:
        """Whether the images are 0/1 draws (Bernoulli likelihood)."""
        return self._binary

    @abstractmethod
    def _check_files(self) -> None:
        """Raise ``FileNotFoundError`` (see :func:`missing_data_error`) if files are absent."""

    @abstractmethod
    def _build(self, split: str) -> Dataset:
        """Build the train, val or test dataset."""

    def _download(self) -> None:
        """Fetch the files into ``data_dir``; overridden where ``download_source`` is set."""
        raise NotImplementedError(f"{self.name} has no download")

    def prepare_data(self) -> None:
        """Download when asked (rank 0 only), then fail early if files are missing."""
        if self.download:
            self._download()
        self._check_files()

    def setup(self, stage: str | None = None) -> None:
        """Check the files and build the datasets the stage needs."""
        self._check_files()
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in needed.get(stage or "", ("train", "val", "test")):
            self.dataset(split)

    def dataset(self, split: str) -> Dataset:
        """The dataset for ``split`` (train, val or test), built on first use."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = self._build(split)
        return self._datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,  # equal-sized training batches keep per-step statistics comparable
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
