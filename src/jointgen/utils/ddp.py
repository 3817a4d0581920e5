"""DDP under Hydra without per-rank output directories or per-rank sweeps.

Lightning's subprocess launcher starts ranks 1..N-1 by re-running the original command line
(plus ``hydra.run.dir``). Under ``-m`` every child would start its own sweep, and interpolated
run directories can differ by a second (Lightning #11300, hydra #2070). Instead, each child here
re-runs *this job's* saved config (``<run_dir>/.hydra/config.yaml``) in single-run mode, in the
same run directory, with Hydra's own logging and config dump switched off.
"""

from __future__ import annotations

import sys
from pathlib import Path

_task_module = "jointgen.train"


def _child_command(local_rank: int) -> tuple[list[str], str]:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    cfg_dir = run_dir / (hc.output_subdir or ".hydra")
    cmd = [
        sys.executable,
        "-m",
        _task_module,
        "--config-path",
        str(cfg_dir.resolve()),
        "--config-name",
        "config",
        f"hydra.run.dir={run_dir.resolve()}",
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
        f"hydra.job.name=train_ddp_process_{local_rank}",
    ]
    return cmd, str(Path.cwd())


def install_hydra_ddp_launcher(task_module: str = "jointgen.train") -> None:
    """Make Lightning's DDP launcher start child ranks from this job's saved config."""
    global _task_module
    _task_module = task_module
    import lightning.pytorch.strategies.launchers.subprocess_script as launcher

    launcher._hydra_subprocess_cmd = _child_command
