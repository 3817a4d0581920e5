"""Loading jointgen checkpoints safely (weights_only=True) and rebuilding their models."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from jointgen.utils.checks import ConfigError


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error for a missing/bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ConfigError(f"cannot load checkpoint {path} safely: {str(e).splitlines()[0]}") from e
    if "jointgen_config" not in ckpt:
        raise ConfigError(f"{path} has no jointgen_config: was it written by jointgen-train?")
    return ckpt


def model_from_checkpoint(path: str | Path):
    """Rebuild the LightningModule stored in ``path``; returns (module, config dict)."""
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(ckpt["jointgen_config"])
    model = instantiate(cfg.model)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, cfg
