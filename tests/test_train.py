"""End-to-end NVAE training on tiny shapes data: learning, checkpoints, eval, faults."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from helpers import TINY_OVERRIDES, compose_cfg
from jointgen.evaluate import run_eval
from jointgen.models.nvae_module import NonFiniteLossError
from jointgen.train import run_train


def _metrics(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_short_run_learns(tmp_path):
    """A few hundred steps on 64 images clearly lowers bits/dim."""
    cfg = compose_cfg(
        "train",
        TINY_OVERRIDES
        + [
            "trainer.max_epochs=40",
            "data.num_train=64",
            "data.num_val=32",
            "model.num_iw_samples_val=1",
            "model.optimizer.lr=5e-3",
            "callbacks.sample_grid.every_n_epochs=100",
            "test=false",
        ],
        tmp_path,
    )
    run_train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv").read_text()
    header, *lines = rows.strip().splitlines()
    col = header.split(",").index("val/nelbo_bpd")
    vals = [float(r.split(",")[col]) for r in lines if r.split(",")[col]]
    assert len(vals) == 40
    assert vals[-1] < vals[0] - 1.5, vals  # e.g. ~7.5 -> under 5 bits/dim
    assert vals[-1] < 6.0


def test_checkpoint_eval_reproduces_validation(tmp_path):
    cfg = compose_cfg("train", TINY_OVERRIDES + ["trainer.max_epochs=2"], tmp_path)
    value = run_train(cfg)
    out = _metrics(cfg)
    assert value == pytest.approx(out["metrics"]["val/bpd_best"])
    assert Path(out["files"]["samples"]).is_file()
    ckpt = out["best_checkpoint"]
    # the checkpoint holds only primitives and tensors
    torch.load(ckpt, map_location="cpu", weights_only=True)

    ecfg = compose_cfg(
        "eval", [f"ckpt_path={ckpt}", "split=val", "num_iw_samples=10"], tmp_path / "eval"
    )
    res = run_eval(ecfg)
    assert res["metrics"]["test/bpd"] == pytest.approx(out["metrics"]["val/bpd"], abs=1e-4)
    assert res["metrics"]["test/nelbo_bpd"] == pytest.approx(
        out["metrics"]["val/nelbo_bpd"], abs=1e-4
    )
    assert (Path(ecfg.paths.output_dir) / "results" / "metrics.json").is_file()


def _poison(model, bad_steps):
    """Make the reconstruction NaN on the given global steps."""
    orig = model.net.log_likelihood

    def ll(out, x):
        v = orig(out, x)
        return v * float("nan") if model.global_step in bad_steps else v

    model.net.log_likelihood = ll


def _fit_with_poison(tmp_path, bad_steps, max_bad):
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from jointgen.utils.instantiate import instantiate_nodes
    from jointgen.utils.runtime import build_trainer

    cfg = compose_cfg(
        "train",
        TINY_OVERRIDES + ["trainer.max_epochs=3", f"model.max_bad_steps={max_bad}"],
        tmp_path,
    )
    pl.seed_everything(0)
    dm, model = instantiate(cfg.data), instantiate(cfg.model)
    _poison(model, bad_steps)
    trainer = build_trainer(cfg, instantiate_nodes(cfg.callbacks, "callbacks"), [])
    return trainer, model, dm, cfg


def test_nan_steps_are_skipped_and_counted(tmp_path):
    trainer, model, dm, _ = _fit_with_poison(tmp_path, {2, 5}, max_bad=3)
    trainer.fit(model, datamodule=dm)
    assert model.skipped_steps == 2
    # a skipped step leaves no gradient, so AdaMax updates nothing on it
    opt = trainer.optimizers[0]
    n_updates = {int(st["step"]) for st in opt.state.values()}
    assert n_updates == {trainer.global_step - 2}
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_persistent_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer, model, dm, cfg = _fit_with_poison(tmp_path, set(range(5, 1000)), max_bad=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        trainer.fit(model, datamodule=dm)
    ckpts = sorted((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    assert ckpts, "the last good checkpoint must be kept"
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_model_and_data_mismatch_is_one_line_error(tmp_path):
    from jointgen.utils.checks import ConfigError

    cfg = compose_cfg("train", TINY_OVERRIDES + ["model.net.image_size=32"], tmp_path)
    with pytest.raises(
        ConfigError, match=r"model.net.image_size=32 but the data images are 16x16"
    ):
        run_train(cfg)


def test_compile_flag_keeps_state_dict_keys(tmp_path):
    cfg = compose_cfg("train", TINY_OVERRIDES, tmp_path)
    with open_dict(cfg):
        cfg.model.compile = True
    from hydra.utils import instantiate

    model = instantiate(cfg.model)
    keys = set(model.state_dict())
    model.setup("fit")
    assert set(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
