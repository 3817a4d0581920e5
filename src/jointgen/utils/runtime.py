"""Trainer construction and run-time helpers shared by the entry points."""

from __future__ import annotations

import logging
import os
import sys

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from jointgen.utils.secrets import redact

log = logging.getLogger(__name__)


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> pl.Trainer:
    """Instantiate ``cfg.trainer``; fp16 gets a GradScaler starting at ``cfg.amp_init_scale``.

    Checkpoints are always written atomically (:class:`AtomicCheckpointIO`).
    """
    from jointgen.utils.checkpoint import AtomicCheckpointIO

    plugins = [AtomicCheckpointIO()]
    tcfg = cfg.trainer
    if str(tcfg.get("precision")) == "16-mixed" and cfg.get("amp_init_scale"):
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cuda", init_scale=float(cfg.amp_init_scale))
        plugins.append(MixedPrecision(precision="16-mixed", device="cuda", scaler=scaler))
        tcfg = OmegaConf.merge(tcfg, {"precision": None})
    if not loggers:  # logger=none: callbacks that need a logger would refuse to start
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    kwargs = {"callbacks": callbacks, "logger": loggers or False, "plugins": plugins}
    trainer_cfg = OmegaConf.to_container(tcfg, resolve=True)
    if trainer_cfg.get("strategy") == "ddp" and cfg.get("ddp_find_unused_parameters"):
        # SEJE steps its discriminator and its encoders with separate backward passes, so
        # each pass leaves the other's parameters without gradients, which plain DDP refuses
        trainer_cfg["strategy"] = "ddp_find_unused_parameters_true"
    if trainer_cfg.get("precision") is None:
        trainer_cfg.pop("precision", None)
    return instantiate(trainer_cfg, **kwargs)


class ConfigInCheckpoint(pl.Callback):
    """Stores the resolved config (primitives only) in every checkpoint, so `jointgen-eval` and
    `jointgen-sample` can rebuild the network and the checkpoint loads with weights_only=True.
    Secret-looking values are redacted (:func:`jointgen.utils.secrets.redact`)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = redact(OmegaConf.to_container(cfg, resolve=True))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["jointgen_config"] = self.config


def warn_if_oversubscribed(accelerator: str) -> str | None:
    """Warn (and return the message) when CPU training would share busy cores with other jobs.

    torch's OpenMP threads spin at every parallel region until all of them arrive; when other
    processes hold the cores, each region waits for a descheduled thread, and the small ops of
    the shapes models run up to 10x slower (measured: 0.7 against 8 steps/s on 2 cores).
    """
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu or not hasattr(os, "getloadavg"):
        return None
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    load = os.getloadavg()[0]
    if threads < 2 or load + threads <= cores + 0.5:
        return None
    msg = (
        f"the 1-minute load average is {load:.1f} on {cores} cores and torch uses {threads} "
        "threads: OpenMP threads waiting for busy cores can make training up to 10x slower; "
        "set OMP_NUM_THREADS=1 (or stop the other jobs)"
    )
    log.warning(msg)
    return msg


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    """Print the resolved config as a rich tree, secrets redacted: one branch per top-level
    node (data, model, trainer, callbacks...), its YAML highlighted; the scalars (task_name,
    seed, tags...) first. Plain text when stdout is not a terminal."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    def yaml(node) -> Syntax:
        text = OmegaConf.to_yaml(OmegaConf.create(node)).rstrip()
        return Syntax(text, "yaml", theme="ansi_dark", background_color="default")

    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    groups = {k: v for k, v in resolved.items() if isinstance(v, dict) and v}
    scalars = {k: v for k, v in resolved.items() if k not in groups}
    tree = Tree("config", style="bold", guide_style="dim")
    if scalars:
        tree.add("run", style="bold cyan").add(yaml(scalars))
    for key, node in groups.items():
        tree.add(str(key), style="bold cyan").add(yaml(node))
    Console().print(tree)


def finish_loggers(loggers: list, failed: bool | None = None) -> None:
    """End wandb runs so consecutive multirun jobs do not log into one run (wandb #1314).

    Call it from a ``finally`` block: ``failed=None`` reads the exception being propagated, so
    a crashed job shows as failed in wandb (exit code 1) instead of finished. Only rank zero
    holds a wandb run (Lightning gives other ranks a dummy experiment); elsewhere this is a
    no-op.
    """
    if failed is None:
        failed = sys.exc_info()[0] is not None
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)


def print_outputs(files: dict, metrics: dict | None = None, title: str = "Outputs") -> None:
    """The closing summary of a CLI: where each output went, then the headline numbers."""
    print(f"\n{title}:")
    for name, path in files.items():
        print(f"  {name:<12} : {path}")
    for name, value in (metrics or {}).items():
        print(f"  {name:<44} {value:.4f}")
