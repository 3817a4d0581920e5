"""Crash and resume: which run directory and which checkpoint a rerun continues from.

``resume`` (``conf/train.yaml``) takes three kinds of value:

* ``null`` (default): start fresh (the older ``ckpt_path=<file>`` still works as before);
* ``auto``: continue the previous run of the same command. Before Hydra creates a new
  timestamped directory, the entry point looks for the newest run directory under
  ``<paths.log_dir>/<task_name>/runs/`` whose ``.hydra/overrides.yaml`` lists the same
  overrides as this command, ignoring ``resume=...`` and ``hydra.*`` overrides and their
  order; the run then writes into that directory again (Hydra is given
  ``hydra.run.dir=<it>``). Passing ``hydra.run.dir=<dir>`` yourself skips the search. Inside
  the run directory the newest complete checkpoint (any ``*.ckpt``, by modification time,
  that loads) is resumed; none means a fresh start in that directory. Under ``-m`` the
  search is skipped: pass the old ``hydra.sweep.dir=<dir>`` and every job resumes from its
  own ``<dir>/<job number>`` folder;
* a path: a checkpoint file, or a run directory whose newest checkpoint is used; outputs go
  to a new run directory.

Checkpoints are written atomically (:class:`jointgen.utils.checkpoint.AtomicCheckpointIO`),
so every ``*.ckpt`` on disk is complete.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig

from jointgen.utils.checks import ConfigError

log = logging.getLogger(__name__)

FINISHED = "metrics.json"  # written by the entry point when a run completes

# Hydra flags that take a value as the next argument; another config tree is not searched
_NAME_FLAGS = ("-cn", "--config-name")
_TREE_FLAGS = ("-cp", "--config-path", "-cd", "--config-dir")


# --- choosing the run directory (before Hydra starts) ------------------------------------


def _task_overrides(args: list[str]) -> list[str] | None:
    """The task overrides in ``args`` (argv without the program), or None to skip the search."""
    out, skip_next = [], False
    for a in args:
        if skip_next:
            skip_next = False
        elif a.startswith(_TREE_FLAGS) or a in ("-m", "--multirun"):
            return None
        elif a.startswith("hydra.run.dir="):
            return None  # the user chose the directory
        elif a in _NAME_FLAGS:
            skip_next = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def _comparable(overrides: list[str]) -> list[str]:
    drop = ("resume=", "hydra.", "hydra/", "+hydra", "++hydra", "~hydra")
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(drop))


def _config_name(args: list[str], default: str) -> str:
    for i, a in enumerate(args):
        if a in ("-cn", "--config-name") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config-name="):
            return a.split("=", 1)[1]
    return default


def find_run_dir(runs_dir: Path, overrides: list[str]) -> Path | None:
    """Newest folder of ``runs_dir`` whose saved overrides equal ``overrides`` (see module doc)."""
    want = _comparable(overrides)
    best, best_time = None, -1.0
    for f in Path(runs_dir).glob("*/.hydra/overrides.yaml"):
        try:
            saved = yaml.safe_load(f.read_text()) or []
        except (OSError, yaml.YAMLError):
            continue
        if _comparable([str(s) for s in saved]) == want and f.stat().st_mtime > best_time:
            best, best_time = f.parent.parent, f.stat().st_mtime
    return best


def auto_resume_argv(argv: list[str], config_dir: str, default_config: str = "train") -> list[str]:
    """``argv`` plus ``hydra.run.dir=<previous run>`` when it asks for ``resume=auto``.

    Only the ``paths`` and ``task_name`` of the composed config are read, so this costs one
    compose (well under a second) and happens only with ``resume=auto``.
    """
    args = argv[1:]
    if "resume=auto" not in args:
        return argv
    overrides = _task_overrides(args)
    if overrides is None:
        return argv
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir):
            cfg = compose(config_name=_config_name(args, default_config), overrides=overrides)
    except Exception:  # noqa: BLE001 - Hydra itself reports bad overrides properly next
        return argv
    runs = Path(cfg.paths.log_dir) / str(cfg.task_name) / "runs"
    run_dir = find_run_dir(runs, overrides)
    if run_dir is None:
        print(
            f"resume=auto: no earlier run of this command in {runs}; starting fresh",
            file=sys.stderr,
        )
        return argv
    if (run_dir / FINISHED).is_file():
        print(f"resume=auto: the run in {run_dir} has already finished; nothing to do")
        sys.exit(0)
    print(f"resume=auto: continuing the run in {run_dir}", file=sys.stderr)
    return [*argv, f"hydra.run.dir={run_dir.resolve()}"]


# --- choosing the checkpoint (inside the run) --------------------------------------------


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``*.ckpt`` under ``folder`` (recursively) that loads, or None."""
    files = sorted(Path(folder).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for f in files:
        try:  # mmap: only the header and the tensor index are read
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            return f
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
            log.warning("skipping unreadable checkpoint %s: %s", f, str(e).splitlines()[0])
    return None


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` should start from for ``cfg.resume`` / ``cfg.ckpt_path``."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume is not None and ckpt_path is not None:
        raise ConfigError(f"set either resume={resume} or ckpt_path={ckpt_path}, not both")
    if resume is None:
        return None if ckpt_path is None else str(ckpt_path)
    if str(resume) == "auto":
        if (Path(cfg.paths.output_dir) / FINISHED).is_file():
            raise ConfigError(
                f"resume=auto: the run in {cfg.paths.output_dir} has already finished"
            )
        found = latest_checkpoint(Path(cfg.paths.output_dir))
        if found is not None:
            log.info("resume=auto: resuming from %s", found)
        return None if found is None else str(found)
    path = Path(str(resume))
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ConfigError(f"resume={resume}: no complete *.ckpt in that folder")
        return str(found)
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file or run folder")
    return str(path)
