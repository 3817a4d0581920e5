"""Lightning DataModule of the captioned-shapes dataset (spec §3.7, §3.9 and §4).

Batches are dicts with ``image`` (float32 B×3×H×W in [0, 1]), ``tokens`` (int64 B×L),
``mask_image`` and ``mask_text`` (bool B), ``attrs`` (int64 B×A, for evaluation only) and
``index`` (int64 B, the row in its split). A missing modality's tensor holds zeros (image) or
PAD (tokens); its mask is False. Only the training split has missing modalities.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from jointgen.data.shapes.attributes import MAX_COLOURS, POSITION_GRIDS, AttributeSpace
from jointgen.data.shapes.generate import load_npz, prepare_shapes
from jointgen.data.shapes.grammar import max_caption_words
from jointgen.data.shapes.vocab import PAD, Vocabulary
from jointgen.utils.checks import DataFormatError

log = logging.getLogger(__name__)

_MISSING_STREAM = 200


def missing_masks(num: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks (image, text) that drop one modality from ``round(fraction * num)`` samples.

    Half of the incomplete samples lose their caption (image-only), the other half their image
    (caption-only); no sample loses both.
    """
    mask_image, mask_text = np.ones(num, dtype=bool), np.ones(num, dtype=bool)
    order = np.random.default_rng([seed, _MISSING_STREAM]).permutation(num)
    n_missing = round(fraction * num)
    mask_text[order[: n_missing // 2]] = False
    mask_image[order[n_missing // 2 : n_missing]] = False
    return mask_image, mask_text


class ShapesDataset(Dataset):
    """One split held in memory as tensors.

    Args:
        arrays: a split as written by ``prepare_shapes``.
        mask_image: which samples keep their image; all when ``None``.
        mask_text: which samples keep their caption; all when ``None``.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        mask_image: np.ndarray | None = None,
        mask_text: np.ndarray | None = None,
    ) -> None:
        n = len(arrays["images"])
        self.mask_image = torch.ones(n, dtype=torch.bool)
        self.mask_text = torch.ones(n, dtype=torch.bool)
        if mask_image is not None:
            self.mask_image = torch.as_tensor(mask_image, dtype=torch.bool)
        if mask_text is not None:
            self.mask_text = torch.as_tensor(mask_text, dtype=torch.bool)
        if not bool((self.mask_image | self.mask_text).all()):
            raise ValueError("every sample needs at least one observed modality")
        # uint8 storage keeps 20k 64×64 images at 250 MB; placeholders are written once here
        self.images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2).contiguous()
        self.images[~self.mask_image] = 0
        self.tokens = torch.from_numpy(arrays["tokens"]).clone()
        self.tokens[~self.mask_text] = PAD
        self.attrs = torch.from_numpy(arrays["attrs"])
        self.captions = arrays["captions"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.images[i].float().div_(255.0),
            "tokens": self.tokens[i],
            "mask_image": self.mask_image[i],
            "mask_text": self.mask_text[i],
            "attrs": self.attrs[i],
            "index": torch.tensor(i, dtype=torch.int64),
        }


class ShapesDataModule(pl.LightningDataModule):
    """Generated captioned shapes, cached under ``data_dir`` and served as dict batches.

    Args:
        data_dir: cache folder; file names hash every generation parameter.
        level: 1 shape, 2 +size, 3 +colour, 4 +position, 5 +background, 6 two objects.
        image_size: side of the square RGB images in pixels.
        num_train: training samples.
        num_val: validation samples.
        num_test: test samples (also the size of ``test_heldout``).
        seed: generation seed; the splits, held-out pairs and missing masks derive from it.
        paraphrase_rate: probability of a paraphrased caption (0 = canonical captions only).
        num_colours: colours in use, 2..8.
        position_grid: ``"quadrants"`` or ``"grid3"``.
        heldout_fraction: share of (shape, colour) pairs kept out of train/val/test and put
            in ``test_heldout`` (0 = no held-out split; at most 0.5; needs level >= 3).
        missing_fraction: share of training samples made image-only or caption-only, half each.
        max_caption_len: token length of a caption, EOS and PAD included.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory for faster GPU transfer.
    """

    def __init__(
        self,
        *,
        data_dir: str,
        level: int = 3,
        image_size: int = 32,
        num_train: int = 20000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        paraphrase_rate: float = 0.5,
        num_colours: int = 6,
        position_grid: str = "quadrants",
        heldout_fraction: float = 0.0,
        missing_fraction: float = 0.0,
        max_caption_len: int = 16,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        _validate(self.hparams)
        self.space = AttributeSpace(level, num_colours, position_grid)
        self._vocab = Vocabulary.from_grammar()
        self.datasets: dict[str, ShapesDataset] = {}
        self.paths: dict[str, Path] = {}

    # --- properties -------------------------------------------------------------------------

    @property
    def vocab(self) -> Vocabulary:
        return self._vocab

    @property
    def attr_names(self) -> tuple[str, ...]:
        return self.space.attr_names

    @property
    def attr_cardinalities(self) -> tuple[int, ...]:
        """Number of values of each attribute column (classifier output sizes)."""
        return self.space.cardinalities

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.hparams.image_size, self.hparams.image_size)

    @property
    def num_bits(self) -> int:
        return 8

    # --- Lightning hooks --------------------------------------------------------------------

    def _prepare(self) -> dict[str, Path]:
        keys = (
            "level",
            "image_size",
            "num_train",
            "num_val",
            "num_test",
            "seed",
            "paraphrase_rate",
            "num_colours",
            "position_grid",
            "heldout_fraction",
            "max_caption_len",
        )
        return prepare_shapes(self.hparams.data_dir, **{k: self.hparams[k] for k in keys})

    def prepare_data(self) -> None:
        """Generate and cache every split unless the files already exist (rank 0 only)."""
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load the cached splits; generates them first if ``prepare_data`` was skipped."""
        if self.datasets:
            return
        self.paths = self._prepare()
        self._load_or_regenerate(self.paths["vocab"], self._check_vocab)
        masks = missing_masks(
            self.hparams.num_train, self.hparams.missing_fraction, self.hparams.seed
        )
        for split, path in self.paths.items():
            if split == "vocab":
                continue
            arrays = self._load_or_regenerate(path, self._load_split)
            self.datasets[split] = ShapesDataset(arrays, *(masks if split == "train" else ()))

    def _load_or_regenerate(self, path: Path, load):
        """``load(path)``; a damaged cache file is logged, deleted and generated again (the
        data are a deterministic function of the config, so nothing is lost)."""
        try:
            return load(path)
        except DataFormatError as e:
            log.warning("%s; generating it again", e)
            path.unlink(missing_ok=True)
            self._prepare()
            return load(path)

    def _check_vocab(self, path: Path) -> None:
        if load_vocab(path) != self._vocab:
            raise DataFormatError(f"{path} does not match the grammar's vocabulary")

    def _load_split(self, path: Path) -> dict[str, np.ndarray]:
        """A cached split, checked so that no malformed sample can come out of it."""
        arrays = load_npz(path)
        h, n_attrs = self.hparams, len(self.space.attr_names)
        size, length = h.image_size, h.max_caption_len

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise DataFormatError(f"{path}: {what}")

        for key in ("images", "tokens", "attrs", "captions"):
            need(key in arrays, f"no '{key}' array")
        images, tokens, attrs = arrays["images"], arrays["tokens"], arrays["attrs"]
        n = len(images)
        need(
            images.dtype == np.uint8 and images.shape[1:] == (size, size, 3),
            f"images are {images.dtype} {images.shape}, expected uint8 N x {size} x {size} x 3",
        )
        need(
            tokens.dtype == np.int64 and tokens.shape == (n, length),
            f"tokens are {tokens.dtype} {tokens.shape}, expected int64 {n} x {length}",
        )
        need(
            tokens.size == 0 or 0 <= tokens.min() and tokens.max() < len(self._vocab),
            f"token ids outside 0..{len(self._vocab) - 1}",
        )
        need(
            attrs.dtype.kind == "i" and attrs.shape == (n, n_attrs),
            f"attrs are {attrs.dtype} {attrs.shape}, expected integers {n} x {n_attrs}",
        )
        high = np.asarray(self.space.cardinalities)
        need(attrs.size == 0 or ((attrs >= 0) & (attrs < high)).all(), "attribute out of range")
        need(len(arrays["captions"]) == n, f"{len(arrays['captions'])} captions for {n} images")
        return arrays

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def heldout_dataloader(self) -> DataLoader:
        """Test samples whose (shape, colour) pairs never occur in training."""
        if self.hparams.heldout_fraction == 0:
            raise ValueError("data.heldout_fraction is 0.0, so there is no test_heldout split")
        return self._loader("test_heldout")


def load_vocab(path: Path) -> Vocabulary:
    """:meth:`Vocabulary.load` with a damaged file reported as a :class:`DataFormatError`."""
    try:
        return Vocabulary.load(path)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, missing keys, wrong types
        raise DataFormatError(
            f"{path}: damaged vocabulary file ({type(e).__name__}: {e})"
        ) from None


def _validate(h) -> None:
    """Raise ``ValueError`` naming the first bad ``data.*`` key and its value."""

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"data.{key} must {rule}, got {h[key]!r}")

    check(h.level in range(1, 7), "level", "be in 1..6")
    for key in ("image_size", "num_train", "num_val", "num_test", "batch_size"):
        check(isinstance(h[key], int), key, "be an integer")
        check(h[key] > 0, key, "be positive")
    check(h.batch_size <= h.num_train, "batch_size", f"be at most num_train={h.num_train}")
    check(isinstance(h.seed, int), "seed", "be an integer")
    check(h.seed >= 0, "seed", "be non-negative")
    check(0.0 <= h.paraphrase_rate <= 1.0, "paraphrase_rate", "be in [0, 1]")
    check(h.num_colours in range(2, MAX_COLOURS + 1), "num_colours", f"be in 2..{MAX_COLOURS}")
    check(h.position_grid in POSITION_GRIDS, "position_grid", f"be one of {list(POSITION_GRIDS)}")
    check(0.0 <= h.heldout_fraction <= 0.5, "heldout_fraction", "be in [0, 0.5]")
    check(
        h.heldout_fraction == 0 or h.level >= 3,
        "heldout_fraction",
        f"be 0 below level 3 (colour is not captioned at level {h.level})",
    )
    check(0.0 <= h.missing_fraction <= 1.0, "missing_fraction", "be in [0, 1]")
    needed = max_caption_words(AttributeSpace(h.level, h.num_colours, h.position_grid)) + 1
    check(h.max_caption_len >= needed, "max_caption_len", f"be at least {needed} at this level")
    check(isinstance(h.num_workers, int) and h.num_workers >= 0, "num_workers", "be >= 0")
    check(isinstance(h.pin_memory, bool), "pin_memory", "be a bool")
