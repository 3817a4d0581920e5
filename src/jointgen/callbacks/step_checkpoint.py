"""Checkpoints every N optimizer steps, so a crash mid-epoch loses at most N steps."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` for ``every_n_train_steps`` that skips the epoch's last batch.

    The epoch-end checkpoint follows a moment later, and resuming from the very end of an
    epoch's batches (before its validation) is the one mid-epoch position Lightning cannot
    continue exactly: it would start a new epoch without validating the old one. Otherwise
    identical to ``ModelCheckpoint``; keep ``save_top_k=1`` (the newest step checkpoint).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
