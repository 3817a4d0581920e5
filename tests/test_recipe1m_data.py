"""Recipe1M: synthetic generator, streaming preprocessing (joins, filters, bad input) and the
DataModule's batch contract, on tiny files in the real formats."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from jointgen.data.recipe1m import JSONFormatError, Recipe1MCache, Recipe1MDataModule
from jointgen.data.recipe1m.build import image_file, preprocess_recipe1m
from jointgen.data.recipe1m.pickles import restricted_load_all
from jointgen.data.recipe1m.synthetic import make_recipe1m
from jointgen.data.word2vec import load_vectors, save_vectors

# --- hand-made raw files ---------------------------------------------------------------------


def recipe(rid, part="train", steps=("Heat the olive oil in a pan.", "Add salt."), ingrs=None):
    ingrs = ingrs if ingrs is not None else [("2 tbsp olive oil", "olive oil", True)]
    layer1 = {
        "id": rid,
        "title": "Olive Oil Toast",
        "partition": part,
        "url": "u",
        "ingredients": [{"text": t} for t, _, _ in ingrs],
        "instructions": [{"text": s} for s in steps],
    }
    det = {
        "id": rid,
        "ingredients": [{"text": d} for _, d, _ in ingrs],
        "valid": [v for *_, v in ingrs],
    }
    return layer1, det


def write_raw(d, layer1, det, layer2, images=()):
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in (("layer1", layer1), ("det_ingrs", det), ("layer2", layer2)):
        (d / f"{name}.json").write_text(json.dumps(obj, indent=1))
    for part, name, ok in images:
        p = image_file(d / "images", part, name, True)
        p.parent.mkdir(parents=True, exist_ok=True)
        if ok:
            Image.new("RGB", (40, 30), (200, 10, 10)).save(p)
        else:
            p.write_bytes(b"\xff\xd8 not really a jpeg")


def img2(rid, *names):
    return {"id": rid, "images": [{"id": n, "url": "u"} for n in names]}


@pytest.fixture
def raw(tmp_path):
    """Seven recipes exercising every filter, plus join problems and bad images."""
    rs = {
        "good": recipe(
            "r_good",
            ingrs=[
                ("1 cup olive oil", "olive oil", True),
                ("salt", "salt", True),
                ("5 dried, pitted dates", "5 dried, pitted dates", False),
            ],
        ),
        "noinstr": recipe("r_noinstr", steps=()),
        "punct": recipe("r_punct", steps=("!!!", "...")),
        "noingr": recipe("r_noingr", ingrs=[("x", "x", False)]),
        "long": recipe("r_long", steps=[f"Step {k}." for k in range(20)]),
        "val": recipe("r_val", part="val"),
        "nodet": recipe("r_nodet"),
        "badimg": recipe("r_badimg", part="test"),
    }
    layer1 = [r[0] for r in rs.values()]
    det = [r[1] for k, r in rs.items() if k != "nodet"] + [
        {"id": "r_detonly", "ingredients": [], "valid": []}
    ]
    det.reverse()  # order must not matter
    layer2 = [
        img2("r_good", "aaaa1.jpg", "aaaa2.jpg"),
        img2("r_val", "bbbb1.jpg"),
        img2("r_badimg", "cccc1.jpg", "cccc2.jpg"),
        img2("r_l2only", "dddd1.jpg"),
        img2("r_long", "eeee1.jpg"),
        img2("r_noinstr", "ffff1.jpg"),
    ]
    images = [
        ("train", "aaaa1.jpg", True),
        ("val", "bbbb1.jpg", True),
        ("test", "cccc1.jpg", False),
        ("train", "eeee1.jpg", True),
        ("train", "ffff1.jpg", True),
    ]
    write_raw(tmp_path / "raw", layer1, det, layer2, images)
    return tmp_path / "raw"


def build(raw, **kw):
    kw = {"image_dir": raw / "images", "classes_file": raw / "classes1M.pkl", **kw}
    return preprocess_recipe1m(raw, raw / "cache", corpus_file=raw / "tokenized_text.txt", **kw)


# --- preprocessing ---------------------------------------------------------------------------


class TestPreprocess:
    def test_filters_and_problems_are_counted(self, raw):
        meta = build(raw)
        c = meta["report"]["counts"]
        assert c["dropped_no_instructions"] == 2  # empty list, punctuation-only sentences
        assert c["dropped_no_ingredients"] == 1
        assert c["dropped_too_many_instructions"] == 1
        assert c["layer1_without_det_ingrs"] == 1
        assert c["det_ingrs_only_ids"] == 1 and c["layer2_only_ids"] == 1
        assert c["images_missing"] == 2  # aaaa2.jpg, cccc2.jpg
        assert c["images_corrupt"] == 1  # cccc1.jpg: all of r_badimg's images are bad
        assert c["dropped_no_images"] == 1
        assert meta["splits"] == {"train": 1, "val": 1, "test": 0}
        assert meta["report"]["examples"]["layer1_without_det_ingrs"] == ["r_nodet"]

    def test_cache_contents(self, raw):
        build(raw)
        cache = Recipe1MCache(raw / "cache")
        words = ["<pad>", "<unk>", *cache.words()]
        i = [cache.recipe_id(k) for k in range(len(cache))].index("r_good")
        assert [words[t] for t in cache.title[i]] == ["olive_oil", "toast"]
        sents = [[words[t] for t in s] for s in cache.recipe_sentences(i)]
        assert sents == [["heat", "the", "olive_oil", "in", "a", "pan"], ["add", "salt"]]
        assert [words[t] for t in cache.ingredients[i]][:2] == ["olive_oil", "salt"]
        assert cache.ingredient_valid[i].tolist() == [1, 1, 0]
        assert cache.image_names(i) == ["aaaa1.jpg"]  # aaaa2.jpg is missing
        corpus = (raw / "tokenized_text.txt").read_text().splitlines()
        # train recipes with text, before the ingredient/size/image filters (good, noingr,
        # long); r_nodet has no detected ingredients to join, val is not in the corpus
        assert corpus[0] == "olive_oil toast olive_oil salt heat the olive_oil in a pan add salt"
        assert len(corpus) == 3

    def test_remove_list_and_no_image_requirement(self, raw):
        (raw / "remove.txt").write_text("r_val\n")
        meta = build(
            raw, remove_ids_file=raw / "remove.txt", require_images=False, verify_images="none"
        )
        assert meta["report"]["counts"]["dropped_remove_list"] == 1
        assert meta["splits"] == {"train": 1, "val": 0, "test": 1}

    def test_classes_pickle(self, raw):
        with open(raw / "classes1M.pkl", "wb") as f:
            pickle.dump({"r_good": 3}, f)
            pickle.dump({0: "background", 3: "toast"}, f)
        meta = build(raw)
        cache = Recipe1MCache(raw / "cache")
        cats = {cache.recipe_id(i): int(cache.category.array[i]) for i in range(len(cache))}
        assert cats == {"r_good": 3, "r_val": 0} and meta["num_classes"] == 4

    def test_malformed_json_names_file_and_position(self, raw):
        text = (raw / "layer1.json").read_text()
        (raw / "layer1.json").write_text(text.replace('"partition"', '"partition" "x"', 1))
        with pytest.raises(
            JSONFormatError, match=r"layer1.json: malformed JSON at line \d+ column \d+"
        ):
            build(raw)
        assert not (raw / "cache").exists()

    def test_missing_file(self, raw):
        (raw / "det_ingrs.json").unlink()
        with pytest.raises(FileNotFoundError, match="det_ingrs.json"):
            build(raw)

    def test_truncated_jpeg_needs_decode_mode(self, raw):
        good = image_file(raw / "images", "train", "aaaa1.jpg", True)
        Image.effect_noise((128, 128), 60).convert("RGB").save(good, quality=95)
        good.write_bytes(good.read_bytes()[:4000])  # header intact, scan data cut
        assert build(raw, verify_images="open")["splits"]["train"] == 1
        meta = build(raw, verify_images="decode")
        assert meta["report"]["counts"]["images_corrupt"] == 2 and meta["splits"]["train"] == 0

    def test_duplicate_ids_are_counted(self, raw):
        layer1 = json.loads((raw / "layer1.json").read_text())
        (raw / "layer1.json").write_text(json.dumps(layer1 + layer1[:1]))
        assert build(raw)["report"]["counts"]["duplicate_ids"] == 1

    def test_malformed_record_is_counted(self, raw):
        layer1 = json.loads((raw / "layer1.json").read_text())
        layer1.append({"id": "r_broken", "title": "x"})  # no partition or instructions
        (raw / "layer1.json").write_text(json.dumps(layer1))
        meta = build(raw)
        assert meta["report"]["counts"]["malformed_layer1"] == 1


# --- synthetic generator ----------------------------------------------------------------------


def test_synthetic_formats(tmp_path):
    counts = make_recipe1m(tmp_path, 30, seed=3, image_size=32)
    layer1 = json.loads((tmp_path / "layer1.json").read_text())
    det = json.loads((tmp_path / "det_ingrs.json").read_text())
    layer2 = json.loads((tmp_path / "layer2.json").read_text())
    assert len(layer1) == 30 and [r["id"] for r in det] == [r["id"] for r in layer1]
    assert set(layer1[0]) == {"id", "title", "partition", "url", "ingredients", "instructions"}
    assert all(len(d["valid"]) == len(d["ingredients"]) for d in det)
    parts = {r["id"]: r["partition"] for r in layer1}
    assert len(layer2) == counts["with_images"] and set(parts) >= {r["id"] for r in layer2}
    for entry in layer2:
        for im in entry["images"]:
            with Image.open(
                image_file(tmp_path / "images", parts[entry["id"]], im["id"], True)
            ) as f:
                assert f.format == "JPEG" and f.size == (32, 32)
    id2class, names = restricted_load_all(tmp_path / "classes1M.pkl", 2)
    assert set(id2class) == set(parts) and names[0] == "background"
    make_recipe1m(tmp_path / "again", 30, seed=3, images=False)
    assert (tmp_path / "again" / "layer1.json").read_bytes() == (
        tmp_path / "layer1.json"
    ).read_bytes()
    assert not (tmp_path / "again" / "images").exists()


# --- DataModule -------------------------------------------------------------------------------


def datamodule(raw, **kw):
    args = dict(
        data_dir=str(raw),
        image_dir=str(raw / "images"),
        image_partition_folder=True,
        cache_dir=str(raw / "cache"),
        vocab={
            "path": str(raw / "vocab.bin"),
            "txt_path": None,
            "corpus": str(raw / "corpus.txt"),
            "train": {},
        },
        preprocess={"verify_images": "open"},
        features={"min_df": 1},
        synthetic=None,
        prepare=False,
        keyterms=False,
        image_size=16,
        resize=20,
        max_images=5,
        max_sentences=20,
        max_words=20,
        max_ingredients=20,
        max_title=20,
        limit=None,
        exclude_images_file=None,
        batch_size=4,
        num_workers=0,
        pin_memory=False,
    )
    return Recipe1MDataModule(**{**args, **kw})


@pytest.fixture
def prepared(raw):
    build(raw, require_images=False, verify_images="none")
    words = ["</s>", "olive_oil", "salt", "heat", "the", "add"]  # "toast", "pan"... are UNK
    save_vectors(raw / "vocab.bin", words, np.random.default_rng(0).normal(size=(6, 4)))
    return raw


class TestDataModule:
    def test_batch_contract(self, prepared):
        dm = datamodule(prepared, limit=10)
        dm.prepare_data()
        dm.setup("fit")
        b = next(iter(dm.train_dataloader()))
        assert b["image"].shape == (1, 3, 16, 16) and b["image"].dtype == torch.float32
        assert b["instructions"].shape == (1, 2, 6) and b["instructions"].dtype == torch.long
        assert b["num_instructions"].tolist() == [2] and b["instruction_lengths"].tolist() == [
            [6, 2]
        ]
        words, _ = load_vectors(prepared / "vocab.bin")
        decode = lambda ids: [words[i - 2] if i >= 2 else {0: "PAD", 1: "UNK"}[i] for i in ids]  # noqa: E731
        assert decode(b["instructions"][0, 0].tolist()) == [
            "heat",
            "the",
            "olive_oil",
            "UNK",
            "UNK",
            "UNK",
        ]
        assert decode(b["ingredients"][0].tolist()) == [
            "olive_oil",
            "salt",
        ]  # the invalid line is dropped
        assert b["num_ingredients"].tolist() == [2] and b["title_length"].tolist() == [2]
        assert b["keyterms"].shape == (1, 1) and b["keyterms"].abs().sum() == 0
        assert b["category"].dtype == torch.long and b["id"] == ["r_good"]
        assert dm.vocab_size == 8 and dm.word_vectors_path.endswith("vocab.bin")

    def test_missing_and_corrupt_images_become_white(self, prepared):
        dm = datamodule(prepared)
        ds = dm.dataset("test")  # r_badimg: corrupt first image
        white = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        x = ds[0]["image"]
        assert torch.allclose(x[:, 8, 8], white, atol=1e-5) and ds.missing_images == 1
        assert not torch.allclose(dm.dataset("val")[0]["image"][:, 8, 8], white)

    def test_caps(self, prepared):
        dm = datamodule(prepared, max_sentences=1, max_words=3, max_ingredients=1, max_title=1)
        item = dm.dataset("train")[0]
        assert len(item["instructions"]) == 1 and len(item["instructions"][0]) == 3
        assert len(item["ingredients"]) == 1 and len(item["title"]) == 1

    def test_missing_pieces_name_the_command(self, raw):
        with pytest.raises(FileNotFoundError, match="jointgen-preprocess data=recipe1m"):
            datamodule(raw).prepare_data()
        build(raw)
        with pytest.raises(FileNotFoundError, match="jointgen-w2v"):
            datamodule(raw).prepare_data()

    def test_bad_arguments(self, raw):
        with pytest.raises(ValueError, match="data.resize"):
            datamodule(raw, image_size=32, resize=20)
        with pytest.raises(ValueError, match="data.max_words"):
            datamodule(raw, max_words=0)


def test_synthetic_images_identify_the_category(tmp_path):
    """Learnable structure: nearest mean-colour centroid beats chance (1/16) by far."""
    make_recipe1m(tmp_path, 160, seed=1, image_size=24, no_image_rate=0.0, max_images=1)
    layer1 = json.loads((tmp_path / "layer1.json").read_text())
    layer2 = {
        r["id"]: r["images"][0]["id"] for r in json.loads((tmp_path / "layer2.json").read_text())
    }
    id2class, _ = restricted_load_all(tmp_path / "classes1M.pkl", 2)
    feats, labels = [], []
    for r in layer1:
        if id2class[r["id"]] == 0:
            continue
        with Image.open(
            image_file(tmp_path / "images", r["partition"], layer2[r["id"]], True)
        ) as f:
            feats.append(np.asarray(f, dtype=np.float32).reshape(-1, 3).mean(0))
        labels.append(id2class[r["id"]])
    feats, labels = np.array(feats), np.array(labels)
    half = len(labels) // 2
    classes = np.unique(labels[:half])
    centroids = np.stack([feats[:half][labels[:half] == c].mean(0) for c in classes])
    pred = classes[np.argmin(((feats[half:, None] - centroids) ** 2).sum(-1), axis=1)]
    assert (pred == labels[half:]).mean() > 0.5


def test_workers_and_excluded_images(prepared):
    (prepared / "exclude.txt").write_text("aaaa1.jpg\n")
    dm = datamodule(prepared, num_workers=1, exclude_images_file=str(prepared / "exclude.txt"))
    batches = list(dm.train_dataloader())  # memory maps re-open inside the worker
    assert [b["id"] for b in batches] == [["r_good"]]
    ds = dm.dataset("train")
    i = 0
    white = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(ds[i]["image"][:, 8, 8], white, atol=1e-5)  # its only image is excluded
