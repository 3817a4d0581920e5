"""Building callbacks and loggers from their config groups (dicts of named nodes)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig


def instantiate_nodes(cfg: DictConfig | None, group: str) -> list:
    """Instantiate every value of ``cfg`` that has a ``_target_``; None gives an empty list."""
    out = []
    if not cfg:
        return out
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{group} config must be a mapping of named nodes, got {type(cfg)}")
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            out.append(instantiate(node))
        elif node is not None:
            raise ValueError(f"{group}.{name} has no _target_")
    return out
