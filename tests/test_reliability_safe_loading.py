"""Issue 6 §4: only safe loading. Every pickle entry point refuses a code-running pickle (and the
code never runs), checkpoints load with weights_only=True, and no secret reaches the run folder
beyond Hydra's record of the command line."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, TINY_OVERRIDES, run_cli
from jointgen.data.images import CIFAR10DataModule, ImageNet32DataModule
from jointgen.data.images.common import PickleFormatError
from jointgen.data.recipe1m.build import read_classes
from jointgen.data.recipe1m.official import OfficialRecipe1MDataModule, OfficialRecipe1MDataset
from jointgen.data.recipe1m.pickles import load_feature_pickle, restricted_loads
from jointgen.utils.checkpoint import AtomicCheckpointIO, load_checkpoint
from jointgen.utils.checks import ConfigError
from jointgen.utils.secrets import REDACTED, redact

# --- malicious pickles ---------------------------------------------------------------------------


class Exploit:
    """Unpickling runs ``os.system("touch <marker>")`` unless the loader refuses the global."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_bytes(marker: Path, protocol: int, wrap=lambda x: x) -> bytes:
    Exploit.marker = str(marker)
    return pickle.dumps(wrap(Exploit()), protocol=protocol)


def official_dm(root: Path, **files) -> OfficialRecipe1MDataModule:
    args = dict(term_vectors_file=None, image_class_vectors_file=None, classes_file=None)
    return OfficialRecipe1MDataModule(
        lmdb_dir=str(root),
        image_dir=str(root),
        image_partition_folder=True,
        **{**args, **files},
        num_classes=10,
        image_size=8,
        resize=8,
        max_images=1,
        max_sentences=2,
        limit=None,
        batch_size=1,
        num_workers=0,
        pin_memory=False,
    )


def _cifar(root: Path, payload: bytes) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(payload)
    CIFAR10DataModule(data_dir=str(root), batch_size=1, num_workers=0).setup("fit")


def _imagenet(root: Path, payload: bytes) -> None:
    for folder, names in (("Imagenet32_train", range(1, 11)), ("Imagenet32_val", [None])):
        (root / folder).mkdir(parents=True)
        for i in names:
            (root / folder / (f"train_data_batch_{i}" if i else "val_data")).write_bytes(payload)
    ImageNet32DataModule(data_dir=str(root), batch_size=1, num_workers=0).setup("fit")


def _classes1m(root: Path, payload: bytes) -> None:
    root.mkdir()
    (root / "classes1M.pkl").write_bytes(payload + pickle.dumps({0: "background"}))
    read_classes(root / "classes1M.pkl")


def _seje_features(root: Path, payload: bytes) -> None:
    root.mkdir()
    (root / "id2tfidf_vec.pkl").write_bytes(payload)
    official_dm(root, term_vectors_file=str(root / "id2tfidf_vec.pkl")).tables()


def _keys(root: Path, payload: bytes) -> None:
    root.mkdir()
    (root / "train_keys.pkl").write_bytes(payload)
    official_dm(root).dataset("train")


def _lmdb_value(root: Path, payload: bytes) -> None:
    class Store(OfficialRecipe1MDataset):
        def _raw(self, key):
            return payload

    kw = dict(term_vectors=None, image_class_vectors=None, classes=None, image_size=8)
    Store(root / "train_lmdb", ["r1"], root, "train", True, **kw, resize=8, max_images=1,
          max_sentences=2)[0]  # fmt: skip


ENTRY_POINTS = {
    "cifar10_batch": (_cifar, "data_batch_1"),
    "imagenet32_batch": (_imagenet, "train_data_batch_1"),
    "classes1M.pkl": (_classes1m, "classes1M.pkl"),
    "seje_feature_pickle": (_seje_features, "id2tfidf_vec.pkl"),
    "im2recipe_keys": (_keys, "train_keys.pkl"),
    "lmdb_value": (_lmdb_value, r"train_lmdb\[r1\]"),
}


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_code_running_pickle_is_refused(tmp_path, entry, protocol):
    load, name = ENTRY_POINTS[entry]
    marker = tmp_path / "pwned"
    payload = evil_bytes(marker, protocol, wrap=lambda x: {b"data": x, "labels": [x]})
    with pytest.raises(PickleFormatError, match=rf"{name}.*refusing to load global '\w+\.system'"):
        load(tmp_path / "data", payload)
    assert not marker.exists(), "the pickle's code ran"


def test_refusal_is_one_line_config_error(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError) as err:
        restricted_loads(evil_bytes(marker, 2), source="somewhere[k]")
    assert "\n" not in str(err.value) and "somewhere[k]" in str(err.value)
    assert not marker.exists()


def test_plain_data_still_loads(tmp_path):
    path = tmp_path / "f.pkl"
    data = {"r1": np.arange(300, dtype=np.float32), b"k": [1, 2.5, "x", b"y", (None, True)]}
    for protocol in (0, 2, 5):
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        out = load_feature_pickle(path)
        assert np.array_equal(out["r1"], data["r1"]) and out[b"k"] == data[b"k"]


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_load_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = str(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "jointgen_config": {}, "x": Exploit()}, path)
    with pytest.raises(ConfigError, match="evil.ckpt"):
        load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):  # the trainer's resume/test path
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ConfigError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_every_load_in_src_is_safe():
    """A static audit: torch.load always says weights_only=True; pickle and numpy loads only
    go through the restricted unpickler (images/common.py, recipe1m/pickles.py)."""
    unpickler_homes = {"data/images/common.py", "data/recipe1m/pickles.py"}
    problems = []
    for path in sorted((REPO / "src" / "jointgen").rglob("*.py")):
        rel = path.relative_to(REPO / "src" / "jointgen").as_posix()
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{rel}: {m.group(0)}")
        if re.search(r"allow_pickle\s*=\s*True|pickle\.loads?\(|Unpickler\(", text):
            if rel not in unpickler_homes:
                problems.append(f"{rel}: unrestricted pickle load")
    assert not problems, problems


# --- secrets -------------------------------------------------------------------------------------


def test_redact_rules(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-123456")
    cfg = {
        "a": {"api_key": "k", "secret_token": "s", "db_password": 5, "num_keyterms": 3},
        "b": ["tok-123456", "/data/path"],
        "keyterms": True,
        "max_tokens": 7,
        "pad_key": None,
    }
    out = redact(cfg)
    assert out["a"] == {
        "api_key": REDACTED,
        "secret_token": REDACTED,
        "db_password": REDACTED,
        "num_keyterms": 3,
    }
    assert out["b"] == [REDACTED, "/data/path"]
    assert out["keyterms"] is True and out["max_tokens"] == 7 and out["pad_key"] is None


def test_no_secret_in_run_folder(tmp_path, monkeypatch):
    """A WANDB_API_KEY in the environment (also referenced from the config) and a secret-named
    config value never reach checkpoints, logger files, metrics.json or the console; only
    Hydra's record of the command line (.hydra/*.yaml) holds the command-line secret."""
    env_secret, cli_secret = "fake-wandb-key-0123456789", "sk-fake-secret-9876"
    monkeypatch.setenv("WANDB_API_KEY", env_secret)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = [
        "jointgen-train",
        *TINY_OVERRIDES,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        f"hydra.run.dir={out}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"+paths.secret_token={cli_secret}",
        "+paths.wandb_from_env=${oc.env:WANDB_API_KEY}",
    ]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert env_secret not in res.stdout + res.stderr
    assert cli_secret not in res.stdout + res.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and (out / "metrics.json").is_file()
    for p in files:
        data = p.read_bytes()
        assert env_secret.encode() not in data, p
        if cli_secret.encode() in data:
            assert p.parent == out / ".hydra", p  # config.yaml, overrides.yaml, hydra.yaml
    ckpt = torch.load(next(p for p in files if p.suffix == ".ckpt"), weights_only=True)
    assert ckpt["jointgen_config"]["paths"]["secret_token"] == REDACTED
