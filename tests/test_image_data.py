"""Image DataModules on tiny files written in the real on-disk formats (no network)."""

from __future__ import annotations

import gzip
import inspect
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

from jointgen.data.images import (
    CelebA64DataModule,
    CIFAR10DataModule,
    ImageFolderDataModule,
    ImageNet32DataModule,
    MNISTDataModule,
    RestrictedUnpickler,
)
from jointgen.data.images.common import reduce_bits

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
LOADER_ARGS = {"batch_size": 2, "num_workers": 0, "pin_memory": False}


def check_batch(batch: dict, shape: tuple[int, int, int], batch_size: int = 2) -> None:
    assert set(batch) == {"image", "label"}
    assert batch["image"].dtype == torch.float32
    assert tuple(batch["image"].shape) == (batch_size, *shape)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (batch_size,)


# --- writers for the on-disk formats -----------------------------------------------------------


def write_cifar(root: Path, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR python pickles; returns the HWC images written to each file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        hwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        record = {
            b"batch_label": name.encode(),
            b"data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072),  # channel-major rows
            b"labels": [int(x) for x in rng.integers(0, 10, n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(record, f, protocol=2 if k % 2 else 5)  # both numpy pickle paths
        written[name] = hwc
    return written


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, fill: int | None = None, n: int = 4) -> np.ndarray:
    """Train files plain, t10k files gzipped; returns the images."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    if fill is not None:
        images[:] = fill
    labels = np.arange(n, dtype=np.uint8) % 10
    for prefix, opener, suffix in (("train", open, ""), ("t10k", gzip.open, ".gz")):
        with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
            f.write(idx_bytes(images, 2051))
        with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
            f.write(idx_bytes(labels, 2049))
    return images


CELEBA_SPLITS = {"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 0, "000004.jpg": 1}
CELEBA_SPLITS |= {"000005.jpg": 1, "000006.jpg": 2}
INSIDE = {0: (0, 255, 0), 1: (0, 0, 255), 2: (255, 255, 0)}  # face-box colour per split


def write_celeba(root: Path) -> None:
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for name, split in CELEBA_SPLITS.items():
        array = np.zeros((218, 178, 3), dtype=np.uint8)
        array[:] = (255, 0, 0)  # red outside the crop box
        array[40:188, 15:163] = INSIDE[split]
        Image.fromarray(array).save(folder / name, quality=100, subsampling=0)
    lines = [f"{name} {split}" for name, split in CELEBA_SPLITS.items()]
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def imagenet_batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {"data": data, "labels": list(range(1, n + 1)), "mean": data.mean(0)}


def write_imagenet32(root: Path) -> dict[str, dict]:
    """Odd train batches as pickles, even ones as npz; val as a pickle."""
    (root / "Imagenet32_train").mkdir(parents=True)
    (root / "Imagenet32_val").mkdir()
    batches = {}
    for i in range(1, 11):
        batch = imagenet_batch(2, seed=i)
        path = root / "Imagenet32_train" / f"train_data_batch_{i}"
        if i % 2:
            path.write_bytes(pickle.dumps(batch))
        else:
            np.savez(path.with_suffix(".npz"), **batch)
        batches[f"train_{i}"] = batch
    batches["val"] = imagenet_batch(3, seed=99)
    (root / "Imagenet32_val" / "val_data").write_bytes(pickle.dumps(batches["val"]))
    return batches


def solid(size: tuple[int, int], colour, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def write_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    solid((20, 30), (255, 0, 0)).save(root / "a.png")
    solid((30, 20), (0, 255, 0)).save(root / "b.jpg")
    solid((24, 24), (0, 0, 255, 128), "RGBA").save(root / "c.png")
    solid((24, 24), 200, "L").save(root / "sub" / "d.jpeg")
    solid((24, 24), (10, 20, 30)).save(root / "sub" / "e.webp")
    solid((24, 24), (1, 2, 3)).save(root / ".hidden" / "f.png")
    (root / "corrupt.png").write_bytes(b"this is not an image")
    (root / "notes.txt").write_text("ignored")


# --- CIFAR-10 -----------------------------------------------------------------------------------


class TestCIFAR10:
    def test_batches_and_exact_pixels(self, tmp_path):
        written = write_cifar(tmp_path)
        dm = CIFAR10DataModule(data_dir=str(tmp_path), random_flip=False, **LOADER_ARGS)
        dm.prepare_data()
        dm.setup("fit")
        check_batch(next(iter(dm.train_dataloader())), (3, 32, 32))
        assert len(dm.dataset("train")) == 20 and len(dm.dataset("val")) == 4
        item = dm.dataset("val")[1]  # val = official test split
        hwc = written["test_batch"][1]
        assert torch.equal(
            (item["image"] * 255).round().to(torch.uint8), torch.from_numpy(hwc).permute(2, 0, 1)
        )
        assert item["image"][2, 5, 7] * 255 == pytest.approx(
            float(hwc[5, 7, 2])
        )  # blue at y=5, x=7
        last = dm.dataset("train")[19]["image"]  # last image of data_batch_5
        assert torch.allclose(
            last, torch.from_numpy(written["data_batch_5"][3]).permute(2, 0, 1) / 255
        )

    def test_loaders_shuffle_and_drop_last(self, tmp_path):
        write_cifar(tmp_path, n=3)
        dm = CIFAR10DataModule(data_dir=str(tmp_path), **{**LOADER_ARGS, "batch_size": 4})
        train, val = dm.train_dataloader(), dm.val_dataloader()
        assert isinstance(train.sampler, RandomSampler) and train.drop_last
        assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
        assert len(train) == 15 // 4 and len(val) == 1
        assert dm.image_shape == (3, 32, 32) and dm.num_bits == 8 and not dm.binary

    def test_flip_applies_to_train_only(self, tmp_path):
        write_cifar(tmp_path, n=1)
        dm = CIFAR10DataModule(data_dir=str(tmp_path), **LOADER_ARGS)
        torch.manual_seed(0)
        train = [dm.dataset("train")[0]["image"] for _ in range(20)]
        assert any(
            torch.equal(x, train[0].flip(-1)) and not torch.equal(x, train[0]) for x in train
        )
        val = [dm.dataset("val")[0]["image"] for _ in range(5)]
        assert all(torch.equal(x, val[0]) for x in val)

    def test_five_bits(self, tmp_path):
        written = write_cifar(tmp_path, n=2)
        dm = CIFAR10DataModule(data_dir=str(tmp_path), num_bits=5, **LOADER_ARGS)
        image = dm.dataset("test")[0]["image"]
        expected = (torch.from_numpy(written["test_batch"][0]).permute(2, 0, 1) >> 3).float() / 31
        assert torch.equal(image, expected)
        assert dm.num_bits == 5


def test_reduce_bits_exact_values():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(reduce_bits(x, 5) * 31, (x // 8).float())
    assert (
        reduce_bits(x, 5)[255] == 1
        and reduce_bits(x, 5)[7] == 0
        and reduce_bits(x, 5)[8] == 1 / 31
    )
    assert torch.equal(reduce_bits(x, 8), x.float() / 255)


# --- restricted unpickling ----------------------------------------------------------------------


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path / "data", n=1)
    evil = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    evil.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "data"), **LOADER_ARGS)
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3.*system"):
        dm.setup("fit")
    assert not (tmp_path / "pwned").exists()


def test_restricted_unpickler_allows_arrays_only(tmp_path):
    import io

    payload = {"a": np.arange(5, dtype=np.int16), "b": [1, "x", b"y"], "c": np.float32(2.5)}
    for protocol in (2, 4, 5):
        out = RestrictedUnpickler(io.BytesIO(pickle.dumps(payload, protocol)), source="p").load()
        assert np.array_equal(out["a"], payload["a"]) and out["b"] == [1, "x", b"y"]
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        from collections import OrderedDict

        RestrictedUnpickler(io.BytesIO(pickle.dumps(OrderedDict(a=1))), source="p").load()


# --- MNIST -------------------------------------------------------------------------------------


class TestMNIST:
    def test_batches_are_binary(self, tmp_path):
        write_mnist(tmp_path)
        dm = MNISTDataModule(data_dir=str(tmp_path), **LOADER_ARGS)
        dm.setup("fit")
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            batch = next(iter(loader))
            check_batch(batch, (1, 28, 28))
            assert set(batch["image"].unique().tolist()) <= {0.0, 1.0}
        assert dm.binary and dm.image_shape == (1, 28, 28)

    def test_dynamic_binarisation_fresh_draws(self, tmp_path):
        write_mnist(tmp_path, fill=128)
        dm = MNISTDataModule(data_dir=str(tmp_path), **LOADER_ARGS)
        for split in ("train", "val"):
            first, second = dm.dataset(split)[0]["image"], dm.dataset(split)[0]["image"]
            assert not torch.equal(first, second)
            assert 0.3 < first.mean() < 0.7  # p = 128 / 255

    def test_grey_levels_and_gz_parse(self, tmp_path):
        images = write_mnist(tmp_path)
        dm = MNISTDataModule(data_dir=str(tmp_path), binarize=False, **LOADER_ARGS)
        for split in ("train", "test"):  # plain and .gz files
            item = dm.dataset(split)[2]
            assert torch.equal(item["image"][0], torch.from_numpy(images[2]).float() / 255)
            assert item["label"] == 2
        assert not dm.binary

    def test_wrong_magic_and_truncated(self, tmp_path):
        write_mnist(tmp_path)
        path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
        good = path.read_bytes()
        path.write_bytes(struct.pack(">I", 2049) + good[4:])
        dm = MNISTDataModule(data_dir=str(tmp_path), **LOADER_ARGS)
        with pytest.raises(
            ValueError, match=r"train-images-idx3-ubyte: wrong IDX magic number 2049"
        ):
            dm.dataset("train")
        path.write_bytes(good[:-10])
        with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated IDX file"):
            MNISTDataModule(data_dir=str(tmp_path), **LOADER_ARGS).dataset("train")


# --- CelebA 64 ---------------------------------------------------------------------------------


class TestCelebA64:
    def test_crop_resize_and_splits(self, tmp_path):
        write_celeba(tmp_path)
        dm = CelebA64DataModule(data_dir=str(tmp_path), random_flip=False, **LOADER_ARGS)
        dm.setup("fit")
        check_batch(next(iter(dm.train_dataloader())), (3, 64, 64))
        assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3, 2, 2]
        for split, colour in (("train", INSIDE[0]), ("val", INSIDE[1]), ("test", INSIDE[1])):
            image = dm.dataset(split)[0]["image"]
            target = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
            assert (image - target).abs().max() < 0.1  # no red from outside the crop box
        test_dm = CelebA64DataModule(data_dir=str(tmp_path), eval_split="test", **LOADER_ARGS)
        assert len(test_dm.dataset("test")) == 1
        target = torch.tensor(INSIDE[2], dtype=torch.float32).view(3, 1, 1) / 255
        assert (test_dm.dataset("test")[0]["image"] - target).abs().max() < 0.1

    def test_corrupt_image_skipped(self, tmp_path, caplog):
        write_celeba(tmp_path)
        (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8broken")
        (tmp_path / "celeba" / "img_align_celeba" / "000003.jpg").unlink()
        dm = CelebA64DataModule(data_dir=str(tmp_path), **LOADER_ARGS)
        with caplog.at_level(logging.WARNING):
            assert len(dm.dataset("train")) == 1
        assert "skipped 2 of 3 unreadable images" in caplog.text

    def test_bad_eval_split(self, tmp_path):
        with pytest.raises(ValueError, match="data.eval_split"):
            CelebA64DataModule(data_dir=str(tmp_path), eval_split="val")


# --- ImageNet32 --------------------------------------------------------------------------------


def test_imagenet32_pickle_and_npz(tmp_path):
    batches = write_imagenet32(tmp_path)
    dm = ImageNet32DataModule(data_dir=str(tmp_path), random_flip=False, **LOADER_ARGS)
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), (3, 32, 32))
    assert len(dm.dataset("train")) == 20 and len(dm.dataset("val")) == 3
    for index, key in ((2, "train_2"), (3, "train_2"), (4, "train_3")):  # npz, npz, pickle
        item = dm.dataset("train")[index]
        expected = torch.from_numpy(batches[key]["data"][index % 2].reshape(3, 32, 32))
        assert torch.equal((item["image"] * 255).round().to(torch.uint8), expected)
        assert item["label"] == index % 2  # 1-based labels become 0-based
    assert dm.dataset("test")[2]["label"] == 2
    with pytest.raises(ValueError, match="download"):
        ImageNet32DataModule(data_dir=str(tmp_path), download=True)


# --- image folder ------------------------------------------------------------------------------


class TestImageFolder:
    def test_skips_corrupt_and_converts(self, tmp_path, caplog):
        write_folder(tmp_path)
        dm = ImageFolderDataModule(
            data_dir=str(tmp_path), image_size=16, val_fraction=0.4, **LOADER_ARGS
        )
        with caplog.at_level(logging.WARNING):
            dm.setup("fit")
        assert "skipped 1 of" in caplog.text and "corrupt.png" in caplog.text
        assert len(dm.dataset("train")) + len(dm.dataset("val")) == 5  # hidden file ignored
        check_batch(next(iter(dm.train_dataloader())), (3, 16, 16))
        grey = ImageFolderDataModule(
            data_dir=str(tmp_path), image_size=8, channels=1, **LOADER_ARGS
        )
        items = [grey.dataset(s)[i] for s in ("train", "val") for i in range(len(grey.dataset(s)))]
        assert all(item["image"].shape == (1, 8, 8) for item in items)

    def test_rgba_and_grey_become_rgb(self, tmp_path):
        solid((24, 24), (0, 0, 255, 0), "RGBA").save(tmp_path / "a.png")
        solid((24, 24), 200, "L").save(tmp_path / "b.png")
        dm = ImageFolderDataModule(
            data_dir=str(tmp_path),
            image_size=8,
            val_fraction=0.5,
            shuffle_split=False,
            **LOADER_ARGS,
        )
        rgba, grey = dm.dataset("train")[0]["image"], dm.dataset("val")[0]["image"]
        assert rgba.shape == grey.shape == (3, 8, 8)
        assert torch.equal(rgba[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
        assert torch.allclose(grey, torch.full_like(grey, 200 / 255))

    def test_resize_shorter_side_then_center_crop(self, tmp_path):
        array = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
        array[:, :20] = (255, 0, 0)
        array[:, 20:] = (0, 0, 255)
        for name in ("x.png", "y.png"):
            Image.fromarray(array).save(tmp_path / name)
        dm = ImageFolderDataModule(
            data_dir=str(tmp_path),
            image_size=16,
            val_fraction=0.5,
            random_flip=False,
            **LOADER_ARGS,
        )
        image = dm.dataset("train")[0]["image"]  # 40x20 -> 32x16 -> columns 8..23
        assert image.shape == (3, 16, 16)
        assert torch.equal(
            image[:, :, :7], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 16, 7)
        )
        assert torch.equal(
            image[:, :, 9:], torch.tensor([0, 0, 1.0]).view(3, 1, 1).expand(3, 16, 7)
        )

    def test_deterministic_split(self, tmp_path):
        for i in range(10):
            solid((8, 8), (i, i, i)).save(tmp_path / f"{i:02d}.png")

        def val_files(**kwargs):
            dm = ImageFolderDataModule(data_dir=str(tmp_path), val_fraction=0.3, **kwargs)
            return [Path(p).name for p in dm.dataset("val").source.paths]

        assert val_files(seed=1) == val_files(seed=1)
        assert len(val_files(seed=1)) == 3
        assert val_files(seed=1) != val_files(seed=2)
        assert val_files(shuffle_split=False) == ["07.png", "08.png", "09.png"]  # FFHQ-style tail

    def test_train_val_subfolders_labels_and_truncated_file(self, tmp_path, caplog):
        for split, names in (("train", ("cat", "dog")), ("val", ("dog",))):
            for name in names:
                (tmp_path / split / name).mkdir(parents=True)
                solid((8, 8), (50, 60, 70)).save(tmp_path / split / name / "0.png")
                solid((8, 8), (50, 60, 70)).save(tmp_path / split / name / "1.png")
        broken = tmp_path / "train" / "dog" / "1.png"
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(broken)
        broken.write_bytes(broken.read_bytes()[:2000])  # header intact, pixel data cut short
        dm = ImageFolderDataModule(
            data_dir=str(tmp_path), image_size=8, class_subfolders=True, **LOADER_ARGS
        )
        assert len(dm.dataset("train")) == 4 and len(dm.dataset("val")) == 2
        assert dm.classes == ["cat", "dog"]
        assert [dm.dataset("val")[i]["label"].item() for i in range(2)] == [1, 1]
        with caplog.at_level(logging.WARNING):
            labels = [dm.dataset("train")[i]["label"].item() for i in range(4)]
        assert "undecodable image" in caplog.text and str(broken) in caplog.text
        assert labels == [0, 0, 1, 0]  # dog/1.png replaced by the next readable image (wraps to 0)
        pickle.dumps(dm.dataset("train"))  # picklable for spawn-started workers


# --- shared checks ------------------------------------------------------------------------------

MODULES = [
    (CIFAR10DataModule, "cifar-10-batches-py/data_batch_1..5 and test_batch"),
    (CelebA64DataModule, "celeba/img_align_celeba/*.jpg and celeba/list_eval_partition.txt"),
    (MNISTDataModule, "MNIST/raw/train-images-idx3-ubyte"),
    (ImageNet32DataModule, "Imagenet32_train/train_data_batch_1..10"),
    (ImageFolderDataModule, ".jpg/.jpeg/.png/.webp"),
]


@pytest.mark.parametrize("cls,expected", MODULES)
def test_missing_files_error(tmp_path, cls, expected):
    missing = tmp_path / "nowhere"
    dm = cls(data_dir=str(missing), **LOADER_ARGS)
    for hook in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(FileNotFoundError) as info:
            hook()
        message = str(info.value)
        assert str(missing) in message and expected in message and "\n" not in message


@pytest.mark.parametrize("cls", [m[0] for m in MODULES])
def test_bad_batch_size(tmp_path, cls):
    with pytest.raises(ValueError, match="data.batch_size must be positive, got 0"):
        cls(data_dir=str(tmp_path), batch_size=0)


@pytest.mark.parametrize(
    "name,cls",
    [
        ("cifar10", CIFAR10DataModule),
        ("celeba64", CelebA64DataModule),
        ("mnist", MNISTDataModule),
        ("imagenet32", ImageNet32DataModule),
        ("celebahq256", ImageFolderDataModule),
        ("ffhq256", ImageFolderDataModule),
        ("image_folder", ImageFolderDataModule),
    ],
)
def test_configs_list_every_argument(tmp_path, name, cls):
    node = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    assert set(node) - {"_target_"} == set(inspect.signature(cls).parameters)
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": node})
    dm = instantiate(cfg.data)
    assert isinstance(dm, cls) and dm.data_dir == tmp_path / name
    assert node.download is False and node.num_workers == 4 and node.pin_memory is True
    if name.endswith("256"):
        assert dm.image_shape == (3, 256, 256) and dm.num_bits == 5 and dm.batch_size == 4
