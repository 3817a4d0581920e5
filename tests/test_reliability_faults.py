"""Numerical faults: NaN/inf steps are skipped and counted, then rolled back, then stopped."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from helpers import TINY_OVERRIDES, compose_cfg
from jointgen.callbacks.nan_guard import NaNGuard, NonFiniteTrainingError
from jointgen.utils.instantiate import instantiate_nodes
from jointgen.utils.runtime import build_trainer

# 64 images, batch 16: 4 steps per epoch; the end-of-epoch checkpoint at step 4 is the last
# good one when steps 5.. go bad
FAULT_OVERRIDES = TINY_OVERRIDES + [
    "logger=none",
    "~callbacks.sample_grid",
    "final_samples=0",
    "model.num_iw_samples_val=1",
    "model.max_bad_steps=100",  # NVAE's own hard stop stays out of the way
    "callbacks.nan_guard.patience=2",
    "callbacks.nan_guard.max_rollbacks=1",
    "callbacks.nan_guard.lr_factor=0.5",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than on a few contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(tmp_path, epochs=2, nan_loss_steps=(), nan_grad_steps=()):
    cfg = compose_cfg("train", FAULT_OVERRIDES + [f"trainer.max_epochs={epochs}"], tmp_path)
    pl.seed_everything(0)
    dm, model = instantiate(cfg.data), instantiate(cfg.model)
    ll = model.net.log_likelihood

    def poisoned_ll(out, x):  # NaN reconstruction term: NVAE itself flags the step
        v = ll(out, x)
        return v * float("nan") if model.global_step in nan_loss_steps else v

    model.net.log_likelihood = poisoned_ll
    # finite loss but a NaN gradient in one weight: only the guard's gradient check sees it
    weight = next(p for n, p in model.net.named_parameters() if n.endswith("weight"))
    weight.register_hook(lambda g: g * float("nan") if model.global_step in nan_grad_steps else g)
    trainer = build_trainer(cfg, instantiate_nodes(cfg.callbacks, "callbacks"), [])
    (guard,) = [c for c in trainer.callbacks if isinstance(c, NaNGuard)]
    return trainer, model, dm, guard


class _Watch(pl.Callback):
    """Parameters before and after each step, to prove bad steps change nothing."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = _params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = _params(pl_module)


def _params(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_bad_loss_and_bad_gradients_are_skipped_and_counted(tmp_path):
    trainer, model, dm, guard = _setup(tmp_path, nan_loss_steps={5}, nan_grad_steps={1})
    watch = _Watch()
    trainer.callbacks.append(watch)
    trainer.fit(model, datamodule=dm)
    assert guard.bad_steps == 2 and guard.rollbacks == 0
    for step in (1, 5):  # weights untouched by a bad step (BN running stats may move)
        assert _same(watch.before[step], watch.after[step]), step
    assert not _same(watch.before[2], watch.after[2])
    # AdaMax's per-parameter step counter skipped both bad steps
    opt = trainer.optimizers[0]
    assert {int(st["step"]) for st in opt.state.values()} == {trainer.global_step - 2}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_bad_steps_roll_back_with_a_lower_lr(tmp_path):
    trainer, model, dm, guard = _setup(tmp_path, nan_loss_steps={5, 6})
    snap = {}
    rollback = guard._rollback

    def spy(tr, module):
        snap["lr_before"] = tr.optimizers[0].param_groups[0]["lr"]
        rollback(tr, module)
        snap["state"] = copy.deepcopy(module.state_dict())
        snap["ckpt"] = torch.load(guard.last_rollback, weights_only=True)  # later overwritten
        snap["lr_after"] = tr.optimizers[0].param_groups[0]["lr"]

    guard._rollback = spy
    trainer.fit(model, datamodule=dm)
    assert guard.rollbacks == 1 and guard.bad_steps == 2
    assert guard.last_rollback.endswith(".ckpt")
    ckpt = snap["ckpt"]
    assert ckpt["global_step"] == 4
    assert _same(ckpt["state_dict"], snap["state"])  # weights and buffers as checkpointed
    assert snap["lr_after"] == pytest.approx(0.5 * snap["lr_before"])
    # the reduction persists through the schedule and into later checkpoints
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs[0] == pytest.approx(0.5 * 1e-2)
    assert trainer.global_step == 8 and guard.lr_scale == 0.5


def test_bad_steps_after_the_last_rollback_stop_with_a_message(tmp_path):
    trainer, model, dm, guard = _setup(tmp_path, epochs=3, nan_loss_steps=set(range(5, 100)))
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.fit(model, datamodule=dm)
    msg = str(err.value)
    assert "2 consecutive bad training steps at step 8" in msg
    assert "after 1 rollback(s)" in msg and "x0.5" in msg and "non-finite loss" in msg
    assert "epoch_000.ckpt" in msg or "last.ckpt" in msg
    ckpt = torch.load(guard.last_rollback, weights_only=True)["state_dict"]
    # skipped steps changed no weight (their forward passes still move BN statistics)
    assert _same(_params(model), {k: ckpt[k] for k in _params(model)})


class _Tiny(pl.LightningModule):
    """Not an NVAE: returns its loss, NaN on chosen steps, and signals nothing itself."""

    def __init__(self, bad_steps):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.bad = bad_steps

    def training_step(self, batch, batch_idx):
        loss = self.lin(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step in self.bad else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_guard_works_for_any_module(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    guard = NaNGuard(patience=3, max_rollbacks=0)
    trainer = pl.Trainer(
        max_steps=8,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = _Tiny(bad_steps={2, 3})
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert guard.bad_steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    model = _Tiny(bad_steps=set(range(2, 8)))
    guard = NaNGuard(patience=3, max_rollbacks=0)
    trainer = pl.Trainer(
        max_steps=8,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive bad training steps"):
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
