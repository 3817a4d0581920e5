"""Lightning wrapper around the NVAE network: objective, schedules, metrics and fault handling.

The network, its objective pieces and the schedules live in ``jointgen.models.nvae``; this
module only wires them to Lightning and logs. Optimizer comes in as a Hydra partial
(``conf/model/nvae.yaml``).
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric, MinMetric

from jointgen.models.eval_seed import SeededEvaluation
from jointgen.models.nvae import NVAE
from jointgen.models.nvae.objectives import (
    SpectralRegularizer,
    balance_alphas,
    balanced_kl,
    bits_per_dim,
    bn_loss,
    iw_log_likelihood,
    kl_coeff,
    lr_factor,
    reg_coeff,
)
from jointgen.models.schedule_clock import ScheduleClock, check_clock

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite training losses."""


class NVAELitModule(ScheduleClock, SeededEvaluation, LightningModule):
    """Trains :class:`~jointgen.models.nvae.NVAE` with the NVAE objective.

    ``loss = mean_batch(recon + k * KL_bal) + lam * SR + lam * BN`` (spec section 2).

    Args:
        net: the NVAE network.
        optimizer: partial of the optimizer (AdaMax, eps 1e-3, weight decay 3e-4).
        warmup_epochs: linear lr warm-up length in epochs (per-step update; may be fractional).
        lr_min: floor of the per-epoch cosine decay.
        kl_anneal_portion / kl_const_portion / kl_const_coeff: KL warm-up (section 2.2).
        kl_balance: NVAE KL balancing while the KL coefficient is below 1.
        weight_decay_norm: lambda, coefficient of spectral and BN regularisation.
        weight_decay_norm_init / weight_decay_norm_anneal: anneal lambda from ``init``.
        sr_iters / sr_first_iters: power iterations per step / on the first call.
        num_iw_samples_val: importance samples for ``val/bpd`` (10 in the reference).
        num_iw_samples_test: importance samples for ``test/bpd`` (1000 for paper numbers).
        max_bad_steps: consecutive non-finite losses tolerated (each skipped) before stopping.
        compile: wrap the network in ``torch.compile`` for training.
        eval_seed: validation and test draw their latent samples from this seed (the training
            RNG stream is saved and restored), so a checkpoint always scores the same.
        schedule_clock: ``steps``, or ``time``: the KL and lr schedules also follow the share
            of ``trainer.max_time`` used (``jointgen.models.schedule_clock``).
    """

    def __init__(
        self,
        net: NVAE,
        optimizer: partial,
        warmup_epochs: float = 5.0,
        lr_min: float = 1e-4,
        kl_anneal_portion: float = 0.3,
        kl_const_portion: float = 1e-4,
        kl_const_coeff: float = 1e-4,
        kl_balance: bool = True,
        weight_decay_norm: float = 1e-2,
        weight_decay_norm_init: float = 10.0,
        weight_decay_norm_anneal: bool = False,
        sr_iters: int = 4,
        sr_first_iters: int = 40,
        num_iw_samples_val: int = 10,
        num_iw_samples_test: int = 1000,
        max_bad_steps: int = 20,
        compile: bool = False,
        eval_seed: int = 1234,
        schedule_clock: str = "steps",
    ) -> None:
        super().__init__()
        check_clock(schedule_clock)
        # primitives only, so checkpoints load with weights_only=True; the optimizer partial
        # is kept as an attribute and the full config is stored by the entry point
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer"])
        self.optimizer = optimizer
        self.net = net
        self.sr = SpectralRegularizer(net, sr_iters, sr_first_iters)
        self.register_buffer("alphas", balance_alphas(net.groups), persistent=False)
        self.num_dims = net.in_channels * net.image_size**2
        self.bad_steps = 0
        self.skipped_steps = 0
        # bad-step signal read by jointgen.callbacks.nan_guard.NaNGuard (None: step was fine)
        self.bad_step_reason: str | None = None
        object.__setattr__(self, "_fwd", net)  # not a submodule: keeps state_dict keys clean
        for stage in ("val", "test"):
            for name in ("nelbo_bpd", "bpd", "nll"):
                setattr(self, f"{stage}_{name}", MeanMetric())
        self.val_bpd_best = MinMetric()
        self._kl_channel_sum: list[torch.Tensor] | None = None
        self._kl_group_sum: torch.Tensor | None = None
        self._n_val = 0
        # mean KL per group and per latent channel of the last validation epoch, read by
        # jointgen.callbacks.wandb_media.NVAEMedia
        self.val_kl_stats: dict | None = None

    # --- schedule helpers ----------------------------------------------------------------

    def _total_steps(self) -> int:
        t = self.trainer
        if t is None:
            return 1
        return max(int(t.estimated_stepping_batches), 1)

    def _steps_per_epoch(self) -> int:
        t = self.trainer
        epochs = t.max_epochs if t is not None and t.max_epochs and t.max_epochs > 0 else 1
        return max(math.ceil(self._total_steps() / epochs), 1)

    def current_kl_coeff(self) -> float:
        h = self.hparams
        return kl_coeff(
            self.schedule_step(),
            self._total_steps(),
            h.kl_anneal_portion,
            h.kl_const_portion,
            h.kl_const_coeff,
        )

    # --- lightning hooks -----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            object.__setattr__(self, "_fwd", torch.compile(self.net))

    def _nelbo_terms(self, x: torch.Tensor, net=None):
        out = (net or self.net)(x)
        recon = -self.net.log_likelihood(out, x)
        return out, recon

    def training_step(self, batch: dict, batch_idx: int):
        x = batch["image"]
        out, recon = self._nelbo_terms(x, self._fwd)
        k = self.current_kl_coeff()
        if self.hparams.kl_balance:
            kl_bal, coeffs = balanced_kl(out.kl, self.alphas, k)
        else:
            kl_bal, coeffs = out.kl.sum(1), torch.ones(out.kl.shape[1])
        lam = reg_coeff(
            k,
            self.hparams.weight_decay_norm,
            self.hparams.weight_decay_norm_init,
            self.hparams.weight_decay_norm_anneal,
        )
        sr = self.sr(self.net)
        bn = bn_loss(self.net)
        nelbo = recon + k * kl_bal
        loss = nelbo.mean() + lam * sr + lam * bn

        bad = not torch.isfinite(loss).item()
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            return self._skip_step(out, recon, sr, bn)
        self.bad_steps = 0

        kl = out.kl.sum(1).mean()
        bs = x.shape[0]
        self.log_dict(
            {
                "train/loss": loss,
                "train/recon": recon.mean(),
                "train/kl": kl,
                "train/nelbo_bpd": bits_per_dim(recon.mean() + kl, self.num_dims),
            },
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=bs,
        )
        self.log_dict(
            {
                "train/kl_coeff": k,
                "train/lambda": lam,
                "train/sr": sr,
                "train/bn_loss": bn,
                "train/skipped_steps": float(self.skipped_steps),
            },
            on_step=True,
            on_epoch=False,
            batch_size=bs,
        )
        if batch_idx % 50 == 0:
            self.log_dict(
                {f"train/kl_group/{i:02d}": v for i, v in enumerate(out.kl.mean(0))}
                | {f"train/kl_balance_coeff/{i:02d}": v for i, v in enumerate(coeffs)},
                on_step=True,
                on_epoch=False,
                batch_size=bs,
            )
        return loss

    def _skip_step(self, out, recon, sr, bn):
        self.bad_steps += 1
        self.skipped_steps += 1
        culprit = _first_non_finite(out, recon, sr, bn)
        self.bad_step_reason = f"non-finite loss ({culprit})"
        log.warning(
            "non-finite loss at step %d (%s); step skipped (%d consecutive)",
            self.global_step,
            culprit,
            self.bad_steps,
        )
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        if self.bad_steps >= self.hparams.max_bad_steps:
            raise NonFiniteLossError(
                f"stopping: {self.bad_steps} consecutive non-finite losses at step "
                f"{self.global_step} (first culprit: {culprit}); the last good checkpoint is "
                "kept. "
                "Try a lower model.optimizer.lr (5e-3 or 1e-3 for small batches), a larger "
                "model.weight_decay_norm, or check the data for corrupt images"
            )
        return None

    def _eval_step(self, batch: dict, stage: str, num_iw: int) -> None:
        x = batch["image"]
        out, recon = self._nelbo_terms(x)
        nelbo = recon + out.kl.sum(1)  # validation always uses the unbalanced KL
        nll = -iw_log_likelihood(self.net, x, num_iw) if num_iw > 1 else nelbo
        getattr(self, f"{stage}_nelbo_bpd").update(bits_per_dim(nelbo, self.num_dims))
        getattr(self, f"{stage}_bpd").update(bits_per_dim(nll, self.num_dims))
        getattr(self, f"{stage}_nll").update(nll)
        self.log(f"{stage}/nelbo_bpd", getattr(self, f"{stage}_nelbo_bpd"), on_epoch=True)
        self.log(f"{stage}/bpd", getattr(self, f"{stage}_bpd"), on_epoch=True, prog_bar=True)
        self.log(f"{stage}/nll", getattr(self, f"{stage}_nll"), on_epoch=True)
        if stage == "val":
            kpc = [k.detach().sum(0) for k in out.kl_per_channel]
            kg = out.kl.detach().sum(0)
            if self._kl_channel_sum is None:
                self._kl_channel_sum, self._kl_group_sum = kpc, kg
            else:
                self._kl_channel_sum = [a + b for a, b in zip(self._kl_channel_sum, kpc)]
                self._kl_group_sum = self._kl_group_sum + kg
            self._n_val += x.shape[0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.hparams.num_iw_samples_val)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.hparams.num_iw_samples_test)

    def on_validation_epoch_end(self) -> None:
        self._exit_eval_rng()
        if not self.trainer.sanity_checking:
            self.val_bpd_best(self.val_bpd.compute())
            self.log("val/bpd_best", self.val_bpd_best.compute(), prog_bar=True)
        if self._kl_channel_sum is not None and self._n_val > 0:
            per_ch = [k / self._n_val for k in self._kl_channel_sum]
            active = sum(int((k > 0.1).sum()) for k in per_ch)
            self.log("val/active_units", float(active))
            for i, v in enumerate(self._kl_group_sum / self._n_val):
                self.log(f"val/kl_group/{i:02d}", v)
            self.val_kl_stats = {
                "kl_group": (self._kl_group_sum / self._n_val).cpu(),
                "kl_channel": [k.cpu() for k in per_ch],
            }
        self._kl_channel_sum, self._kl_group_sum, self._n_val = None, None, 0

    @torch.no_grad()
    def sample_images(self, n: int, temp: float = 1.0) -> torch.Tensor:
        """Decoder means of ``n`` prior samples at latent temperature ``temp``."""
        return self.net.sample(n, temp)

    def configure_optimizers(self):
        opt = self.optimizer(params=self.net.parameters())
        lr = opt.param_groups[0]["lr"]
        fn = partial(
            lr_factor,
            steps_per_epoch=self._steps_per_epoch(),
            warmup_epochs=self.hparams.warmup_epochs,
            epochs=self.trainer.max_epochs if self.trainer.max_epochs > 0 else 1,
            lr=lr,
            lr_min=self.hparams.lr_min,
        )
        sched = self.step_lr_scheduler(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _first_non_finite(out, recon, sr, bn) -> str:
    if not torch.isfinite(recon).all():
        return "reconstruction term"
    bad = (~torch.isfinite(out.kl)).any(0).nonzero().flatten().tolist()
    if bad:
        return f"KL of latent group(s) {bad}"
    if not torch.isfinite(sr):
        return "spectral regulariser"
    if not torch.isfinite(bn):
        return "BN penalty"
    return "unknown term"
