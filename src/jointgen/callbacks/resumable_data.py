"""Mid-epoch resumable training data: a reproducible shuffle and a loader that can skip ahead.

Lightning 2.x restores the fit loop's batch counter after a mid-epoch resume but restarts the
training DataLoader from its first batch, with a new shuffle drawn from the global RNG (the
``RandomSampler`` of ``shuffle=True`` takes its seed from ``torch`` at the start of each
epoch). The resumed epoch would then see other batches than the interrupted one. Here the
datamodule's training loader is rebuilt so that

* the order is a pure function of ``(seed, epoch)``: ``torch.randperm(n)`` from a generator
  seeded with ``PL_GLOBAL_SEED + epoch``, which is exactly what Lightning's
  ``DistributedSampler`` draws under DDP, so one process and N processes see the same global
  batches;
* the loader has ``state_dict``/``load_state_dict`` (Lightning's resumable-loader protocol):
  the checkpoint stores how many batches of the epoch were consumed, and the resumed loader
  skips that many batch *indices* without loading their samples;
* the worker base seed comes from a generator reseeded per epoch instead of the global RNG,
  so creating the loader on resume does not shift the restored RNG stream.

Exact for map-style datasets with ``num_workers=0``, and for workers whose transforms draw no
random numbers. Random augmentations inside worker processes are reproducible per epoch but
not across a mid-epoch resume (workers restart with the epoch's seed).
"""

from __future__ import annotations

import logging
import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

log = logging.getLogger(__name__)


class EpochShuffleSampler(RandomSampler):
    """A permutation per epoch from ``seed + epoch``; ``set_epoch`` is called by Lightning.

    It stays a ``RandomSampler`` so that under DDP Lightning still recognises a shuffled
    loader and swaps in its ``DistributedSampler`` (which uses the same permutation).

    Args:
        data_source: the dataset.
        seed: base seed (Lightning's ``PL_GLOBAL_SEED`` when None).
    """

    def __init__(self, data_source, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class _SkipBatches:
    """Index sampler that drops the first ``loader._skip_now`` batches (indices only)."""

    def __init__(self, base, loader: ResumableDataLoader) -> None:
        self.base, self.loader = base, loader

    def __len__(self) -> int:
        return len(self.base)  # the epoch keeps its full length for Lightning's counters

    def __iter__(self):
        it = iter(self.base)
        for _ in range(self.loader._skip_now):
            if next(it, None) is None:
                return
        yield from it


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the epoch is saved in checkpoints.

    ``state_dict()`` holds the epoch and the number of batches handed out this epoch;
    ``load_state_dict()`` makes the next iteration start after them.
    """

    _skip_pending = 0  # batches to skip at the next iteration (set on resume)
    _skip_now = 0  # batches skipped by the current iteration
    _yielded = 0  # batches of the current epoch handed out (including skipped ones)

    @property
    def _index_sampler(self):
        return _SkipBatches(super()._index_sampler, self)

    def _epoch_and_seed(self) -> tuple[int, int]:
        return int(getattr(self.sampler, "epoch", 0)), int(getattr(self.sampler, "seed", 0))

    def __iter__(self):
        # a generator: nothing runs until the first batch is requested, i.e. after Lightning
        # has called set_epoch() on the sampler, even with worker processes
        epoch, seed = self._epoch_and_seed()
        if self.generator is not None:
            self.generator.manual_seed(seed * 100_003 + epoch)
        self._skip_now, self._skip_pending = self._skip_pending, 0
        self._yielded = self._skip_now
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch_and_seed()[0], "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._skip_pending = int(state.get("batches", 0))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(state.get("epoch", 0)))


def make_resumable(loader):
    """Rebuild a plain ``DataLoader`` as a :class:`ResumableDataLoader` (others pass through).

    A shuffled loader gets an :class:`EpochShuffleSampler`; a sequential one keeps its order.
    """
    if isinstance(loader, ResumableDataLoader):
        return loader
    plain = (
        type(loader) is DataLoader
        and type(loader.batch_sampler) is BatchSampler
        and loader.batch_size is not None
        and hasattr(loader.dataset, "__len__")
    )
    if not plain:
        log.warning(
            "training loader %s is not a plain DataLoader: a mid-epoch resume restarts its epoch",
            type(loader).__name__,
        )
        return loader
    shuffled = isinstance(loader.sampler, RandomSampler)
    kwargs = dict(
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
        generator=torch.Generator(),
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if shuffled:
        kwargs["sampler"] = EpochShuffleSampler(loader.dataset)
    return ResumableDataLoader(loader.dataset, **kwargs)


class ResumableTrainData(Callback):
    """Makes the datamodule's training loader resumable mid-epoch (see the module docstring).

    Model-agnostic: it wraps ``trainer.datamodule.train_dataloader`` at ``setup("fit")``.
    Loaders passed to ``trainer.fit`` directly are left alone.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit" or dm is None or getattr(dm, "_jointgen_resumable", False):
            return
        original = dm.train_dataloader

        def train_dataloader():
            return make_resumable(original())

        train_dataloader.__wrapped__ = original  # Lightning's is_overridden() looks here
        dm.train_dataloader = train_dataloader
        dm._jointgen_resumable = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A module that reads trainer.estimated_stepping_batches in configure_optimizers (NVAE
        # does, for its schedules) makes Lightning build the train loader before the
        # checkpoint's loop state is restored, so Lightning never hands the loader its saved
        # position. Hand it over here; the loader's iteration has not started yet (it is
        # lazy). A no-op when Lightning already did it (the pending list is then empty).
        load = getattr(trainer.fit_loop, "_load_combined_loader_states", None)
        if load is not None:
            load()
