"""One failed DDP process stops every process of the job promptly and says which one failed.

With gloo, the surviving ranks usually fail at their next collective with "Connection closed
by peer"; with NCCL they can wait in that collective until the process-group timeout (tens of
minutes). This callback adds a watcher thread to every process of a multi-process run:

* the process that launched the others (local rank 0 under Lightning's DDP launcher) polls
  them; when one exits with a non-zero code it prints ``error: local rank N exited with code
  C`` and ends the whole job (its other children included) with exit status 1;
* every other process watches its parent (the launcher, torchrun's agent or SLURM's step
  daemon) and exits with status 1 when that parent disappears.

Under torchrun and ``srun --kill-on-bad-exit=1`` the launcher already ends the remaining
processes; the watcher then only adds the message.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from lightning.pytorch import Callback, LightningModule, Trainer


class RankWatchdog(Callback):
    """Ends all processes of a distributed run when one of them dies.

    Args:
        poll_s: seconds between checks.
    """

    def __init__(self, poll_s: float = 1.0) -> None:
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or self._thread is not None:
            return
        procs = getattr(trainer.strategy.launcher, "procs", None) or []
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(list(procs), os.getppid()), daemon=True
        )
        self._thread.start()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop.set()
        self._thread = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # a collective that failed because a peer died: name the peer, not only the symptom
        procs = getattr(trainer.strategy.launcher, "procs", None) or []
        for _ in range(int(5 / self.poll_s) + 1):
            failed = _failed(procs)
            if failed or not procs:
                break
            time.sleep(self.poll_s)
        if failed:
            rank, code = failed
            print(f"error: local rank {rank} exited with code {code}; stopping", file=sys.stderr)

    def _watch(self, procs: list, parent: int) -> None:
        while not self._stop.wait(self.poll_s):
            failed = _failed(procs)
            if failed:
                rank, code = failed
                _abort(f"local rank {rank} exited with code {code}; stopping every rank", procs)
            if not procs and os.getppid() != parent:
                _abort("the process that launched this rank is gone; stopping this rank", procs)


def _failed(procs: list) -> tuple[int, int] | None:
    for i, p in enumerate(procs, start=1):
        code = p.poll()
        if code not in (None, 0):
            return i, code
    return None


def _abort(message: str, procs: list) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    for p in procs:
        if p.poll() is None:
            p.kill()
    os._exit(1)  # the main thread may be blocked inside a collective; do not wait for it
