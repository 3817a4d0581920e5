"""Seeded evaluation shared by the LightningModules: validation and test draw their latent
samples from ``hparams.eval_seed`` (plus the rank), and the training RNG stream is saved before
and restored after, so a checkpoint always scores the same and training is not perturbed."""

from __future__ import annotations

import torch


class SeededEvaluation:
    """Mixin for a LightningModule with ``hparams.eval_seed``.

    ``on_validation_epoch_end`` of the module must call ``self._exit_eval_rng()`` first (it
    usually also logs best-so-far metrics); the test hooks are complete here.
    """

    def _enter_eval_rng(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._saved_rng = (torch.get_rng_state(), cuda)
        torch.manual_seed(self.hparams.eval_seed + self.global_rank)

    def _exit_eval_rng(self) -> None:
        cpu, cuda = self._saved_rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    def on_validation_epoch_start(self) -> None:
        self._enter_eval_rng()

    def on_test_epoch_start(self) -> None:
        self._enter_eval_rng()

    def on_test_epoch_end(self) -> None:
        self._exit_eval_rng()
