"""`jointgen-train`: build data, model, callbacks and loggers from the config and fit.

After fitting, the best checkpoint is tested, a final sample grid and ``metrics.json`` are
written to the run directory, and the configured ``optimized_metric`` is returned for sweepers.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from jointgen import CONF_DIR
from jointgen.callbacks.rng_state import RNGState
from jointgen.utils.checks import check_config, check_model_data
from jointgen.utils.instantiate import instantiate_nodes
from jointgen.utils.resume import auto_resume_argv, resolve_resume
from jointgen.utils.runtime import (
    ConfigInCheckpoint,
    build_trainer,
    finish_loggers,
    print_config,
    warn_if_oversubscribed,
)
from jointgen.utils.secrets import redact
from jointgen.utils.sweeps import finished_job_result  # also registers ${sqlite:...}

log = logging.getLogger(__name__)


def metric_value(metrics: dict, name: str) -> float:
    """The value of ``name`` in ``metrics``, or a clear error listing what is available."""
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; available: {sorted(metrics)}")
    v = metrics[name]
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def run_train(cfg: DictConfig) -> float | None:
    """Train from a composed config; returns ``cfg.optimized_metric`` (None if not set)."""
    check_config(cfg)
    ckpt_path = resolve_resume(cfg)  # resume=auto|<path> or ckpt_path
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    check_model_data(model.net, datamodule)

    callbacks = instantiate_nodes(cfg.get("callbacks"), "callbacks")
    callbacks += [ConfigInCheckpoint(cfg), RNGState()]
    loggers = instantiate_nodes(cfg.get("logger"), "logger")
    trainer = build_trainer(cfg, callbacks, loggers)
    out_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        print_config(cfg)
        warn_if_oversubscribed(cfg.trainer.get("accelerator", "auto"))
    hparams = redact(OmegaConf.to_container(cfg, resolve=True))  # no API keys in logger files
    hparams["model/params"] = sum(p.numel() for p in model.parameters())
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: _num(v) for k, v in trainer.callback_metrics.items()}
        target = cfg.get("optimized_metric")
        if target and target not in metrics and ckpt_path is not None:
            # resumed from a checkpoint written after the last epoch: fit ran no validation,
            # so validate the restored weights once to report the metric
            for r in trainer.validate(model, datamodule=datamodule, verbose=False):
                metrics.update({k: _num(v) for k, v in r.items()})
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.get("test"):
            res = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
            for r in res:
                metrics.update({k: _num(v) for k, v in r.items()})
        value = (
            metric_value(metrics, cfg.optimized_metric) if cfg.get("optimized_metric") else None
        )
        if trainer.is_global_zero:
            _write_outputs(cfg, model, trainer, metrics, best, out_dir)
        return value
    finally:
        finish_loggers(trainer.loggers)


def _num(v) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def _write_outputs(cfg, model, trainer, metrics, best, out_dir: Path) -> None:
    from jointgen.utils.images import save_grid

    summary = {
        "metrics": {k: v for k, v in sorted(metrics.items()) if math.isfinite(v)},
        "best_checkpoint": best,
        "last_checkpoint": str(out_dir / "checkpoints" / "last.ckpt"),
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
    }
    paths = {"metrics": out_dir / "metrics.json"}
    if hasattr(model, "sample_images") and cfg.get("final_samples", 0) > 0:
        model.eval()
        x = model.sample_images(cfg.final_samples, cfg.final_sample_temp)
        paths["samples"] = save_grid(x, out_dir / "samples.png")
    summary["files"] = {k: str(v) for k, v in paths.items()}
    paths["metrics"].write_text(json.dumps(summary, indent=2))
    print("\nRun finished. Outputs:")
    print(f"  checkpoint : {best or summary['last_checkpoint']}")
    for k, v in paths.items():
        print(f"  {k:<10} : {v}")
    shown = {k: v for k, v in summary["metrics"].items() if k.startswith(("val/", "test/"))}
    shown = {k: v for k, v in shown.items() if "/kl_group/" not in k}
    for k, v in shown.items():
        print(f"  {k:<22} {v:.4f}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from jointgen.cli import guarded
    from jointgen.utils.ddp import install_hydra_ddp_launcher

    install_hydra_ddp_launcher("jointgen.train")
    done, value = guarded(finished_job_result)(cfg)  # resume=auto: skip finished sweep jobs
    return value if done else guarded(run_train)(cfg)


def main() -> None:
    """Entry point; ``resume=auto`` picks the previous run's directory before Hydra starts."""
    sys.argv = auto_resume_argv(sys.argv, CONF_DIR)
    hydra_main()


if __name__ == "__main__":
    main()
