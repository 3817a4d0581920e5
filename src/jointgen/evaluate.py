"""`jointgen-eval ckpt_path=...`: importance-weighted test NLL of a trained model.

Reports bits/dim (and nats per image, the headline number for binary data such as MNIST) with
``num_iw_samples`` importance samples, and writes ``results/metrics.json`` in the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from jointgen import CONF_DIR
from jointgen.utils.checkpoint import model_from_checkpoint
from jointgen.utils.checks import ConfigError, check_hardware, check_model_data
from jointgen.utils.instantiate import instantiate_nodes
from jointgen.utils.runtime import build_trainer, finish_loggers


def run_eval(cfg: DictConfig) -> dict:
    check_hardware(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    model, train_cfg = model_from_checkpoint(cfg.ckpt_path)
    data_cfg = OmegaConf.merge(train_cfg.data, cfg.get("data") or {})
    datamodule = instantiate(data_cfg)
    check_model_data(model.net, datamodule)
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {cfg.split!r}")
    if cfg.num_iw_samples < 1:
        raise ConfigError(f"num_iw_samples must be >= 1, got {cfg.num_iw_samples}")
    model.hparams.num_iw_samples_test = int(cfg.num_iw_samples)
    loggers = instantiate_nodes(cfg.get("logger"), "logger")
    trainer = build_trainer(cfg, [], loggers)
    try:
        if cfg.split == "val":
            datamodule.setup("validate")
            loader = datamodule.val_dataloader()
            res = trainer.test(model, dataloaders=loader)[0]
        else:
            res = trainer.test(model, datamodule=datamodule)[0]
    finally:
        finish_loggers(trainer.loggers)
    results = {
        "checkpoint": str(cfg.ckpt_path),
        "split": cfg.split,
        "num_iw_samples": int(cfg.num_iw_samples),
        "metrics": {k: float(v) for k, v in res.items()},
    }
    out = Path(cfg.paths.output_dir) / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    if trainer.is_global_zero:
        print(json.dumps(results, indent=2))
        print(f"results written to {out / 'metrics.json'}")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from jointgen.cli import guarded

    guarded(run_eval)(cfg)


if __name__ == "__main__":
    main()
