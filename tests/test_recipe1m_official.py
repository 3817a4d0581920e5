"""Official im2recipe LMDB + SEJE pickle adapter: restricted unpickling of Python-2 style
pickles, refusal of code-running pickles, batches from a tiny LMDB (when lmdb is installed)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from jointgen.data.recipe1m.official import OfficialRecipe1MDataModule, OfficialRecipe1MDataset
from jointgen.data.recipe1m.pickles import (
    PickleFormatError,
    load_feature_pickle,
    restricted_load_all,
    restricted_loads,
)
from jointgen.utils.checks import ConfigError


def lmdb_value(n_instr: int, classes: int = 4, images=("abcd1.jpg",)) -> bytes:
    # protocol 2 as written by Python 2 (numpy arrays go through _reconstruct + _codecs.encode)
    rec = {
        "intrs": np.arange(n_instr * 1024, dtype=np.float32).reshape(n_instr, 1024),
        "ingrs": np.array([5, 9, 1] + [0] * 17, dtype=np.uint16),
        "classes": classes,
        "imgs": [{"id": m, "url": "u"} for m in images],
    }
    return pickle.dumps(rec, protocol=2)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_feature_pickles_load(tmp_path):
    vecs = {"r1": np.ones(300, dtype=np.float32), "r2": np.zeros(300)}
    (tmp_path / "id2tfidf_vec.pkl").write_bytes(pickle.dumps(vecs, protocol=2))
    got = load_feature_pickle(tmp_path / "id2tfidf_vec.pkl")
    assert got.keys() == vecs.keys() and np.array_equal(got["r1"], vecs["r1"])
    (tmp_path / "two.pkl").write_bytes(pickle.dumps({"a": 1}) + pickle.dumps({1: "x"}))
    assert restricted_load_all(tmp_path / "two.pkl", 2) == [{"a": 1}, {1: "x"}]
    rec = restricted_loads(lmdb_value(3), source="lmdb[r1]")
    assert rec["intrs"].shape == (3, 1024) and rec["ingrs"].dtype == np.uint16


def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "id2class_1005.pkl"
    path.write_bytes(pickle.dumps({"r1": Evil()}, protocol=2))
    with pytest.raises(
        PickleFormatError, match=r"id2class_1005.pkl: refusing to load global 'posix.system'"
    ):
        load_feature_pickle(path)
    with pytest.raises(ConfigError, match="refusing"):  # the CLIs print it as one line
        restricted_loads(pickle.dumps(Evil()), source="lmdb[r9]")


def test_truncated_pickles(tmp_path):
    path = tmp_path / "classes1M.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PickleFormatError, match="holds 1 pickle.*expected 2"):
        restricted_load_all(path, 2)
    path.write_bytes(pickle.dumps({"a": list(range(100))})[:30])
    with pytest.raises(PickleFormatError, match="classes1M.pkl"):
        restricted_load_all(path, 1)


class DictDataset(OfficialRecipe1MDataset):
    """The adapter with the LMDB replaced by a dict (the record decoding is what is tested)."""

    store: dict = {}

    def _raw(self, key):
        return self.store[key]


def make(tmp_path, cls=DictDataset, **kw):
    args = dict(
        lmdb_path=tmp_path / "train_lmdb",
        keys=["r1", "r2"],
        image_dir=tmp_path,
        partition="val",
        image_partition_folder=True,
        term_vectors={"r1": np.full(300, 2.0)},
        image_class_vectors={"r1": [np.full(300, 3.0), np.full(300, 4.0)]},
        classes=None,
        image_size=16,
        resize=20,
        max_images=5,
        max_sentences=20,
    )
    return cls(**{**args, **kw})


def test_items_and_collate(tmp_path):
    from jointgen.data.recipe1m.official import collate_official

    DictDataset.store = {"r1": lmdb_value(3), "r2": lmdb_value(0, classes=1, images=())}
    ds = make(tmp_path)
    b = collate_official([ds[0], ds[1]])
    assert b["sentence_vectors"].shape == (2, 3, 1024) and b["num_instructions"].tolist() == [3, 1]
    assert b["ingredients"].tolist() == [[5, 9], [5, 9]] and b["num_ingredients"].tolist() == [
        2,
        2,
    ]
    assert b["f_term"][0].eq(2).all() and b["f_term"][1].eq(0).all()
    assert b["f_cat"][0].eq(3).all()  # the first image in eval
    assert b["category"].tolist() == [3, 0] and b["id"] == ["r1", "r2"]
    assert b["image"].shape == (2, 3, 16, 16) and ds.missing_images == 1  # abcd1.jpg is absent
    assert make(tmp_path, classes={"r1": 777})[0]["category"] == 777


def test_real_lmdb_round_trip(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    for split in ("train", "val", "test"):
        env = lmdb.open(str(tmp_path / f"{split}_lmdb"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            txn.put(b"r1", lmdb_value(2))
        env.close()
        (tmp_path / f"{split}_keys.pkl").write_bytes(pickle.dumps(["r1"], protocol=2))
    dm = OfficialRecipe1MDataModule(
        lmdb_dir=str(tmp_path),
        image_dir=str(tmp_path),
        image_partition_folder=True,
        term_vectors_file=None,
        image_class_vectors_file=None,
        classes_file=None,
        num_classes=1048,
        image_size=16,
        resize=20,
        max_images=5,
        max_sentences=20,
        limit=None,
        batch_size=2,
        num_workers=0,
        pin_memory=False,
    )
    dm.prepare_data()
    b = next(iter(dm.train_dataloader()))
    assert b["sentence_vectors"].shape == (1, 2, 1024) and b["f_term"].shape == (1, 300)
    ds = dm.dataset("train")
    assert pickle.loads(pickle.dumps(ds))._env is None  # the handle never travels to workers
    assert torch.equal(b["category"], torch.tensor([3]))


def test_missing_lmdb_is_named(tmp_path):
    dm = OfficialRecipe1MDataModule(
        lmdb_dir=str(tmp_path),
        image_dir=str(tmp_path),
        image_partition_folder=True,
        term_vectors_file=None,
        image_class_vectors_file=None,
        classes_file=None,
        num_classes=1048,
        image_size=16,
        resize=20,
        max_images=5,
        max_sentences=20,
        limit=None,
        batch_size=2,
        num_workers=0,
        pin_memory=False,
    )
    with pytest.raises(FileNotFoundError, match="train_lmdb"):
        dm.prepare_data()
