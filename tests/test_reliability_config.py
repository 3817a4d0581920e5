"""Every experiment validates; a wrong key or value is one line naming it, before any work."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from helpers import run_cli
from jointgen import CONF_DIR
from jointgen.utils.checks import ConfigError, check_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("hardware", ["cpu", "ddp_cpu"])
def test_every_experiment_validates(experiment, hardware):
    check_config(_compose([f"experiment={experiment}", f"hardware={hardware}"]))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["+triner.max_epochs=3"], "unknown top-level key 'triner'"),
        (["data.batch_size=-4"], "data.batch_size must be a positive integer, got -4"),
        (["data.batch_size=0.5"], "data.batch_size must be a positive integer, got 0.5"),
        (["data.num_workers=-1"], "data.num_workers must be an integer >= 0, got -1"),
        (["trainer.precision=17"], "trainer.precision=17 is not a Lightning precision"),
        (["precision=fp16"], "precision=bf16 or precision=fp32"),
        (
            ["hardware=ddp_cpu", "trainer.sync_batchnorm=true"],
            "trainer.sync_batchnorm=true needs GPUs",
        ),
        (["trainer.accelerator=fpga"], "trainer.accelerator=fpga must be one of"),
        (["trainer.devices=-3"], "trainer.devices must be positive or -1, got -3"),
        (["trainer.devices=0"], "trainer.devices must be positive or -1, got 0"),
        (["trainer.max_epochs=-5"], "trainer.max_epochs must be an integer >= -1, got -5"),
        (["trainer.num_nodes=0"], "trainer.num_nodes must be a positive integer, got 0"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be >= 0 or null"),
        (["model.optimizer.lr=0"], "model.optimizer.lr must be positive, got 0"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["resume=3"], "resume must be null, auto or a path, got 3"),
        (["+callbacks.extra=5"], "callbacks.extra must be a node with a _target_, got 5"),
    ],
)
def test_bad_key_or_value_is_one_line_naming_it(overrides, needle):
    cfg = _compose(["experiment=nvae_shapes", *overrides])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["+triner.max_epochs=3"], "unknown top-level key 'triner'"),
        (["data.batch_size=-4"], "data.batch_size must be a positive integer, got -4"),
    ],
)
def test_cli_refuses_before_any_work(tmp_path, args, needle):
    res = run_cli(["jointgen-train", *args], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "data").exists()  # nothing was generated or trained
