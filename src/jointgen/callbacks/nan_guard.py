"""Numerical-fault handling for any LightningModule: skip bad steps, roll back, then stop.

A training step is *bad* when

1. the module says so: it sets ``self.bad_step_reason = "<what was non-finite>"`` and returns
   ``None`` from ``training_step`` (Lightning then skips backward and the optimizer step);
   ``NVAELitModule`` does this for a non-finite loss; or
2. ``training_step`` returned a non-finite loss; or
3. a gradient is NaN or inf before the optimizer step (``check_grads``). The gradients are
   then dropped (``p.grad = None``), so the optimizer leaves every parameter and its state
   untouched. Under fp16 with a GradScaler this check is left to the scaler, whose skipped
   steps are routine while the loss scale settles, but cases 1 and 2 still count.

Bad steps are skipped and counted (``train/bad_steps``). After ``patience`` consecutive bad
steps the weights, buffers and optimizer state are restored from the newest checkpoint with
finite weights (written by any ``ModelCheckpoint``), and the learning rate is multiplied by
``lr_factor`` (in the optimizer and in each scheduler's base rates, so the reduction
persists). The loop counters, the data position and the schedules that are functions of the
global step (lr warm-up, KL warm-up) continue from where they were. After ``max_rollbacks``
rollbacks the next run of ``patience`` bad steps stops training with
:class:`NonFiniteTrainingError`. A module that keeps its own consecutive counter in
``bad_steps`` (NVAE's hard stop ``model.max_bad_steps``) has it reset after each rollback; keep
that limit above ``patience``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: bad steps persisted after every allowed rollback."""


class NaNGuard(Callback):
    """Skip and count non-finite steps; roll back with a lower lr; stop after ``max_rollbacks``.

    Args:
        patience: consecutive bad steps that trigger a rollback (or the final stop).
        lr_factor: learning-rate multiplier applied at each rollback, in (0, 1].
        max_rollbacks: rollbacks allowed before stopping (0: stop at the first streak).
        check_grads: look for NaN/inf gradients before every optimizer step.
    """

    def __init__(
        self,
        patience: int = 5,
        lr_factor: float = 0.5,
        max_rollbacks: int = 2,
        check_grads: bool = True,
    ) -> None:
        if patience < 1 or max_rollbacks < 0 or not 0.0 < lr_factor <= 1.0:
            raise ValueError(
                f"NaNGuard needs patience >= 1, max_rollbacks >= 0 and 0 < lr_factor <= 1, got "
                f"patience={patience}, max_rollbacks={max_rollbacks}, lr_factor={lr_factor}"
            )
        self.patience, self.lr_factor = patience, lr_factor
        self.max_rollbacks, self.check_grads = max_rollbacks, check_grads
        self.consecutive = 0
        self.bad_steps = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.last_rollback: str | None = None
        self._grad_reason: str | None = None
        self._step = 0

    # --- state saved in checkpoints ------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "bad_steps": self.bad_steps,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        self.bad_steps = int(state["bad_steps"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])

    # --- detection -----------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.bad_step_reason = None
        self._grad_reason = None
        self._step = trainer.global_step  # the step this batch is for, in messages

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.check_grads or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        params = [p for p in pl_module.parameters() if p.grad is not None]
        bad = False
        if params:
            # the inf-norm (max |g|) cannot overflow, and it is NaN as soon as one entry is
            norms = torch._foreach_norm([p.grad for p in params], float("inf"))
            bad = not bool(torch.stack(norms).isfinite().all())
        if trainer.world_size > 1:  # every rank takes part, with or without gradients
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        first = next((p for p in params if not p.grad.isfinite().all()), None)
        where = names.get(id(first), "another rank") if first is not None else "another rank"
        self._grad_reason = f"non-finite gradient (first in {where})"
        for p in params:
            p.grad = None  # optimizers skip parameters without a gradient

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        reason = getattr(pl_module, "bad_step_reason", None) or _loss_reason(outputs)
        reason = reason or self._grad_reason
        bad = reason is not None
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.bad_steps += 1
        reason = reason or "bad step on another rank"
        log.warning(
            "bad step %d skipped: %s (%d consecutive)",
            self._step,
            reason,
            self.consecutive,
        )
        pl_module.log("train/bad_steps", float(self.bad_steps), on_step=True, on_epoch=False)
        if self.consecutive < self.patience:
            return
        if self.rollbacks >= self.max_rollbacks:
            raise NonFiniteTrainingError(self._stop_message(trainer, reason))
        self._rollback(trainer, pl_module)

    # --- rollback ------------------------------------------------------------------------

    def _rollback(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = _last_good_checkpoint(trainer) if trainer.is_global_zero else None
        path = trainer.strategy.broadcast(path, src=0)  # every rank loads the same file
        if path is None:
            raise NonFiniteTrainingError(
                f"stopping: {self.consecutive} consecutive bad training steps at step "
                f"{self._step} and no checkpoint with finite weights to roll back to"
            )
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        pl_module.load_state_dict(ckpt["state_dict"])
        current = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        for opt, state, lrs in zip(trainer.optimizers, ckpt["optimizer_states"], current):
            opt.load_state_dict(state)
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr * self.lr_factor
                if "initial_lr" in g:
                    g["initial_lr"] *= self.lr_factor
        for cfg in trainer.lr_scheduler_configs:
            if hasattr(cfg.scheduler, "base_lrs"):
                cfg.scheduler.base_lrs = [lr * self.lr_factor for lr in cfg.scheduler.base_lrs]
        plugin_key = type(trainer.precision_plugin).__qualname__
        if plugin_key in ckpt:  # e.g. the GradScaler's state under fp16
            trainer.precision_plugin.load_state_dict(ckpt[plugin_key])
        if isinstance(getattr(pl_module, "bad_steps", None), int):
            pl_module.bad_steps = 0  # the module's own consecutive counter starts over
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        self.consecutive = 0
        self.last_rollback = str(path)
        log.warning(
            "rolled back to %s (rollback %d of %d); learning rate x%g",
            path,
            self.rollbacks,
            self.max_rollbacks,
            self.lr_scale,
        )
        pl_module.log("train/rollbacks", float(self.rollbacks), on_step=True, on_epoch=False)

    def _stop_message(self, trainer: Trainer, reason: str) -> str:
        good = self.last_rollback or _last_good_checkpoint(trainer) or "none written"
        return (
            f"stopping: {self.consecutive} consecutive bad training steps at step {self._step} "
            f"(last: {reason}) after {self.rollbacks} rollback(s) with the learning rate "
            f"lowered to x{self.lr_scale:g}; last good checkpoint: {good}. Check the data for "
            "corrupt inputs, lower the learning rate or raise the regularisation"
        )


def _loss_reason(outputs) -> str | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
        return "non-finite loss"
    return None


def _last_good_checkpoint(trainer: Trainer) -> Path | None:
    """The newest ``*.ckpt`` of any ModelCheckpoint folder whose weights are all finite."""
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath}
    files = [f for d in folders if d.is_dir() for f in d.glob("*.ckpt")]
    for f in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        except Exception:  # noqa: BLE001 - unreadable files are not candidates
            continue
        if all(v.isfinite().all() for v in state.values() if v.is_floating_point()):
            return f
    return None
