"""`jointgen-eval ckpt_path=...`: score a trained checkpoint on held-out data.

The checkpoint's model decides what is measured:

* NVAE: importance-weighted test NLL in bits/dim (and nats per image, the headline number for
  binary data such as MNIST) with ``num_iw_samples`` importance samples;
* joint caption-image VAE (``JointLitModule``): the offline suite of
  ``jointgen.eval.joint_runner.evaluate_joint`` (coherence, caption metrics, likelihoods,
  in-domain Fréchet distance, probes) with the options under ``joint`` in ``conf/eval.yaml``.

Both write ``results/metrics.json`` in the run directory (the joint suite also ``results.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from jointgen import CONF_DIR
from jointgen.generate import is_joint_config
from jointgen.utils.checkpoint import model_from_checkpoint
from jointgen.utils.checks import ConfigError, check_hardware, check_model_data
from jointgen.utils.instantiate import instantiate_nodes
from jointgen.utils.progress import progress_bar
from jointgen.utils.runtime import build_trainer, finish_loggers, print_outputs


def run_eval(cfg: DictConfig) -> dict:
    check_hardware(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    model, train_cfg = model_from_checkpoint(cfg.ckpt_path)
    data_cfg = OmegaConf.merge(train_cfg.data, cfg.get("data") or {})
    datamodule = instantiate(data_cfg)
    check_model_data(model.net, datamodule)
    if type(model).__name__ == "SEJELitModule":  # retrieval: MedR and R@K over bags
        from jointgen.eval.retrieval_eval import run_seje_eval

        return run_seje_eval(cfg, model, cfg.ckpt_path, datamodule=datamodule)
    if is_joint_config(train_cfg):
        return eval_joint(cfg, model, datamodule)
    return eval_nll(cfg, model, datamodule)


def eval_nll(cfg: DictConfig, model, datamodule) -> dict:
    """Importance-weighted NLL of an image model through ``trainer.test`` (NVAE)."""
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {cfg.split!r}")
    if cfg.num_iw_samples < 1:
        raise ConfigError(f"num_iw_samples must be >= 1, got {cfg.num_iw_samples}")
    model.hparams.num_iw_samples_test = int(cfg.num_iw_samples)
    loggers = instantiate_nodes(cfg.get("logger"), "logger")
    bars = [progress_bar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = build_trainer(cfg, bars, loggers)
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
        print_outputs({"metrics": out / "metrics.json"}, results["metrics"], "Evaluation finished")
    return results


def eval_joint(cfg: DictConfig, model, datamodule) -> dict:
    """The joint VAE's offline suite (``evaluate_joint``) with the options of ``cfg.joint``."""
    from jointgen.eval.joint_runner import evaluate_joint, write_joint_results
    from jointgen.eval.report import flatten

    j = cfg.joint
    if cfg.split not in ("test", "val", "test_heldout"):
        raise ConfigError(f"split must be test, val or test_heldout, got {cfg.split!r}")
    if j.image_attributes not in ("analytic", "classifier"):
        raise ConfigError(f"joint.image_attributes must be analytic or classifier, got "
                          f"{j.image_attributes!r}")  # fmt: skip
    for key in ("num_samples", "image_iw_samples", "probe_samples", "batch_size"):
        if int(j[key]) < (2 if key in ("num_samples", "probe_samples") else 1):
            raise ConfigError(f"joint.{key} is too small: {j[key]}")
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    use_cuda = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    model.to("cuda" if use_cuda else "cpu")
    seed = model.hparams.get("eval_seed", cfg.seed) if j.seed is None else j.seed
    clf_opts = OmegaConf.to_container(j.classifier, resolve=True)
    results = evaluate_joint(
        model,
        datamodule,
        split=cfg.split,
        num_samples=int(j.num_samples),
        temperature=float(j.temperature),
        image_attributes=str(j.image_attributes),
        seed=int(seed),
        batch_size=int(j.batch_size),
        image_iw_samples=int(j.image_iw_samples),
        probe_samples=int(j.probe_samples),
        probe_train=int(j.probe_train),
        frechet=bool(j.frechet),
        classifier_options={k: v for k, v in clf_opts.items() if v is not None},
        model_name=str(j.model_name),
    )
    results["meta"]["checkpoint"] = str(cfg.ckpt_path)
    paths = write_joint_results(results, cfg.paths.output_dir, str(j.model_name))
    loggers = instantiate_nodes(cfg.get("logger"), "logger")
    numbers = {f"eval/{k}": v for k, v in flatten(results).items() if isinstance(v, float)}
    for lg in loggers:
        lg.log_metrics(numbers, step=0)
        lg.save()
    finish_loggers(loggers)
    shown = ("coherence", "captions/", "likelihood/", "fd/", "classifier/")
    numbers = {k: v for k, v in flatten(results).items() if k.startswith(shown)}
    numbers = {k: v for k, v in numbers.items() if isinstance(v, float)}
    files = {"metrics": paths["json"], "report": paths["markdown"]}
    print_outputs(files, numbers, "Evaluation finished")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from jointgen.cli import guarded

    guarded(run_eval)(cfg)


if __name__ == "__main__":
    main()
