"""Schedules on the time clock: the schedule step follows the share of max_time used."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Timer

from helpers import compose_cfg
from jointgen.models.schedule_clock import check_clock, clock_step
from jointgen.train import run_train


def _timer(duration_s, elapsed_s):
    timer = Timer(duration={"seconds": duration_s} if duration_s else None)
    timer.load_state_dict({"time_elapsed": {"train": elapsed_s}})  # as a resumed run
    return timer


def test_clock_step_is_the_further_of_steps_and_time():
    assert clock_step(10, 1000) == 10.0  # no timer: the step clock
    assert clock_step(10, 1000, _timer(None, 50.0)) == 10.0  # a timer without a budget
    half = _timer(100, 50.0)
    assert half.time_elapsed("train") == pytest.approx(50.0)
    assert clock_step(10, 1000, half) == pytest.approx(500.0)  # half the budget used
    assert clock_step(800, 1000, half) == 800.0  # a fast machine keeps its steps
    assert clock_step(10, 1000, _timer(100, 150.0)) == pytest.approx(1500.0)  # past the budget


def test_unknown_clock_is_rejected():
    check_clock("steps")
    check_clock("time")
    with pytest.raises(ValueError, match="schedule_clock"):
        check_clock("epochs")


def test_time_clock_completes_the_schedules_when_max_time_stops_training(tmp_path):
    """max_time stops a run planned for 1000 epochs after a few seconds: on the time clock the
    lr has decayed to near lr_min and the KL warm-up has finished; the step count is far from
    the plan, so the step clock would have left both at their start."""
    from test_joint_train import BRANCHES, JOINT_TINY

    lr, lr_min = 2e-3, 1e-5
    overrides = (
        JOINT_TINY
        + BRANCHES["conv"]
        + [
            "trainer.max_epochs=1000",
            "trainer.max_time=00:00:00:08",
            "model.schedule_clock=time",
            f"model.optimizer.lr={lr}",
            f"model.lr_min={lr_min}",
            "model.prior_fit_steps=0",
            "test=false",
        ]
    )
    cfg = compose_cfg("train", overrides, tmp_path)
    run_train(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    planned = 1000 * 4  # 64 images in batches of 16
    assert ckpt["global_step"] < planned / 10
    final_lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert final_lr < 0.25 * lr
    assert summary["metrics"]["train/kl_coeff"] == 1.0
    assert summary["metrics"]["train/progress"] > 0.5


@pytest.mark.parametrize("experiment", ["nvae_shapes", "joint_shapes"])
def test_both_families_read_the_clock_setting(tmp_path, experiment):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.model.schedule_clock == "steps"  # the default, visible in the model config
    cfg.model.schedule_clock = "hours"
    with pytest.raises(Exception, match="schedule_clock"):
        instantiate(cfg.model)
