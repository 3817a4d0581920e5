"""Writes a grid of prior samples per temperature after each validation epoch."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from jointgen.utils.images import log_images, save_grid


class SampleGrid(Callback):
    """Sample ``num_samples`` images at each temperature and save/log them as one grid each.

    Works with any LightningModule that has ``sample_images(n, temp) -> (n, C, H, W)`` in [0, 1].

    Args:
        dirpath: where the PNG files go (``<dirpath>/epoch_XXX_t0.8.png``).
        num_samples: images per grid.
        temperatures: latent temperatures.
        every_n_epochs: how often.
    """

    def __init__(
        self,
        dirpath: str,
        num_samples: int = 16,
        temperatures: tuple[float, ...] = (0.7, 0.8, 0.9, 1.0),
        every_n_epochs: int = 1,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.num_samples = num_samples
        self.temperatures = list(temperatures)
        self.every_n_epochs = every_n_epochs

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "sample_images"):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        was_training = pl_module.training
        pl_module.eval()
        images = {}
        # a fixed seed per epoch keeps grids comparable across epochs without touching the
        # global RNG that training uses
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trainer.current_epoch)
            for t in self.temperatures:
                x = pl_module.sample_images(self.num_samples, t)
                path = self.dirpath / f"epoch_{trainer.current_epoch:03d}_t{t:g}.png"
                save_grid(x, path)
                images[f"samples/t{t:g}"] = x
        log_images(trainer, images)
        pl_module.train(was_training)
