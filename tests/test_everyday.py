"""Everyday use: each CLI's --help, progress display that stays silent off a terminal, the
config tree printed at start."""

from __future__ import annotations

import io
import sys

import pytest

from helpers import TINY_OVERRIDES, compose_cfg, run_cli
from jointgen import CONF_DIR

APPS = ["train", "eval", "sample", "preprocess", "w2v"]


def app_help(name: str, capsys, monkeypatch) -> str:
    """``--help`` of ``conf/<name>.yaml`` rendered by Hydra in-process (the same config and
    help template the console script uses, without importing torch)."""
    import hydra

    monkeypatch.setattr(sys, "argv", [f"jointgen-{name}", "--help"])
    with pytest.raises(SystemExit) as done:
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=name)(lambda c: None)()
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", APPS)
def test_help_lists_groups_options_and_common_runs(name, capsys, monkeypatch):
    text = app_help(name, capsys, monkeypatch)
    assert text.startswith(f"jointgen-{name}")
    for line in ("model: joint, nvae, seje", "experiment: joint_recipe1m, joint_shapes,",
                 "logger: csv, none,", "hardware: cpu, ddp_cpu, gpu,",
                 "model/image_branch: conv, nvae"):  # fmt: skip
        assert line in text, line
    assert "Common runs:" in text and f"  jointgen-{name} " in text
    assert "--cfg job" in text and "--multirun" in text
    assert "== Config ==" not in text  # the full config is --cfg job's job, not --help's


def test_console_script_help(tmp_path):
    res = run_cli(["jointgen-eval", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("jointgen-eval ckpt_path=...")
    assert "model: joint, nvae, seje" in res.stdout and "experiment: " in res.stdout


# --- progress ----------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_follows_the_terminal_and_the_override(monkeypatch):
    from jointgen.utils.progress import interactive

    monkeypatch.delenv("JOINTGEN_PROGRESS", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    assert not interactive(io.StringIO()) and interactive(FakeTTY())
    monkeypatch.setenv("TERM", "dumb")
    assert not interactive(FakeTTY())
    monkeypatch.setenv("JOINTGEN_PROGRESS", "1")
    assert interactive(io.StringIO())
    monkeypatch.setenv("JOINTGEN_PROGRESS", "0")
    assert not interactive(FakeTTY())


def test_progress_is_silent_without_a_terminal(capsys, monkeypatch):
    from jointgen.utils.progress import progress, track

    monkeypatch.delenv("JOINTGEN_PROGRESS", raising=False)
    assert list(track(range(5), "counting")) == list(range(5))
    assert list(track(iter("abc"), "no length")) == ["a", "b", "c"]
    with progress("manual", total=3) as advance:
        advance(2)
        advance()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_forced_on_draws_a_bar(capsys, monkeypatch):
    from jointgen.utils.progress import track

    monkeypatch.setenv("JOINTGEN_PROGRESS", "1")
    assert sum(track(range(4), "summing")) == 6
    assert list(track(iter(range(3)), "unknown length")) == [0, 1, 2]
    assert "summing" in capsys.readouterr().out


def test_training_progress_bar_choice(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from jointgen.utils.progress import progress_bar

    monkeypatch.delenv("JOINTGEN_PROGRESS", raising=False)
    bar = progress_bar("auto", refresh_rate=1, log_refresh_rate=50)  # pytest: not a terminal
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 50
    assert isinstance(progress_bar("rich"), RichProgressBar)
    assert progress_bar("none").is_disabled
    monkeypatch.setenv("JOINTGEN_PROGRESS", "1")
    assert isinstance(progress_bar("auto"), RichProgressBar)
    with pytest.raises(ValueError, match="auto, rich, tqdm, none|one of"):
        progress_bar("fancy")


def test_default_callbacks_build_the_progress_bar(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar

    cfg = compose_cfg("train", [o for o in TINY_OVERRIDES if "progress_bar" not in o], tmp_path)
    assert cfg.callbacks.progress_bar.kind == "auto"
    assert isinstance(instantiate(cfg.callbacks.progress_bar), ProgressBar)


def test_config_tree_printed_at_start(tmp_path, capsys):
    from jointgen.utils.runtime import print_config

    print_config(compose_cfg("train", TINY_OVERRIDES, tmp_path))
    out = capsys.readouterr().out
    assert out.startswith("config\n")
    for branch in ("├── run", "├── trainer", "├── model", "├── callbacks", "└── "):
        assert branch in out, branch
    assert "_target_: jointgen.models.nvae_module.NVAELitModule" in out


def test_word2vec_progress_ticks_per_epoch(tmp_path, capsys, monkeypatch):
    from jointgen.data.word2vec import load_vectors, train_word2vec

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("add the salt and stir\nstir the soup and serve\n" * 20)
    monkeypatch.setenv("JOINTGEN_PROGRESS", "1")
    train_word2vec(corpus, tmp_path / "v.bin", epochs=2, vector_size=4, min_count=1, workers=1)
    out = capsys.readouterr().out
    assert "word2vec corpus.txt" in out and "2/2" in out  # one tick per epoch
    assert len(load_vectors(tmp_path / "v.bin")[0]) == 8  # </s> and the seven words


def test_oversubscription_warning(monkeypatch, caplog):
    """CPU training with 2 threads on 2 cores already busy warns once, naming the fix."""
    import os

    import torch

    from jointgen.utils.runtime import warn_if_oversubscribed

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    with caplog.at_level("WARNING"):
        msg = warn_if_oversubscribed("cpu")
    assert msg and "OMP_NUM_THREADS=1" in msg and "1.9 on 2 cores" in msg
    assert msg in caplog.text
    assert warn_if_oversubscribed("gpu") is None  # GPU training: the cores only feed it
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert warn_if_oversubscribed("cpu") is None  # an idle machine
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert warn_if_oversubscribed("cpu") is None  # one thread never waits for another
