"""`jointgen-eval` for SEJE checkpoints: Recipe1M retrieval (MedR, R@1/5/10, 1k and 10k).

Embeds every pair of the chosen split once through ``trainer.test`` (the metric gathers
embeddings and ids across ranks), ranks them in both directions over seeded bags
(:mod:`jointgen.eval.retrieval`) and writes, under ``<run>/results/``:

* ``retrieval.json``: the numbers, the bag settings and the checkpoint;
* ``retrieval.txt``: the text table (one row per bag size and direction);
* ``embeddings.npz``: the id-sorted image and recipe embeddings and their ids, so results can
  be recomputed without the model (spec §8.12).

Options (all optional) under ``seje`` in the eval config: ``bag_sizes``, ``n_bags`` (default:
the model's ``test_bag_sizes`` / ``test_bags``), ``seed`` (the model's ``eval_seed``) and
``save_embeddings`` (true).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from jointgen.eval.retrieval import RecipeRetrieval, format_table
from jointgen.utils.checks import ConfigError


def run_seje_eval(
    cfg: DictConfig, module, ckpt: str | Path, datamodule=None, train_cfg=None
) -> dict:
    """Score a SEJE checkpoint; returns the results dict also written to ``results/``.

    Args:
        cfg: The ``jointgen-eval`` config (``split``, ``paths``, ``trainer``, ``logger``,
            optional ``seje`` and ``data`` overrides).
        module: The ``SEJELitModule`` restored from ``ckpt``.
        ckpt: Checkpoint path (recorded in the results; read only when ``train_cfg`` and
            ``datamodule`` are both missing).
        datamodule: The data to score; built from the checkpoint's data config merged with
            ``cfg.data`` when None.
        train_cfg: The training config stored in the checkpoint (read from it when None).
    """
    from jointgen.utils.instantiate import instantiate_nodes
    from jointgen.utils.progress import progress_bar
    from jointgen.utils.runtime import build_trainer, finish_loggers, print_outputs

    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be test or val for SEJE, got {cfg.split!r}")
    if datamodule is None:
        if train_cfg is None:
            from jointgen.utils.checkpoint import load_checkpoint

            train_cfg = OmegaConf.create(load_checkpoint(ckpt)["jointgen_config"])
        datamodule = instantiate(OmegaConf.merge(train_cfg.data, cfg.get("data") or {}))
    opts = cfg.get("seje") or {}
    h = module.hparams
    sizes = [int(s) for s in (opts.get("bag_sizes") or h.test_bag_sizes)]
    bags = opts.get("n_bags") or h.test_bags
    bags = [int(bags)] * len(sizes) if isinstance(bags, int) else [int(b) for b in bags]
    seed = int(opts.get("seed") or h.eval_seed)
    if len(bags) != len(sizes) or min(sizes + bags) < 1:
        raise ConfigError(f"seje.bag_sizes={sizes} and seje.n_bags={bags} do not match")
    module.test_retrieval = RecipeRetrieval(sizes, bags, seed, metric=h.distance)

    loggers = instantiate_nodes(cfg.get("logger"), "logger")
    bars = [progress_bar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = build_trainer(cfg, bars, loggers)
    try:
        if cfg.split == "val":
            datamodule.prepare_data()
            datamodule.setup("validate")
            res = trainer.test(module, dataloaders=datamodule.val_dataloader(), verbose=False)[0]
        else:
            res = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    finally:
        finish_loggers(trainer.loggers)
    metrics = {k.removeprefix("test/"): float(v) for k, v in res.items()}
    results = {
        "checkpoint": str(ckpt),
        "split": cfg.split,
        "bag_sizes": sizes,
        "n_bags": bags,
        "seed": seed,
        "distance": h.distance,
        "metrics": metrics,
    }
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir) / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "retrieval.json").write_text(json.dumps(results, indent=2))
        table = format_table(metrics)
        (out / "retrieval.txt").write_text(table)
        files = {"json": out / "retrieval.json", "table": out / "retrieval.txt"}
        if opts.get("save_embeddings", True) and trainer.world_size == 1:
            img, rec, ids = module.test_retrieval.pool()
            np.savez_compressed(
                out / "embeddings.npz",
                img=img.cpu().numpy(),
                rec=rec.cpu().numpy(),
                ids=np.array(ids if ids is not None else []),
            )
            files["embeddings"] = out / "embeddings.npz"
        results["files"] = {k: str(v) for k, v in files.items()}
        print(table, end="")
        print_outputs(files, title="Evaluation finished")
    return results
