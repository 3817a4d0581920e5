"""Composing the real configs, shrunk for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from jointgen import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

# a model and data small enough for a CPU test: 16x16 images, 8 channels
TINY_OVERRIDES = [
    "experiment=nvae_shapes",
    "data.image_size=16",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=16",
    "model.net.image_size=16",
    "model.net.num_channels=8",
    "model.warmup_epochs=0.5",
    "logger=csv",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.temperatures=[1.0]",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "final_samples=4",
]


# SEJE on a tiny synthetic Recipe1M: images, word vectors and encoders small enough for a CPU
# test (each test adds its recipe count, batch and callbacks)
SEJE_TINY_NET = [
    "experiment=seje_synthetic",
    "data.synthetic.image_size=24",
    "data.vocab.train.vector_size=8",
    "data.vocab.train.epochs=1",
    "data.image_size=16",
    "data.resize=20",
    "model.net.word_dim=8",
    "model.net.cnn_width=4",
    "model.net.embed_dim=16",
    "model.net.sentence_hidden=8",
    "model.net.instr_hidden=8",
]


def compose_cfg(name: str, overrides: list[str], tmp_path: Path):
    """Compose ``conf/<name>.yaml`` with outputs and data under ``tmp_path``."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.data_dir = str(tmp_path.parent / "shared_data")
    return cfg


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a console script from the venv (same interpreter as the tests)."""
    env = dict(os.environ, JOINTGEN_ROOT=str(cwd), WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    env.pop("HYDRA_FULL_ERROR")
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run(
        [str(exe), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def train_one_thread(cfg) -> float | None:
    """``run_train(cfg)`` in this process with one torch thread (tiny models run faster and
    steadier than with contended threads), restoring the thread count afterwards."""
    import torch

    from jointgen.train import run_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_train(cfg)
    finally:
        torch.set_num_threads(threads)
