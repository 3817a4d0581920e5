"""Image grids: PNG files and logger media."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(int(math.sqrt(images.shape[0])), 1)
    save_image(images.detach().float().cpu().clamp(0, 1), path, nrow=nrow, padding=1)
    return path


def log_images(trainer, images: dict[str, torch.Tensor]) -> None:
    """Send grids to every logger that takes images (wandb, tensorboard)."""
    step = trainer.global_step
    for logger in trainer.loggers:
        for key, x in images.items():
            grid = make_grid(x.detach().float().cpu().clamp(0, 1), nrow=int(math.sqrt(len(x))))
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key=key, images=[grid], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image(key, grid, step)
