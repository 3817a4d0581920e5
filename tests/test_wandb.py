"""wandb dashboards offline: a tiny training run per model family with ``logger=wandb``, then the
offline run's files are read back (the ``.wandb`` transaction log and ``files/media``) to check
the resolved config, grouped metric keys and media were written. No account, no network."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import SEJE_TINY_NET, TINY_OVERRIDES, compose_cfg
from jointgen.train import run_train
from test_joint_train import JOINT_TINY


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Offline wandb with every wandb folder (runs, staged table media, cache, settings) in
    ``tmp_path`` and no API key."""
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        sub = var.lower()
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops are much slower with contended threads
    yield tmp_path
    torch.set_num_threads(threads)


# --- reading an offline run --------------------------------------------------------------------

BLOCK, HEADER = 32768, 7  # LevelDB-style log: 32 KiB blocks, 7-byte record headers


def transaction_log(path: Path):
    """Protobuf records of a ``run-<id>.wandb`` file (LevelDB log format; checksums ignored)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, chunks = HEADER, b""  # the file header takes the first 7 bytes of block 0
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero-filled rest of the block
            pos += left
            continue
        chunks += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


@dataclass
class OfflineRun:
    dir: Path
    config: dict = field(default_factory=dict)  # top-level key -> JSON text
    history: set = field(default_factory=set)  # logged keys
    files: list = field(default_factory=list)  # paths under files/
    artifacts: dict = field(default_factory=dict)  # name -> manifest paths (tables with images)
    charts: set = field(default_factory=set)  # custom charts (wandb.plot.*)
    exit_code: int | None = None


def read_runs(out_dir: Path) -> list[OfflineRun]:
    import wandb

    wandb.teardown()  # the wandb service may still buffer the end of the log; flush it
    runs = []
    for run_dir in sorted((out_dir / "wandb").glob("offline-run-*")):
        (log,) = run_dir.glob("run-*.wandb")
        run = OfflineRun(run_dir)
        for r in transaction_log(log):
            kind = r.WhichOneof("record_type")
            if kind == "config":
                run.config |= {i.key: i.value_json for i in r.config.update if i.key}
                nested = [list(i.nested_key) for i in r.config.update]
                run.charts |= {k[2] for k in nested if k[:2] == ["_wandb", "visualize"]}
            elif kind == "history":
                run.history |= {i.key or i.nested_key[0] for i in r.history.item}
            elif kind == "artifact":
                run.artifacts[r.artifact.name] = [e.path for e in r.artifact.manifest.contents]
            elif kind == "exit":
                run.exit_code = r.exit.exit_code
        run.files = [str(p.relative_to(run_dir / "files")) for p in run_dir.rglob("files/**/*")]
        runs.append(run)
    return runs


def media(run: OfflineRun, kind: str, key: str) -> list[str]:
    """Files of ``key`` under ``files/media/<kind>/`` (``images`` or ``table``)."""
    return [f for f in run.files if f.startswith(f"media/{kind}/{key}_")]


def table_artifact(run: OfflineRun, key: str) -> list[str]:
    """Manifest of the artifact holding a table with images (its images go there)."""
    name = key.replace("/", "")
    found = [paths for n, paths in run.artifacts.items() if f"-{name}" in n]
    assert found, f"no artifact for table {key}: {sorted(run.artifacts)}"
    return found[0]


def train(overrides: list[str], tmp_path: Path) -> OfflineRun:
    cfg = compose_cfg("train", [o for o in overrides if not o.startswith("logger=")] +
                      ["logger=wandb"], tmp_path)  # fmt: skip
    run_train(cfg)
    (run,) = read_runs(Path(cfg.paths.output_dir))
    assert run.exit_code == 0
    # the resolved config went in as hyperparameters
    for key in ("model", "data", "trainer", "callbacks", "seed", "model/params"):
        assert key in run.config, key
    assert '"_target_"' in run.config["model"] and "${" not in run.config["paths"]
    return run


# --- one run per family --------------------------------------------------------------------------

NVAE_TINY = TINY_OVERRIDES + [
    "trainer.max_epochs=1",
    "model.num_iw_samples_val=1",
    "model.num_iw_samples_test=1",
    "callbacks.sample_grid.temperatures=[0.7,1.0]",
    "callbacks.nvae_media.num_images=4",
]


def test_nvae_dashboard(offline_wandb):
    run = train(NVAE_TINY, offline_wandb)
    for key in ("val/bpd", "val/bpd_best", "val/active_units", "val/kl_group/00", "test/bpd"):
        assert key in run.history, key
    for key in ("samples/t0.7", "samples/t1", "val/reconstructions"):
        assert key in run.history and media(run, "images", key), key
    assert media(run, "table", "val/kl_groups") and "val/kl_groups_chart" in run.charts
    (table,) = media(run, "table", "val/kl_groups")
    rows = json.loads((run.dir / "files" / table).read_text())
    assert rows["columns"] == ["group", "kl", "active_units", "units"]
    groups = [k for k in run.history if k.startswith("val/kl_group/")]
    assert len(rows["data"]) == len(groups) and all(0 <= r[2] <= r[3] for r in rows["data"])


def test_joint_dashboard(offline_wandb):
    coherence = [f"callbacks.cross_coherence.{k}" for k in
                 ("num_samples=16", "num_media=4", "batch_size=16")]  # fmt: skip
    run = train(JOINT_TINY + ["model/image_branch=conv", "model.net.image.hidden_channels=8",
                              *coherence], offline_wandb)  # fmt: skip
    for key in ("val/nelbo", "test/bpd_img", "val/coherence/c2i_strict", "val/coherence/i2c/shape",
                "val/coherence/joint/shape"):  # fmt: skip
        assert key in run.history, key
    for mode in ("c2i", "i2c", "joint"):  # cross-generation grids with captions
        assert media(run, "images", f"coherence/{mode}"), mode
    manifest = table_artifact(run, "coherence/samples")
    assert any(p.endswith(".table.json") for p in manifest)
    assert any(p.endswith(".png") for p in manifest)  # identical images are stored once
    (table,) = media(run, "table", "coherence/samples")
    t = json.loads((run.dir / "files" / table).read_text())
    for column in ("image", "caption", "generated caption", "parsed attributes", "caption right"):
        assert column in t["columns"], column
    assert len(t["data"]) == 4


SEJE_TINY = SEJE_TINY_NET + [
    "trainer.max_epochs=1",
    "data.synthetic.num_recipes=150",
    "data.batch_size=16",
    "model.val_bag_size=10",
    "model.val_bags=2",
    "model.test_bag_sizes=[10]",
    "model.test_bags=[2]",
    "callbacks.seje_media.pool_size=20",
    "callbacks.seje_media.num_queries=4",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
]


def test_seje_dashboard(offline_wandb):
    run = train(SEJE_TINY, offline_wandb)
    for key in ("val/medr_i2r", "val/r10_r2i", "val/score_best", "test/medr_i2r_10"):
        assert key in run.history, key
    for key in ("val/retrieval", "test/retrieval"):
        (table,) = media(run, "table", key)
        t = json.loads((run.dir / "files" / table).read_text())
        assert t["columns"] == ["bag size", "direction", "MedR", "R@1", "R@5", "R@10"]
        assert [r[1] for r in t["data"]] == ["i2r", "r2i"]
    (gallery,) = media(run, "table", "val/neighbours")
    t = json.loads((run.dir / "files" / gallery).read_text())
    assert t["columns"][:3] == ["query image", "true title", "top 1"] and len(t["data"]) == 4
    assert len(t["columns"]) == 2 + 5 + 1 and all(isinstance(r[-1], int) for r in t["data"])
    assert all(r[1] and "<unk>" != r[1] for r in t["data"])  # titles decoded from word ids
    assert any(p.endswith(".png") for p in table_artifact(run, "val/neighbours"))


# --- run lifecycle -------------------------------------------------------------------------------


def test_consecutive_jobs_get_their_own_runs(offline_wandb):
    """Two jobs in one process (what a basic multirun does): wandb.finish() ends the first,
    so the second is a new run with its own id, not more steps of the first."""
    ids = []
    for i in range(2):
        cfg = compose_cfg("train", NVAE_TINY[:-1] + ["logger=wandb", "test=false",
                          "trainer.limit_train_batches=1"], offline_wandb / f"job{i}")  # fmt: skip
        run_train(cfg)
        (run,) = read_runs(Path(cfg.paths.output_dir))
        ids.append(run.dir.name.rsplit("-", 1)[1])
        assert run.exit_code == 0
    assert ids[0] != ids[1]
    import wandb

    assert wandb.run is None


def test_failed_job_is_marked_failed(offline_wandb):
    cfg = compose_cfg("train", NVAE_TINY + ["logger=wandb", "optimized_metric=val/missing"],
                      offline_wandb)  # fmt: skip
    with pytest.raises(Exception, match="val/missing"):  # monitored by ModelCheckpoint
        run_train(cfg)
    (run,) = read_runs(Path(cfg.paths.output_dir))
    assert run.exit_code == 1


def test_only_rank_zero_opens_a_run(offline_wandb, monkeypatch):
    """On other ranks the logger hands out a dummy experiment and the media callbacks see no
    wandb logger, so nothing is written there."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import WandbLogger

    from jointgen.callbacks.wandb_media import wandb_loggers

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = WandbLogger(save_dir=str(offline_wandb / "rank1"), offline=True, project="p")
    assert type(logger.experiment).__name__ == "_DummyExperiment"
    logger.log_hyperparams({"a": 1})
    assert not (offline_wandb / "rank1" / "wandb").exists()

    class Trainer:  # the two attributes wandb_loggers reads
        is_global_zero, loggers = False, [logger]

    assert wandb_loggers(Trainer()) == []
