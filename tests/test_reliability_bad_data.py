"""Issue 6 §3 / issue 4 §6: every data module fed seeded mutations of tiny valid files.

A mutated file must either be refused with a documented one-line error that names it
(:class:`DataFormatError`, which covers JSON, pickle and vocab.bin errors, or
``FileNotFoundError``), or be read into samples that are all well-formed: shape, dtype, value
range, token ids inside the vocabulary, masks and lengths consistent. Anything else (an
``IndexError`` from deep inside, a NaN vector, a silently clipped image) fails the test.
"""

from __future__ import annotations

import gzip
import json
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jointgen.data.images import (
    CelebA64DataModule,
    CIFAR10DataModule,
    ImageFolderDataModule,
    ImageNet32DataModule,
    MNISTDataModule,
)
from jointgen.data.recipe1m.build import preprocess_recipe1m
from jointgen.data.recipe1m.dataset import collate_recipes
from jointgen.data.recipe1m.jsonstream import iter_json_array
from jointgen.data.recipe1m.official import OfficialRecipe1MDataset, collate_official
from jointgen.data.recipe1m.pickles import load_feature_pickle
from jointgen.data.shapes import ShapesDataModule
from jointgen.data.word2vec import load_vectors, save_vectors
from jointgen.utils.checks import DataFormatError
from test_image_data import (
    LOADER_ARGS,
    idx_bytes,
    imagenet_batch,
    write_celeba,
    write_cifar,
    write_imagenet32,
    write_mnist,
)
from test_recipe1m_data import datamodule, img2, recipe, write_raw
from test_recipe1m_official import lmdb_value

MUTATIONS = 12  # per file and module: about 60 s for the whole file on one thread


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- mutations and the refusal rule -------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded damage: truncation, flipped bytes, a zeroed run or inserted garbage."""
    kind = rng.choice(["truncate", "flip", "flip", "zero", "insert"])
    n = len(data)
    if kind == "truncate" or n < 4:
        return data[: rng.randrange(n)] if n else data
    out = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        start = rng.randrange(n)
        out[start : start + rng.randint(1, 64)] = bytes(len(out[start : start + 64]))[:64]
    else:
        at = rng.randrange(n)
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(out)


def refused_or(run: Callable[[], object], *names: str) -> object | None:
    """``run()``; a documented refusal (one line, naming one of ``names``) returns None."""
    try:
        return run()
    except (DataFormatError, FileNotFoundError) as e:
        msg = str(e)
        assert "\n" not in msg, msg
        assert any(name in msg for name in names), f"error does not name {names}: {msg}"
        return None


def damage(path: Path, rng: random.Random) -> None:
    path.write_bytes(mutate(path.read_bytes(), rng))


# --- image modules ------------------------------------------------------------------------------


def check_image_items(ds, shape, num_classes: int, binary: bool = False) -> None:
    for i in range(len(ds)):
        item = ds[i]
        x, y = item["image"], item["label"]
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
        if binary:
            assert ((x == 0) | (x == 1)).all()
        assert y.dtype == torch.int64 and 0 <= int(y) < num_classes


def load_all(dm, shape, num_classes: int, binary: bool = False) -> None:
    dm.setup("fit")
    for split in ("train", "val"):
        check_image_items(dm.dataset(split), shape, num_classes, binary)


CIFAR_EDITS = [
    lambda r: r.pop(b"data"),
    lambda r: r.update({b"data": r[b"data"].astype(np.float32) / 255}),
    lambda r: r.update({b"data": r[b"data"][:, :100]}),
    lambda r: r.update({b"labels": [11] * len(r[b"labels"])}),
    lambda r: r.update({b"labels": r[b"labels"][:-1]}),
    lambda r: r.update({b"labels": ["cat"] * len(r[b"labels"])}),
]


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_cifar10(tmp_path, seed):
    rng = random.Random(seed)
    write_cifar(tmp_path, n=2)
    target = tmp_path / "cifar-10-batches-py" / rng.choice(["data_batch_2", "test_batch"])
    if seed < len(CIFAR_EDITS):
        record = pickle.loads(target.read_bytes())
        CIFAR_EDITS[seed](record)
        target.write_bytes(pickle.dumps(record))
    else:
        damage(target, rng)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), random_flip=False, **LOADER_ARGS)
    refused_or(lambda: load_all(dm, (3, 32, 32), 10), target.name)


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_mnist(tmp_path, seed):
    rng = random.Random(seed)
    write_mnist(tmp_path, n=3)
    folder = tmp_path / "MNIST" / "raw"
    if seed == 0:  # images of the wrong size
        bad = np.zeros((3, 27, 28), dtype=np.uint8)
        (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(bad, 2051))
        names = ["train-images"]
    elif seed == 1:  # a label outside 0..9
        (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2, 42]), 2049))
        names = ["train-labels"]
    else:
        name = rng.choice(["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
        damage(folder / name, rng)
        gz = folder / rng.choice(["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
        if seed % 2:  # the gzip stream itself, or its content
            damage(gz, rng)
        else:
            gz.write_bytes(gzip.compress(mutate(gzip.decompress(gz.read_bytes()), rng)))
        names = [name, gz.name]
    dm = MNISTDataModule(data_dir=str(tmp_path), **LOADER_ARGS)
    refused_or(lambda: load_all(dm, (1, 28, 28), 10, binary=True), *names)


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_imagenet32(tmp_path, seed):
    rng = random.Random(seed)
    write_imagenet32(tmp_path)
    if seed == 0:  # 0-based labels are someone else's convention
        batch = imagenet_batch(2, 0) | {"labels": [0, 1]}
        (tmp_path / "Imagenet32_val" / "val_data").write_bytes(pickle.dumps(batch))
        target = tmp_path / "Imagenet32_val" / "val_data"
    else:
        target = (
            tmp_path
            / "Imagenet32_train"
            / rng.choice(["train_data_batch_1", "train_data_batch_2.npz"])
        )
        damage(target, rng)
    dm = ImageNet32DataModule(data_dir=str(tmp_path), random_flip=False, **LOADER_ARGS)
    refused_or(lambda: load_all(dm, (3, 32, 32), 1000), target.name)


def odd_images() -> dict[str, Image.Image]:
    """Every PIL mode a folder of web images may hold, plus odd sizes."""
    rgb = Image.new("RGB", (30, 20), (200, 30, 40))
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    return {
        "rgb.png": rgb,
        "rgba.png": Image.new("RGBA", (20, 30), (0, 0, 255, 0)),
        "la.png": Image.new("LA", (9, 9), (100, 50)),
        "grey.jpg": Image.new("L", (17, 23), 90),
        "grey16.png": Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)),
        "bilevel.png": Image.new("1", (8, 40), 1),
        "palette.png": pal,
        "cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
        "tiny.png": Image.new("RGB", (1, 1), (5, 6, 7)),
        "thin.webp": Image.new("RGB", (1, 60), (9, 9, 9)),
    }


def write_odd_folder(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, img in odd_images().items():
        img.save(root / name)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_modes_and_sizes(tmp_path, channels):
    write_odd_folder(tmp_path)
    dm = ImageFolderDataModule(
        data_dir=str(tmp_path), image_size=8, channels=channels, val_fraction=0.3, **LOADER_ARGS
    )
    load_all(dm, (channels, 8, 8), 1)
    # the 16-bit file, by its own name (the tmp folder's path may contain "16" too)
    paths = [p for s in ("train", "val") for p in dm.dataset(s).source.paths]
    (path,) = [p for p in paths if "16" in Path(p).name]
    split = "train" if path in dm.dataset("train").source.paths else "val"
    item = dm.dataset(split).source.paths.index(path)
    x = dm.dataset(split).source[item][0]
    assert (x == 40000 >> 8).all()  # scaled to 8 bits, not clipped to white


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_image_folder_damaged_files(tmp_path, seed):
    rng = random.Random(seed)
    write_odd_folder(tmp_path)
    files = sorted(tmp_path.iterdir())
    for path in rng.sample(files, 3):
        damage(path, rng)
    dm = ImageFolderDataModule(
        data_dir=str(tmp_path), image_size=8, val_fraction=0.3, **LOADER_ARGS
    )
    refused_or(lambda: load_all(dm, (3, 8, 8), 1), str(tmp_path))


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_celeba(tmp_path, seed):
    rng = random.Random(seed)
    write_celeba(tmp_path)
    folder = tmp_path / "celeba" / "img_align_celeba"
    if seed == 0:  # odd sizes are skipped (the crop box would pad them black), grey converted
        Image.new("RGB", (64, 64)).save(folder / "000001.jpg")
        Image.new("L", (178, 218), 128).save(folder / "000002.jpg")
    elif seed == 1:
        damage(tmp_path / "celeba" / "list_eval_partition.txt", rng)
    else:
        for name in rng.sample(sorted(p.name for p in folder.iterdir()), 2):
            damage(folder / name, rng)
    dm = CelebA64DataModule(data_dir=str(tmp_path), random_flip=False, **LOADER_ARGS)
    refused_or(lambda: load_all(dm, (3, 64, 64), 1), "celeba")
    if seed == 0:
        assert len(dm.dataset("train")) == 2  # 000001 skipped, grey 000002 kept as RGB


# --- shapes -------------------------------------------------------------------------------------

SHAPES = dict(level=3, image_size=16, num_train=8, num_val=4, num_test=4, batch_size=4)


def check_shapes_batch(dm: ShapesDataModule) -> None:
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for b in loader:
            assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 16, 16)
            assert b["image"].min() >= 0 and b["image"].max() <= 1
            assert b["tokens"].dtype == torch.int64 and b["tokens"].min() >= 0
            assert b["tokens"].max() < len(dm.vocab)
            assert (b["mask_image"] | b["mask_text"]).all()


@pytest.mark.parametrize("seed", range(6))
def test_shapes_damaged_cache_is_regenerated(tmp_path, seed):
    rng = random.Random(seed)
    ShapesDataModule(data_dir=str(tmp_path), **SHAPES).prepare_data()
    clean = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    victim = tmp_path / rng.choice(sorted(clean))
    if seed == 0:  # a valid zip whose arrays are wrong: token ids past the vocabulary
        victim = next(tmp_path.glob("*_train.npz"))
        with np.load(victim) as z:
            arrays = dict(z)
        arrays["tokens"] = arrays["tokens"] + 1000
        np.savez(victim, **arrays)
    else:
        damage(victim, rng)
    dm = ShapesDataModule(data_dir=str(tmp_path), **SHAPES)
    dm.setup("fit")
    check_shapes_batch(dm)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == clean  # regenerated exactly


# --- word2vec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(2 * MUTATIONS))
def test_vocab_bin(tmp_path, seed):
    rng = random.Random(seed)
    words = ["</s>", "olive_oil", "salt", "heat", "the"]
    path = tmp_path / "vocab.bin"
    save_vectors(path, words, np.random.default_rng(seed).normal(size=(5, 4)))
    damage(path, rng)
    out = refused_or(lambda: load_vectors(path), "vocab.bin")
    if out is not None:
        got, vectors = out
        assert vectors.dtype == np.float32 and vectors.shape == (len(got), 4)
        assert np.isfinite(vectors).all() and all(w and " " not in w for w in got)


# --- Recipe1M -----------------------------------------------------------------------------------


def raw_recipes(root: Path) -> Path:
    """Four recipes with images, in the three JSON layers, plus classes1M.pkl."""
    rs = [recipe(f"r{k}", part=p) for k, p in enumerate(["train", "train", "val", "test"])]
    rs.append(recipe("r_empty", steps=("", "  "), ingrs=[]))  # no instructions/ingredients
    layer2 = [img2(f"r{k}", f"abc{k}1.jpg") for k in range(4)]
    images = [(p, f"abc{k}1.jpg", k != 1) for k, p in enumerate(["train", "train", "val", "test"])]
    write_raw(root, [r[0] for r in rs], [r[1] for r in rs], layer2, images)
    classes = {"r0": 1, "r1": 2, "r2": 1}
    (root / "classes1M.pkl").write_bytes(pickle.dumps(classes) + pickle.dumps({0: "bg", 1: "a"}))
    return root


def build_and_serve(root: Path) -> None:
    """Preprocess, then read every split through the DataModule and check each batch."""
    meta = preprocess_recipe1m(
        root,
        root / "cache",
        image_dir=root / "images",
        classes_file=root / "classes1M.pkl",
        require_images=False,
        verify_images="decode",
        corpus_file=root / "corpus.txt",
    )
    assert meta["recipes_read"] >= 0 and isinstance(meta["report"]["counts"], dict)
    words = ["</s>", "olive_oil", "salt", "heat", "the", "add"]
    save_vectors(root / "vocab.bin", words, np.ones((6, 4)))
    dm = datamodule(root, image_size=8, resize=8)
    for split, n in meta["splits"].items():
        if n == 0:
            continue
        ds = dm.dataset(split)
        check_recipe_batch(collate_recipes([ds[i] for i in range(len(ds))]), dm)


def check_recipe_batch(b: dict, dm) -> None:
    n = len(b["id"])
    assert b["image"].shape == (n, 3, 8, 8) and torch.isfinite(b["image"]).all()
    instr, lengths, count = b["instructions"], b["instruction_lengths"], b["num_instructions"]
    assert instr.min() >= 0 and instr.max() < dm.vocab_size
    for r in range(n):
        for j in range(instr.shape[1]):
            length = int(lengths[r, j])
            assert (length > 0) == (j < count[r])  # empty sentences were dropped
            assert (instr[r, j, :length] > 0).all() and (instr[r, j, length:] == 0).all()
    for key, count_key in (("ingredients", "num_ingredients"), ("title", "title_length")):
        ids, k = b[key], b[count_key]
        assert ids.min() >= 0 and ids.max() < dm.vocab_size
        assert all((ids[r, : k[r]] > 0).all() and (ids[r, k[r] :] == 0).all() for r in range(n))
    assert (b["category"] >= 0).all() and (b["category"] < dm.num_classes).all()


RECORD_EDITS = [  # (layer, edit of one record): wrong types, dropped keys, empty strings
    ("layer1", lambda r: r.pop("instructions")),
    ("layer1", lambda r: r.update(id=7)),
    ("layer1", lambda r: r.update(title=["not", "a", "string"])),
    ("layer1", lambda r: r.update(instructions="Heat it.")),
    ("layer1", lambda r: r.update(instructions=[{"text": None}])),
    ("layer1", lambda r: r.update(partition="training")),
    ("layer1", lambda r: r.update(title="")),
    ("det_ingrs", lambda r: r.update(valid=3)),
    ("det_ingrs", lambda r: r.update(ingredients=[{"text": 5}])),
    ("det_ingrs", lambda r: r.update(id=["r0"])),
    ("layer2", lambda r: r.update(images=[{"id": None}])),
    ("layer2", lambda r: r.update(images=[{"id": ""}])),
]


@pytest.mark.parametrize("edit", range(len(RECORD_EDITS)))
def test_recipe1m_malformed_records_are_counted(tmp_path, edit):
    root = raw_recipes(tmp_path / "raw")
    layer, change = RECORD_EDITS[edit]
    records = json.loads((root / f"{layer}.json").read_text())
    change(records[0])
    (root / f"{layer}.json").write_text(json.dumps(records))
    build_and_serve(root)


@pytest.mark.parametrize("seed", range(2 * MUTATIONS))
def test_recipe1m_damaged_files(tmp_path, seed):
    rng = random.Random(seed)
    root = raw_recipes(tmp_path / "raw")
    choices = ["layer1.json", "layer2.json", "det_ingrs.json", "classes1M.pkl"]
    choices += [str(p.relative_to(root)) for p in (root / "images").rglob("*.jpg")]
    victim = root / rng.choice(choices)
    damage(victim, rng)
    refused_or(lambda: build_and_serve(root), victim.name)


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_json_stream_names_file_and_position(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "layer1.json"
    records = [recipe(f"r{k}")[0] | {"note": "café ☕"} for k in range(3)]
    path.write_bytes(mutate(json.dumps(records, indent=1, ensure_ascii=False).encode(), rng))
    try:
        list(iter_json_array(path, chunk_size=rng.choice([7, 64, 1 << 20])))
    except DataFormatError as e:
        assert str(e).startswith(f"{path}: malformed JSON at line ") and "char" in str(e)


class Store(OfficialRecipe1MDataset):
    """The official adapter with the LMDB replaced by a dict of raw values."""

    values: dict = {}

    def _raw(self, key):
        return self.values[key]


@pytest.mark.parametrize("seed", range(2 * MUTATIONS))
def test_official_lmdb_values_and_feature_pickles(tmp_path, seed):
    rng = random.Random(seed)
    term = {"r1": np.full(300, 2.0, dtype=np.float32), "r2": np.ones(300)}
    path = tmp_path / "id2tfidf_vec.pkl"
    path.write_bytes(pickle.dumps(term, protocol=2))
    Store.values = {"r1": lmdb_value(2), "r2": mutate(lmdb_value(1), rng)}
    if seed % 3 == 0:
        damage(path, rng)
    table = refused_or(lambda: load_feature_pickle(path), path.name)
    ds = Store(
        tmp_path / "train_lmdb", ["r1", "r2"], tmp_path, "val", True,
        term_vectors=table if isinstance(table, dict) else None, image_class_vectors=None,
        classes=None, image_size=8, resize=8, max_images=2, max_sentences=4, num_classes=10,
        sources={"term": str(path)},
    )  # fmt: skip
    items = [refused_or(lambda k=k: ds[k], "train_lmdb[r", path.name) for k in range(2)]
    items = [x for x in items if x is not None]
    if items:
        b = collate_official(items)
        assert (
            b["sentence_vectors"].shape[2] == 1024 and torch.isfinite(b["sentence_vectors"]).all()
        )
        assert b["f_term"].shape == (len(items), 300) and torch.isfinite(b["f_term"]).all()
        assert (b["ingredients"] >= 0).all() and (b["num_instructions"] >= 1).all()
        assert ((b["category"] >= 0) & (b["category"] < 10)).all()
