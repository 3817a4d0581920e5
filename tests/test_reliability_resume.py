"""Crash and resume: atomic checkpoints, run-directory matching, SIGKILL then resume=auto."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import SEJE_TINY_NET, TINY_OVERRIDES, compose_cfg, train_one_thread
from jointgen.utils.checkpoint import AtomicCheckpointIO
from jointgen.utils.checks import ConfigError
from jointgen.utils.resume import auto_resume_argv, find_run_dir, resolve_resume


class TestAtomicCheckpoint:
    def test_write_replaces_and_leaves_no_temp(self, tmp_path):
        path = tmp_path / "ckpts" / "last.ckpt"
        io = AtomicCheckpointIO()
        io.save_checkpoint({"w": torch.ones(3)}, path)
        io.save_checkpoint({"w": torch.zeros(3)}, path)
        assert torch.load(path, weights_only=True)["w"].sum() == 0
        assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    def test_failed_write_keeps_the_old_file(self, tmp_path):
        path = tmp_path / "last.ckpt"
        io = AtomicCheckpointIO()
        io.save_checkpoint({"w": torch.ones(3)}, path)

        class Unpicklable:
            def __reduce__(self):
                raise RuntimeError("disk full halfway")

        with pytest.raises(RuntimeError, match="disk full"):
            io.save_checkpoint({"w": torch.zeros(3), "bad": Unpicklable()}, path)
        assert torch.load(path, weights_only=True)["w"].sum() == 3
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    def test_stale_temp_of_a_killed_writer_is_removed(self, tmp_path):
        stale = tmp_path / ".last.ckpt.tmp-99999"
        stale.write_bytes(b"half a checkpoint")
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, tmp_path / "last.ckpt")
        assert not stale.exists()


class TestRunDirectory:
    def _run(self, runs: Path, name: str, overrides: list[str]) -> Path:
        d = runs / name / ".hydra"
        d.mkdir(parents=True)
        (d / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
        return d.parent

    def test_newest_run_with_the_same_overrides_wins(self, tmp_path):
        old = self._run(tmp_path, "a", ["seed=1", "resume=auto"])
        time.sleep(0.01)
        other = self._run(tmp_path, "b", ["seed=2", "resume=auto"])
        assert find_run_dir(tmp_path, ["resume=auto", "seed=1"]) == old
        assert find_run_dir(tmp_path, ["seed=2", "resume=auto", "hydra.verbose=true"]) == other
        assert find_run_dir(tmp_path, ["seed=3"]) is None
        time.sleep(0.01)
        newer = self._run(tmp_path, "c", ["seed=1"])
        assert find_run_dir(tmp_path, ["seed=1", "resume=auto"]) == newer

    def test_argv_gets_the_run_dir_only_for_resume_auto(self, tmp_path, monkeypatch):
        from jointgen import CONF_DIR

        monkeypatch.setenv("JOINTGEN_ROOT", str(tmp_path))
        run = self._run(tmp_path / "logs" / "train" / "runs", "r", ["seed=5", "resume=auto"])
        argv = ["jointgen-train", "seed=5", "resume=auto"]
        assert auto_resume_argv(argv, CONF_DIR) == [*argv, f"hydra.run.dir={run.resolve()}"]
        for plain in (["x", "seed=5"], ["x", "-m", "seed=5", "resume=auto"]):
            assert auto_resume_argv(plain, CONF_DIR) == plain
        explicit = ["x", "seed=5", "resume=auto", "hydra.run.dir=elsewhere"]
        assert auto_resume_argv(explicit, CONF_DIR) == explicit

    def test_bad_resume_settings_are_one_line_errors(self, tmp_path):
        cfg = compose_cfg("train", ["resume=auto", "ckpt_path=x.ckpt"], tmp_path)
        with pytest.raises(ConfigError, match="either resume=auto or ckpt_path=x.ckpt"):
            resolve_resume(cfg)
        cfg = compose_cfg("train", [f"resume={tmp_path}/missing.ckpt"], tmp_path)
        with pytest.raises(ConfigError, match="no such checkpoint file or run folder"):
            resolve_resume(cfg)
        cfg = compose_cfg("train", ["resume=auto"], tmp_path)
        assert resolve_resume(cfg) is None  # nothing to resume: a fresh start


# --- SIGKILL mid-run, then the same command again ------------------------------------------

# 48 images, batch 16: 3 steps per epoch, 6 in all; a step checkpoint every 2 steps
RUN = [
    o
    for o in TINY_OVERRIDES
    if not o.startswith(("data.num_", "logger", "callbacks.sample_grid", "final_samples"))
] + [
    "data.num_train=48",
    "data.num_val=16",
    "data.num_test=16",
    "logger=none",
    "~callbacks.sample_grid",
    "final_samples=0",
    "test=false",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "model.num_iw_samples_val=2",
    "callbacks.step_checkpoint.every_n_train_steps=2",
    "resume=auto",
]


# the joint VAE (conv branch, autoregressive caption decoder): the same run for that family
JOINT_RUN = [
    "experiment=joint_shapes",
    "model.prior_fit_steps=20",  # the refit path, cheaply
    "data.level=1",
    "data.image_size=16",
    "data.batch_size=16",
    "model.net.text.hidden_dim=32",
    "model.net.text.embed_dim=16",
    "model.net.image.hidden_channels=8",
    "callbacks.cross_coherence.num_samples=8",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
]
SHARED = ("data.num_", "logger", "~callbacks.sample", "final_", "test=", "trainer.", "model.num")
JOINT_RUN += [o for o in RUN if o.startswith((*SHARED, "callbacks.step", "resume"))]
# SEJE (manual optimisation with the discriminator's own optimiser, plateau lr schedule)
SEJE_RUN = (
    SEJE_TINY_NET
    + [
        "data.synthetic.num_recipes=120",
        "data.batch_size=16",
        "data.num_workers=0",
        "model.val_bag_size=10",
        "model.val_bags=2",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "~callbacks.seje_media",
    ]
    + [o for o in RUN if o.startswith(("logger", "test=", "trainer.", "callbacks.step", "resume"))]
)
RUNS = {"nvae": RUN, "joint": JOINT_RUN, "seje": SEJE_RUN}


def _train_cmd(root: Path, run: list[str] = RUN) -> tuple[list[str], dict]:
    exe = Path(sys.executable).parent / "jointgen-train"
    # one thread in every run: less contention on small machines, same kernels as the reference
    env = dict(os.environ, JOINTGEN_ROOT=str(root), HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    return [str(exe), *run], env


def _final(run: Path) -> tuple[dict, dict]:
    summary = json.loads((run / "metrics.json").read_text())
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return summary, state


@pytest.mark.parametrize("family", sorted(RUNS))
def test_sigkill_then_resume_auto_matches_uninterrupted_run(tmp_path, family):
    run_args = RUNS[family]
    # reference: the same training, uninterrupted, in this process
    ref_cfg = compose_cfg("train", [o for o in run_args if o != "resume=auto"], tmp_path / "ref")
    train_one_thread(ref_cfg)
    ref_summary, ref_state = _final(Path(ref_cfg.paths.output_dir))

    root = tmp_path / "cli"
    root.mkdir()
    # the reference's data folder: SEJE's word2vec vectors differ between processes (gensim
    # seeds them with the salted str hash), so both runs must read the same generated files
    cmd, env = _train_cmd(root, [*run_args, f"paths.data_dir={tmp_path / 'shared_data'}"])
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list(root.glob("logs/train/runs/*/checkpoints/step_*.ckpt")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no step checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = root.glob("logs/train/runs/*")
    assert not (run / "metrics.json").exists(), "killed too late to test anything"

    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resume=auto: continuing the run in {run}" in res.stderr
    # killed right after the first step checkpoint: resumed mid-epoch from it
    assert "resume=auto: resuming from" in res.stdout
    assert re.search(r"step_\d{7}\.ckpt", res.stdout)
    assert list(root.glob("logs/train/runs/*")) == [run]  # no second run folder

    summary, state = _final(run)
    assert summary["global_step"] == ref_summary["global_step"]
    assert family == "seje" or summary["global_step"] == 6
    for k, v in state.items():
        assert torch.equal(v, ref_state[k]), k
    # validation metrics are exact; the epoch means of training metrics are not compared:
    # Lightning does not checkpoint its running epoch averages (docs/reliability.md)
    val = {k: v for k, v in ref_summary["metrics"].items() if k.startswith("val/")}
    assert val and {k: summary["metrics"][k] for k in val} == val

    # the same command once more: the run has finished, nothing happens
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "already finished" in res.stdout
