"""Cross and joint coherence of the joint caption-image VAE, measured while it trains.

At the end of every ``every_n_epochs``-th validation epoch, on rank zero only, the model (in
eval mode, the global RNG saved and restored) generates images from the captions and captions
from the images of a fixed validation subset, plus as many prior samples, and the callback logs

* ``val/coherence/c2i_strict``, ``val/coherence/i2c_strict``, ``val/coherence/joint_strict``;
* per attribute ``val/coherence/c2i/<attr>``, ``val/coherence/i2c/<attr>``,
  ``val/coherence/joint/<attr>``; and ``val/coherence/i2c_parsed`` (parseable captions);

and the media: captioned grids of the first ``num_media`` samples of each mode (captions green
when every attribute is right) saved as PNGs under ``dirpath`` for every logger, sent as images
to wandb and TensorBoard, plus with wandb a ``wandb.Table`` of source image, ground-truth
caption, generated caption, its parsed attributes and which are right, and the image generated
from the caption with its attributes. Image attributes are read analytically (exact for this
renderer), captions with the grammar's exact parser (``jointgen.eval.coherence``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from jointgen.eval.joint_runner import coherence_suite, take
from jointgen.generate import annotate, eval_mode, samples_image, take_result

log = logging.getLogger(__name__)

MODES = ("c2i", "i2c", "joint")


def coherence_scalars(metrics: dict[str, dict[str, float]], prefix: str = "val/coherence"):
    """Flat metric names of ``coherence_suite``'s result (see the module docstring)."""
    out = {}
    for mode, m in metrics.items():
        out[f"{prefix}/{mode}_strict"] = m["strict"]
        if "parsed" in m and mode != "c2i":
            out[f"{prefix}/{mode}_parsed"] = m["parsed"]
        for key, value in m.items():
            if key.startswith("acc/"):
                out[f"{prefix}/{mode}/{key[4:]}"] = value
    return out


class CrossCoherence(Callback):
    """Logs cross and joint coherence (and media) of a joint VAE on a fixed validation subset.

    Works with any LightningModule whose ``net`` is a ``JointVAE`` and a datamodule with
    ``datasets["val"]`` (a ``ShapesDataset``), ``space`` and ``vocab`` (``ShapesDataModule``).

    Args:
        every_n_epochs: run after every n-th validation epoch.
        num_samples: validation pairs (the first ones of the split) and prior samples.
        temperature: latent temperature of every draw.
        log_table: send a ``wandb.Table`` of per-sample results to wandb loggers.
        num_media: samples per grid and table rows.
        dirpath: folder of the grid PNGs (``epoch_XXX_<mode>.png``); None: ``<log_dir>/coherence``.
        batch_size: samples per forward pass.
        seed: seed of the draws, the same every epoch so numbers compare across epochs.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 256,
        temperature: float = 1.0,
        log_table: bool = True,
        num_media: int = 16,
        dirpath: str | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1 or num_samples < 1 or num_media < 0:
            raise ValueError("need every_n_epochs >= 1, num_samples >= 1 and num_media >= 0")
        self.every_n_epochs, self.num_samples = every_n_epochs, num_samples
        self.temperature, self.log_table, self.num_media = temperature, log_table, num_media
        self.dirpath = Path(dirpath) if dirpath else None
        self.batch_size, self.seed = batch_size, seed
        self._data: dict | None = None

    # --- computation ------------------------------------------------------------------------

    def _subset(self, trainer: Trainer) -> dict | None:
        if self._data is None:
            dm = trainer.datamodule
            datasets = getattr(dm, "datasets", None) or {}
            if "val" not in datasets or not hasattr(dm, "space"):
                log.warning("CrossCoherence needs a ShapesDataModule-like datamodule; skipped")
                return None
            self._data = take(datasets["val"], self.num_samples)
        return self._data

    def compute(self, net, data: dict, space) -> tuple[dict[str, float], dict]:
        """Coherence scalars and the generated samples of a ``JointVAE`` on ``data``."""
        with eval_mode(net):
            metrics, gen = coherence_suite(
                net, data, space, temperature=self.temperature, num_joint=len(data["images"]),
                batch_size=self.batch_size, seed=self.seed,
            )  # fmt: skip
        return coherence_scalars(metrics), gen

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        net = getattr(pl_module, "net", None)
        if not hasattr(net, "caption_to_image"):
            return
        data = self._subset(trainer)
        if data is None:
            return
        space = trainer.datamodule.space
        scalars, gen = self.compute(net, data, space)
        for name, value in scalars.items():
            pl_module.log(name, value, rank_zero_only=True)
        if self.num_media > 0:
            self._media(trainer, gen, data, space)

    # --- media ------------------------------------------------------------------------------

    def _media(self, trainer: Trainer, gen: dict, data: dict, space) -> None:
        k, epoch, step = self.num_media, trainer.current_epoch, trainer.global_step
        folder = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "coherence"
        folder.mkdir(parents=True, exist_ok=True)
        subsets, records = {}, {}
        for mode in MODES:
            subsets[mode] = take_result(gen[mode], k)
            records[mode] = annotate(subsets[mode], space)
            grid = samples_image(subsets[mode], records[mode])
            grid.save(folder / f"epoch_{epoch:03d}_{mode}.png")
            for lg in trainer.loggers:
                if hasattr(lg, "log_image"):  # WandbLogger
                    lg.log_image(key=f"coherence/{mode}", images=[grid], step=step)
                elif hasattr(getattr(lg, "experiment", None), "add_image"):  # TensorBoard
                    array = np.asarray(grid)
                    lg.experiment.add_image(f"coherence/{mode}", array, step, dataformats="HWC")
        tables = [lg for lg in trainer.loggers if hasattr(lg, "log_table")]
        if self.log_table and tables:
            columns, rows = self._table(subsets, records)
            for lg in tables:
                lg.log_table(key="coherence/samples", columns=columns, data=rows, step=step)

    @staticmethod
    def _table(subsets: dict, records: dict) -> tuple[list[str], list[list]]:
        """Rows of source image, captions, parsed attributes and checks (image-to-caption),
        and the image generated from the same caption with its checks (caption-to-image)."""
        import wandb

        columns = [
            "index", "image", "caption", "generated caption", "parsed attributes",
            "caption right", "image from caption", "image attributes", "image right",
        ]  # fmt: skip
        rows = []
        i2c, c2i = subsets["i2c"], subsets["c2i"]
        for i, (ri, rc) in enumerate(zip(records["i2c"], records["c2i"])):
            rows.append([
                ri["index"],
                wandb.Image(i2c["source_images"][i].permute(1, 2, 0).numpy()),
                ri["source_caption"],
                ri["caption"],
                str(ri["caption_attrs"]),
                str(ri["right"]),
                wandb.Image(c2i["images"][i].clamp(0, 1).permute(1, 2, 0).numpy()),
                str(rc["image_attrs"]),
                str(rc["right"]),
            ])  # fmt: skip
        return columns, rows
