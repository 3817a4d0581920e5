"""The console scripts as a user runs them: outputs, one-line errors, DDP and multirun."""

import json
from pathlib import Path

import pytest

from helpers import TINY_OVERRIDES, run_cli

FAST = TINY_OVERRIDES + ["trainer.max_epochs=1", "callbacks.sample_grid.every_n_epochs=5"]


def _runs(root: Path, task="train") -> list[Path]:
    return sorted((root / "logs" / task / "runs").glob("*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    res = run_cli(["jointgen-train", *FAST], root)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = _runs(root)
    return root, run, res


def test_train_writes_checkpoint_samples_and_metrics(trained):
    root, run, res = trained
    summary = json.loads((run / "metrics.json").read_text())
    assert Path(summary["best_checkpoint"]).is_file()
    assert (run / "samples.png").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "val/bpd" in summary["metrics"] and "test/bpd" in summary["metrics"]
    assert str(run / "metrics.json") in res.stdout  # tells the user where things are


def test_sample_cli_writes_grids(trained):
    root, run, _ = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    res = run_cli(
        [
            "jointgen-sample",
            f"ckpt_path={ckpt}",
            "temperatures=[0.6,1.0]",
            "num_samples=4",
            "readjust_bn=true",
            "readjust_bn_iters=3",
            "readjust_bn_batch=2",
        ],
        root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = _runs(root, "sample")
    assert (out / "samples_t0.6.png").is_file() and (out / "samples_t1.png").is_file()


def test_eval_cli_reports_bits_per_dim(trained):
    root, run, _ = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    res = run_cli(["jointgen-eval", f"ckpt_path={ckpt}", "num_iw_samples=3"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = _runs(root, "eval")
    m = json.loads((out / "results" / "metrics.json").read_text())["metrics"]
    assert 0 < m["test/bpd"] < 9


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["data=cifar10", "experiment=nvae_cifar10", "paths.data_dir=/nonexistent"],
            "/nonexistent/cifar10",
        ),
        (["data.image_size=0"], "data.image_size must be positive, got 0"),
        (
            [
                "experiment=nvae_shapes",
                "model.net.image_size=30",
                "data.image_size=30",
                "model.net.num_latent_scales=2",
            ],
            "not divisible by the model's down-sampling factor 4",
        ),
        (["precision=fp16"], "precision=bf16 or precision=fp32"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, args, needle):
    res = run_cli(["jointgen-train", *args], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_unknown_option_is_refused(tmp_path):
    res = run_cli(["jointgen-train", "model.net.no_such_option=1"], tmp_path)
    assert res.returncode != 0 and "no_such_option" in res.stderr


def test_ddp_cpu_trains_in_one_run_dir(tmp_path):
    res = run_cli(
        ["jointgen-train", "hardware=ddp_cpu", *FAST, "trainer.max_epochs=1", "data.num_train=64"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = _runs(tmp_path)
    assert len(runs) == 1, runs  # no per-rank output directory
    summary = json.loads((runs[0] / "metrics.json").read_text())
    # 64 images, batch 16 per process, 2 processes: 2 optimizer steps
    assert summary["global_step"] == 2


def test_multirun_sweeps_each_job_once(tmp_path):
    res = run_cli(["jointgen-train", "-m", "seed=1,2", *FAST, "test=false"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*"))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    assert all((p / "metrics.json").is_file() for p in jobs)
