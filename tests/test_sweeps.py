"""Multirun sweeps as a user runs them: joblib in parallel, Optuna (memory and sqlite storage,
a failing trial tolerated), resuming a sweep, the results collector, and the SLURM launcher
config composed without SLURM."""

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import TINY_OVERRIDES, run_cli
from jointgen import CONF_DIR
from jointgen.collect import collect
from jointgen.collect import main as collect_main
from jointgen.utils.checks import ConfigError
from jointgen.utils.sweeps import check_launcher

FAST = TINY_OVERRIDES + [
    "trainer.max_epochs=1",
    "callbacks.sample_grid.every_n_epochs=5",
    "model.num_iw_samples_val=1",
    "test=false",
]
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
SLOW = pytest.mark.slow  # a multirun: 20-70 s each on a busy 2-core machine


def _sweep_dir(root: Path) -> Path:
    (sweep,) = sorted((root / "logs" / "train" / "multiruns").glob("*"))
    return sweep


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


# --- basic sweeper + joblib ---------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("basic")
    res = run_cli(["jointgen-train", "-m", "seed=1,2", *FAST, *JOBLIB], root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, _sweep_dir(root), res


@SLOW
def test_joblib_launches_both_jobs(basic_sweep):
    _, sweep, res = basic_sweep
    assert "Joblib.Parallel(n_jobs=2" in res.stdout and "is launching 2 jobs" in res.stdout
    job0, job1 = _jobs(sweep)
    # no check that the jobs overlapped in time: when the second loky worker is slower to
    # start than the first job takes, one worker runs both (seen on a loaded 2-core machine)
    assert (job0 / "metrics.json").is_file() and (job1 / "metrics.json").is_file()
    hydra_cfg = yaml.safe_load((job0 / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra_cfg["launcher"]["_target_"].endswith("JoblibLauncher")
    assert not (Path(sweep).parents[1] / "runs").exists()  # no stray single-run folders


@SLOW
def test_collector_table(basic_sweep, capsys):
    _, sweep, _ = basic_sweep
    res = collect(sweep)
    assert res.objective == "val/bpd_best" and res.direction == "minimize"
    assert res.columns[:4] == ["job", "status", "seed", "objective"]  # only varied overrides
    assert [(r["job"], r["seed"], r["status"]) for r in res.rows] == [
        ("0", 1, "done"),
        ("1", 2, "done"),
    ]
    assert all(0 < r["objective"] < 12 and r["val/bpd"] >= r["objective"] for r in res.rows)
    assert res.best["objective"] == min(r["objective"] for r in res.rows)

    collect_main([str(sweep), "--sort", "objective"])
    rows = (sweep / "results.csv").read_text().strip().splitlines()
    assert rows[0].startswith("job,status,seed,objective,") and len(rows) == 3
    md = (sweep / "results.md").read_text()
    assert "| job | status | seed | objective |" in md and "val/bpd_best" in md
    assert "wrote" in capsys.readouterr().out


@SLOW
def test_resume_auto_reruns_only_unfinished_jobs(basic_sweep):
    root, sweep, _ = basic_sweep
    job0, job1 = _jobs(sweep)
    before = (job0 / "metrics.json").read_text()
    # job 1 "crashed" after its last checkpoint (taken after the final epoch) but before
    # writing metrics.json: the resumed fit runs no epoch, and the metric comes from one
    # validation of the restored weights
    (job1 / "metrics.json").unlink()
    args = ["jointgen-train", "-m", "seed=1,2", *FAST, *JOBLIB]
    res = run_cli([*args, "resume=auto", f"hydra.sweep.dir={sweep}"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (job0 / "metrics.json").read_text() == before  # finished: not trained again
    assert json.loads((job1 / "metrics.json").read_text())["global_step"] == 4
    assert "already finished; returning its recorded val/bpd_best" in res.stdout + res.stderr


# --- Optuna ---------------------------------------------------------------------------------


@SLOW
def test_optuna_two_trials_then_the_sqlite_study_continues(tmp_path):
    optuna = pytest.importorskip("optuna")
    db = tmp_path / "db" / "study.db"  # the folder does not exist yet: ${sqlite:} creates it
    args = ["jointgen-train", "sweep=nvae", *FAST, f"hydra.sweeper.storage=${{sqlite:{db}}}"]
    res = run_cli([*args, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *JOBLIB], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").glob("*")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # num_channels was fixed on the command line, so it left the search space
    assert set(best["best_params"]) == {
        "model.optimizer.lr",
        "model.net.num_groups_per_scale",
        "model.kl_anneal_portion",
        "model.weight_decay_norm",
    }
    assert 1e-3 <= best["best_params"]["model.optimizer.lr"] <= 1e-2
    table = collect(sweep)
    assert [r["status"] for r in table.rows] == ["done", "done"]
    assert "model.optimizer.lr" in table.columns
    assert table.best["objective"] == pytest.approx(best["best_value"])

    # a relaunch (after a crash, or for more trials) adds to the same study
    res = run_cli([*args, "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="nvae_shapes", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and study.trials[2].state.name == "COMPLETE"
    (second,) = {*(tmp_path / "logs" / "train" / "multiruns").glob("*")} - {sweep}
    again = yaml.safe_load((second / "optimization_results.yaml").read_text())
    values = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    assert again["best_value"] == pytest.approx(min(values))  # over both launches


# a seeded random sampler whose first two draws (optuna 2.10.1, seed 0) are 0.002 then -1.0:
# one trial of the batch of two fails. (The grid sampler would cover both values too, but it
# calls Study.stop when its grid runs out, which crashes the sweeper if that happens on the
# failed trial's report.)
FAILING = """# @package _global_
defaults:
  - override /experiment: nvae_shapes
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: random
optimized_metric: val/bpd_best
hydra:
  sweeper:
    sampler:
      seed: 0
    study_name: failing
    storage: null
    n_trials: 2
    n_jobs: 2
    max_failure_rate: 0.5
    params:
      model.optimizer.lr: choice(-1.0, 0.002)
"""


@SLOW
def test_optuna_tolerates_a_failed_trial_in_memory(tmp_path):
    extra = tmp_path / "extra"
    (extra / "sweep").mkdir(parents=True)
    (extra / "sweep" / "failing.yaml").write_text(FAILING)
    res = run_cli(
        ["jointgen-train", "-m", "sweep=failing", *FAST, *JOBLIB]
        + [f"hydra.searchpath=[file://{extra}]"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model.optimizer.lr must be positive, got -1.0" in res.stderr
    assert "Failed experiment" in res.stdout + res.stderr  # logged by the sweeper, not fatal
    sweep = _sweep_dir(tmp_path)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"model.optimizer.lr": 0.002}

    table = collect(sweep)
    by_lr = {r["model.optimizer.lr"]: r for r in table.rows}
    assert by_lr[-1.0]["status"] == "failed" and by_lr[-1.0]["objective"] is None
    assert by_lr[0.002]["status"] == "done" and table.best is by_lr[0.002]


def test_sweep_configs_compose():
    want = {"nvae": "val/bpd_best", "joint": "val/nelbo_best", "seje": "val/score_best"}
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        for name, metric in want.items():
            cfg = compose("train", overrides=[f"sweep={name}"], return_hydra_config=True)
            assert cfg.optimized_metric == metric
            assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
            assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
            for key in cfg.hydra.sweeper.params:  # every searched key exists in the config
                assert OmegaConf.select(cfg, str(key)) is not None, key
            direction = "maximize" if name == "seje" else "minimize"
            assert cfg.hydra.sweeper.direction == direction


# --- beyond one machine: SLURM ------------------------------------------------------------


def _slurm(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(
            "train",
            overrides=["hardware=multi_node", "hydra/launcher=submitit_slurm", *overrides],
            return_hydra_config=True,
        )


def test_slurm_launcher_follows_the_trainer():
    cfg = _slurm(["trainer.num_nodes=4", "trainer.devices=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 2, 2)
    check_launcher(cfg.trainer, launcher)  # consistent: no error
    default = _slurm([])
    assert (default.hydra.launcher.nodes, default.hydra.launcher.tasks_per_node) == (2, 8)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("hydra.launcher.nodes=3", "hydra.launcher.nodes=3 but trainer.num_nodes=2"),
        ("hydra.launcher.tasks_per_node=1", "tasks_per_node=1 but trainer.devices=8"),
        ("hydra.launcher.gpus_per_node=4", "gpus_per_node=4 but trainer.devices=8"),
        ("trainer.devices=-1", "trainer.devices=-1 with hydra/launcher=submitit_slurm"),
    ],
)
def test_slurm_mismatch_is_a_clear_error(override, needle):
    cfg = _slurm([override])
    with pytest.raises(ConfigError, match=needle.replace("/", ".")):
        check_launcher(cfg.trainer, cfg.hydra.launcher)


def test_slurm_mismatch_stops_the_cli_before_training(tmp_path):
    """In the job (here a CPU run), check_config compares the launcher with the trainer."""
    res = run_cli(
        ["jointgen-train", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2"], tmp_path
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "error: hydra.launcher.nodes=2 but trainer.num_nodes=1" in res.stderr
