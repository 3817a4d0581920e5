"""Sweeps and cluster launches: an Optuna storage resolver and the SLURM/trainer consistency check.

``${sqlite:<path>}`` (registered on import) turns a file path into an SQLAlchemy URL for the
Optuna sweeper's ``storage`` and creates the parent folder first: SQLite cannot create it, and
the study is opened before Hydra makes the sweep directory.

:func:`check_launcher` compares ``hydra.launcher`` (``hydra/launcher=submitit_slurm``) with the
trainer: SLURM must start ``trainer.num_nodes`` nodes with one task per device, or Lightning's
ranks and SLURM's tasks disagree and the job hangs or dies long after it was queued.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jointgen.utils.checks import ConfigError

log = logging.getLogger(__name__)


def sqlite_url(path: str) -> str:
    """``sqlite:///<absolute path>``, with the parent folder created."""
    p = Path(str(path)).expanduser().resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p}"


if not OmegaConf.has_resolver("sqlite"):
    OmegaConf.register_new_resolver("sqlite", sqlite_url)


def check_launcher(trainer: DictConfig, launcher: DictConfig | None) -> None:
    """Raise :class:`ConfigError` when a SLURM launcher and the trainer disagree.

    Args:
        trainer: the ``trainer`` node of a composed ``jointgen-train`` config.
        launcher: ``hydra.launcher`` of the same run (None or a non-SLURM launcher: no check).
    """
    if launcher is None or "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(
            f"trainer.devices={devices} with hydra/launcher=submitit_slurm: SLURM needs a "
            "positive number of devices per node (e.g. trainer.devices=8)"
        )
    lc = "hydra.launcher."
    pairs = [
        (lc + "nodes", launcher.get("nodes"), "trainer.num_nodes", nodes),
        (lc + "tasks_per_node", launcher.get("tasks_per_node"), "trainer.devices", devices),
    ]
    if str(trainer.get("accelerator")) in ("gpu", "cuda"):
        pairs.append(
            (lc + "gpus_per_node", launcher.get("gpus_per_node"), "trainer.devices", devices)
        )
    for lkey, lval, tkey, tval in pairs:
        if lval != tval:
            raise ConfigError(
                f"{lkey}={lval} but {tkey}={tval}: SLURM must start one task per device on "
                f"every node; leave {lkey} to its interpolation or set both to the same value"
            )


def check_hydra_launcher(cfg: DictConfig) -> None:
    """:func:`check_launcher` on the running job's Hydra config (no-op outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        check_launcher(cfg.trainer, HydraConfig.get().get("launcher"))


# --- resuming a multirun -----------------------------------------------------------------


def _sweeper_target() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return str(HydraConfig.get().get("sweeper", {}).get("_target_", ""))


def finished_job_result(cfg: DictConfig) -> tuple[bool, float | None]:
    """``(True, recorded optimized_metric)`` when this multirun job already finished.

    ``jointgen-train -m ... resume=auto hydra.sweep.dir=<old sweep>`` reruns every job in its
    old folder: unfinished ones continue from their newest checkpoint, finished ones (with a
    ``metrics.json``) return what they recorded instead of training again. Optuna sweeps are
    resumed through their sqlite storage instead: a trial's folder number says nothing about
    its parameters, so ``resume=auto`` is refused there.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("resume") != "auto" or not HydraConfig.initialized():
        return False, None
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return False, None
    if "OptunaSweeper" in _sweeper_target():
        raise ConfigError(
            "resume=auto does not apply to Optuna sweeps (trial folders are not tied to "
            "parameters); relaunch with the same sqlite hydra.sweeper.storage and study_name"
        )
    summary = Path(cfg.paths.output_dir) / "metrics.json"
    if not summary.is_file():
        return False, None
    metrics = json.loads(summary.read_text()).get("metrics", {})
    name = cfg.get("optimized_metric")
    value = metrics.get(name) if name else None
    log.info(
        "resume=auto: %s already finished; returning its recorded %s=%s",
        summary.parent,
        name,
        value,
    )
    return True, value
