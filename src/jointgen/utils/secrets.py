"""Keeping API keys and passwords out of checkpoints, logger hyper-parameters and printed configs.

Secrets belong in environment variables (``WANDB_API_KEY`` is read by wandb itself). A config
value is redacted before it is stored or shown when its key looks like a secret (``api_key``,
``*_key``, ``*token``, ``*secret``, ``*password``, ``credentials``) or when it equals the value of
such an environment variable (a ``${oc.env:WANDB_API_KEY}`` interpolation, once resolved).
Hydra's own ``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` record the command line as
typed, so a secret passed as an override lands there: pass it through the environment instead.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***redacted***"
_SECRET_NAME = re.compile(
    r"(?:^|[_.\-])(?:api_?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE
)
_MIN_ENV_SECRET = 6  # shorter env values ("1", "true") would redact innocent config values


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name looks like it holds a secret."""
    return bool(_SECRET_NAME.search(str(name)))


def _env_secrets() -> set[str]:
    return {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= _MIN_ENV_SECRET}


def redact(obj: Any, _env: set[str] | None = None) -> Any:
    """A copy of a plain config container (``OmegaConf.to_container``) with secrets replaced.

    Args:
        obj: Nested dicts, lists and scalars.

    Returns:
        The same structure; secret values are :data:`REDACTED`.
    """
    env = _env_secrets() if _env is None else _env
    if isinstance(obj, dict):
        return {
            k: REDACTED
            if is_secret_name(k) and v is not None and not isinstance(v, (dict, list, bool))
            else redact(v, env)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, env) for v in obj)
    if isinstance(obj, str) and obj in env:  # equality: a substring rule would hit paths
        return REDACTED
    return obj
