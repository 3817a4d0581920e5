"""Schedules that follow a time budget.

A run bounded by ``trainer.max_time`` stops after however many steps the machine manages, but
step-based schedules (KL warm-up, lr decay) are planned over ``max_epochs``: on a machine half
as fast the run ends mid-schedule, with the lr still high and, for short budgets, the KL still
warming up. With ``schedule_clock: time`` the schedules read the *schedule step*

    s = max(step, elapsed / max_time × planned steps),

i.e. the run is as far through its schedules as it is through its steps or its time budget,
whichever is further. On a machine fast enough to finish ``max_epochs`` in time nothing
changes; on a slower one the schedules complete when ``max_time`` stops training. The elapsed
time is Lightning's ``Timer`` callback's (training and in-fit validation), which it saves in
checkpoints, so a resumed run continues from where the clock stood. Runs under the time clock
are not step-for-step reproducible across machines; ``steps`` (the default) is.
"""

from __future__ import annotations

import torch

CLOCKS = ("steps", "time")


def check_clock(clock: str) -> None:
    if clock not in CLOCKS:
        raise ValueError(f"model.schedule_clock must be one of {CLOCKS}, got {clock!r}")


def clock_step(step: int, planned_steps: int, timer=None) -> float:
    """The schedule step: ``step``, or with a ``Timer`` that has a duration, the step at the
    same share of ``planned_steps`` as the elapsed share of the time budget, if further."""
    if timer is None:
        return float(step)
    remaining = timer.time_remaining("train")
    if remaining is None:  # Timer without a duration
        return float(step)
    elapsed = timer.time_elapsed("train")
    budget = elapsed + remaining
    if budget <= 0:
        return float(step)
    return max(float(step), elapsed / budget * planned_steps)


class ScheduleClock:
    """Mixin for a LightningModule with ``hparams.schedule_clock`` and ``_total_steps()``."""

    def _timer(self):
        from lightning.pytorch.callbacks import Timer

        t = self._trainer
        if t is None or self.hparams.schedule_clock != "time":
            return None
        return next((c for c in t.callbacks if isinstance(c, Timer)), None)

    def schedule_step(self) -> float:
        """The step the KL and lr schedules read (see the module docstring)."""
        return clock_step(self.global_step, self._total_steps(), self._timer())

    def step_lr_scheduler(self, optimizer, factor):
        """``LambdaLR`` of ``factor(step)``, stepped per optimizer step: on the step clock
        ``step`` is the scheduler's own count, on the time clock the schedule step."""
        if self.hparams.schedule_clock == "time":
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda _: factor(self.schedule_step())
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
