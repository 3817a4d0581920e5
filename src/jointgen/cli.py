"""Console entry points: `jointgen-train`, `jointgen-eval`, `jointgen-sample`.

User errors (a missing dataset, a bad config value) are printed as one line and exit with
status 2 instead of a traceback; everything else propagates unchanged.
"""

from __future__ import annotations

import functools
import sys


def _user_error(e: BaseException) -> str | None:
    from hydra.errors import InstantiationException

    from jointgen.utils.checks import ConfigError

    if isinstance(e, (ConfigError, FileNotFoundError)):
        return str(e)
    if isinstance(e, InstantiationException):
        cause = e.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, TypeError)):
            return str(cause)
        return str(e).splitlines()[0]
    return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def guarded(task):
    """Wrap a task so user errors become a single ``error: ...`` line and exit code 2."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
            msg = _user_error(e)
            if msg is None:
                raise
            print(f"error: {msg}", file=sys.stderr)
            if _in_multirun():
                raise  # Hydra records the job as failed; the sweeper decides (max_failure_rate)
            sys.exit(2)

    return wrapper


def train() -> None:
    from jointgen import train as t

    t.main()


def evaluate() -> None:
    from jointgen import evaluate as e

    e.main()


def sample() -> None:
    from jointgen import sample as s

    s.main()
