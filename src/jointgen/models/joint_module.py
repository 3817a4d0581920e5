"""Lightning wrapper around the joint caption-image VAE: KL warm-up, lr schedule, logging.

The network and its bounds live in ``jointgen.models.joint`` (spec joint_vae.md §3); this module
wires them to Lightning. With the hierarchical NVAE image branch it adds the NVAE spectral and
BN regularisers of that branch (NVAE, Vahdat & Kautz 2020, §3.2 of the paper). The optimizer
comes in as a Hydra partial (``conf/model/joint.yaml``).

Logged: ``train/loss``, ``train/bound`` and every term of ``JointOutput.terms`` under
``train/`` (raw and scaled log-likelihood per modality, cross terms, ``kl/z``, ``kl/w_img``,
``kl/w_txt``); ``val/nelbo`` (minus the bound, nats per pair), ``val/nelbo_best``,
``val/bpd_img`` (the image-only bound of the joint model in bits/dim, see ``image_nll``),
``val/nll_txt`` (caption-only bound, nats), and the same terms under ``val/``.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device
from torchmetrics import MeanMetric, MinMetric

from jointgen.models.eval_seed import SeededEvaluation
from jointgen.models.joint import JointVAE
from jointgen.models.joint.distributions import log_mean_exp, standard
from jointgen.models.joint.image_nvae import NVAEImageBranch
from jointgen.models.nvae.objectives import SpectralRegularizer, bn_loss, lr_factor
from jointgen.models.nvae_module import NonFiniteLossError
from jointgen.models.schedule_clock import ScheduleClock, check_clock

log = logging.getLogger(__name__)


def warmup_coeff(step: int, total: int, fraction: float, delay: float = 0.0, floor: float = 0.0):
    """KL coefficient c(step) = max(min((step - delay) / T_warm, 1), floor) (spec §3.8).

    ``fraction`` and ``delay`` are shares of the ``total`` steps; ``fraction = 0`` means no
    warm-up (c = 1 from the first step).
    """
    warm = fraction * total
    if warm <= 0:
        return 1.0
    return float(max(min((step - delay * total) / warm, 1.0), floor))


class JointLitModule(ScheduleClock, SeededEvaluation, LightningModule):
    """Trains :class:`~jointgen.models.joint.JointVAE` on caption-image batches.

    Args:
        net: the joint VAE network.
        optimizer: partial of the optimizer (Adam by default).
        z_dim: size of the shared latent; both branches must be built with it (checked).
        kl_warmup_fraction: share of the training steps over which the KL coefficient rises
            linearly from 0 to 1 (spec §3.8: 0.3).
        kl_warmup_delay: share of the steps before the warm-up starts.
        kl_min: floor of the KL coefficient.
        lr_warmup_epochs: linear lr warm-up per step (fractional epochs allowed).
        lr_min: floor of the per-epoch cosine decay; null keeps the lr constant.
        weight_decay_norm: spectral + BN regularisation of an NVAE image branch (lambda).
        num_iw_samples_val / num_iw_samples_test: importance samples for ``bpd_img``.
        max_bad_steps: consecutive non-finite losses tolerated (each skipped) before stopping.
        eval_seed: validation and test draw their samples from this seed.
        prior_fit_steps: before each validation, refit the network's generation-time mixture
            priors (``caption_prior_components``, ``joint_prior_components``) with this many
            Adam steps on the posteriors of ``prior_fit_images`` training images
            (``JointVAE.fit_priors``); 0 = only their online fit.
        prior_fit_images, prior_fit_batch_size, prior_fit_lr: that refit's data and settings.
        schedule_clock: ``steps`` (KL warm-up and lr decay planned over ``max_epochs``) or
            ``time`` (they also follow the share of ``trainer.max_time`` used, so a slower
            machine still completes them; ``jointgen.models.schedule_clock``).
    """

    def __init__(
        self,
        net: JointVAE,
        optimizer: partial,
        z_dim: int = 32,
        kl_warmup_fraction: float = 0.3,
        kl_warmup_delay: float = 0.0,
        kl_min: float = 0.0,
        lr_warmup_epochs: float = 0.0,
        lr_min: float | None = None,
        weight_decay_norm: float = 1e-2,
        num_iw_samples_val: int = 1,
        num_iw_samples_test: int = 10,
        max_bad_steps: int = 20,
        eval_seed: int = 1234,
        prior_fit_steps: int = 0,
        prior_fit_images: int = 5000,
        prior_fit_batch_size: int = 256,
        prior_fit_lr: float = 1e-3,
        schedule_clock: str = "steps",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer"])
        check_clock(schedule_clock)
        if net.z_dim != z_dim:
            raise ValueError(f"model.z_dim={z_dim} but the branches use z_dim={net.z_dim}")
        if not 0 <= kl_warmup_fraction <= 1:
            raise ValueError(
                f"model.kl_warmup_fraction must be in [0, 1], got {kl_warmup_fraction}"
            )
        if prior_fit_steps < 0 or prior_fit_images < 1 or prior_fit_batch_size < 1:
            raise ValueError(
                "model.prior_fit_steps must be >= 0 and prior_fit_images, prior_fit_batch_size "
                f">= 1; got {prior_fit_steps}, {prior_fit_images}, {prior_fit_batch_size}"
            )
        self.net = net
        self.optimizer = optimizer
        img = net.branches["img"]
        self.nvae_image = isinstance(img, NVAEImageBranch)
        # spectral regularisation keeps the NVAE hierarchy stable (its u, v are buffers)
        self.sr = SpectralRegularizer(img.net) if self.nvae_image else None
        self.bad_steps = self.skipped_steps = 0
        self.bad_step_reason: str | None = None  # read by callbacks.nan_guard
        for stage in ("val", "test"):
            for name in ("nelbo", "bpd_img", "nll_txt"):
                setattr(self, f"{stage}_{name}", MeanMetric())
        self.val_nelbo_best = MinMetric()
        log.info("joint VAE likelihood scales: %s", net.likelihood_scales)

    # --- schedules --------------------------------------------------------------------------

    def _total_steps(self) -> int:
        t = self.trainer
        return 1 if t is None else max(int(t.estimated_stepping_batches), 1)

    def current_kl_coeff(self) -> float:
        h = self.hparams
        return warmup_coeff(
            self.schedule_step(),
            self._total_steps(),
            h.kl_warmup_fraction,
            h.kl_warmup_delay,
            h.kl_min,
        )

    # --- training ---------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int):
        k = self.current_kl_coeff()
        out = self.net(batch, kl_coeff=k)
        loss = out.loss
        extra = {}
        if self.nvae_image:
            lam = self.hparams.weight_decay_norm
            sr, bn = self.sr(self.net.branches["img"].net), bn_loss(self.net.branches["img"].net)
            loss = loss + lam * (sr + bn)
            extra = {"train/sr": sr, "train/bn_loss": bn}
        bad = not torch.isfinite(loss).item()
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            return self._skip_step(out.terms)
        self.bad_steps = 0
        bs = batch["tokens"].shape[0]
        self.log_dict(
            {"train/loss": loss, "train/bound": out.terms["bound"]},
            on_step=True, on_epoch=True, prog_bar=True, batch_size=bs,
        )  # fmt: skip
        scalars = {f"train/{n}": v for n, v in out.terms.items() if n != "bound"}
        scalars |= extra | {"train/kl_coeff": k, "train/skipped_steps": float(self.skipped_steps)}
        scalars["train/progress"] = self.schedule_step() / self._total_steps()
        self.log_dict(scalars, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def _skip_step(self, terms: dict) -> None:
        self.bad_steps += 1
        self.skipped_steps += 1
        culprits = [n for n, v in terms.items() if not torch.isfinite(v)] or ["a regulariser"]
        self.bad_step_reason = f"non-finite loss ({', '.join(culprits)})"
        log.warning(
            "non-finite loss at step %d (%s); step skipped (%d consecutive)",
            self.global_step, ", ".join(culprits), self.bad_steps,
        )  # fmt: skip
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        if self.bad_steps >= self.hparams.max_bad_steps:
            raise NonFiniteLossError(
                f"stopping: {self.bad_steps} consecutive non-finite losses at step "
                f"{self.global_step} (non-finite: {', '.join(culprits)}); the last good "
                "checkpoint is kept. Try a lower model.optimizer.lr or a longer "
                "model.kl_warmup_fraction"
            )
        return None

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def image_nll(self, images: torch.Tensor, K: int = 1) -> torch.Tensor:
        """Minus the image-only bound of the joint model, nats per image ``(B,)``.

        z ~ q_img(z | x) with prior N(0, I), w from its posterior: log-mean-exp over K samples
        of log p(x | z, w) + log p(z) - log q(z | x) + log p(w) - log q(w) (K = 1: the ELBO).
        This is the image marginal likelihood bound comparable with an image-only NVAE.
        """
        img = self.net.branches["img"]
        q, feats = img.expert(images)
        z = q.rsample(K)
        t = img.log_likelihood(images, z, feats)
        density = standard(self.net.family, z[0]).log_prob(z) - q.log_prob(z)
        return -log_mean_exp(t.log_px + t.log_ratio + density, 0)

    @torch.no_grad()
    def text_nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """Minus the caption-only ELBO, nats per caption ``(B,)``."""
        txt = self.net.branches["txt"]
        q, feats = txt.expert(tokens)
        z = q.rsample(1)
        t = txt.log_likelihood(tokens, z, feats)
        density = standard(self.net.family, z[0]).log_prob(z) - q.log_prob(z)
        return -(t.log_px + t.log_ratio + density)[0]

    def bits_per_dim(self, nll: torch.Tensor) -> torch.Tensor:
        """Image nats -> bits/dim. A continuous-density branch (``conv``) is turned into a
        discrete 8-bit figure with the bin width 1/256 (p(bin) ~ p(x)/256 per dimension), so
        its value is an approximation; the NVAE branch's logistic mixture is exact."""
        img = self.net.branches["img"]
        bpd = nll / (img.data_dim * math.log(2.0))
        return bpd if self.nvae_image else bpd + 8.0

    def _eval_step(self, batch: dict, stage: str, K: int) -> None:
        out = self.net(batch, kl_coeff=1.0)
        both = batch["mask_image"].bool() & batch["mask_text"].bool()
        getattr(self, f"{stage}_nelbo").update(-out.bound)
        if both.any():
            bpd = self.bits_per_dim(self.image_nll(batch["image"][both], K))
            getattr(self, f"{stage}_bpd_img").update(bpd)
            getattr(self, f"{stage}_nll_txt").update(self.text_nll(batch["tokens"][both]))
        bs = batch["tokens"].shape[0]
        for name in ("nelbo", "bpd_img", "nll_txt"):
            metric = getattr(self, f"{stage}_{name}")
            self.log(f"{stage}/{name}", metric, on_epoch=True, prog_bar=name == "nelbo")
        terms = {f"{stage}/{n}": v for n, v in out.terms.items() if n != "bound"}
        self.log_dict(terms, on_epoch=True, batch_size=bs)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()  # seeds the evaluation RNG: the refit is repeatable
        h, t = self.hparams, self.trainer
        if h.prior_fit_steps <= 0 or t.sanity_checking or t.datamodule is None:
            return
        if self.net.caption_prior is None and self.net.joint_prior is None:
            return
        nll = self.refit_priors(t.datamodule.train_dataloader())
        self.log_dict({f"val/refit_{k}": v for k, v in nll.items()}, sync_dist=True)

    def refit_priors(self, loader) -> dict[str, float]:
        """``JointVAE.fit_priors`` on the first ``prior_fit_images`` images of ``loader``;
        under DDP every rank then takes rank 0's priors, so the replicas stay identical."""
        h = self.hparams

        def batches():
            seen = 0
            for batch in loader:
                yield move_data_to_device(batch, self.device)
                seen += len(batch["image"])
                if seen >= h.prior_fit_images:
                    return

        # validation runs under inference mode; the fit needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            nll = self.net.fit_priors(
                batches(), h.prior_fit_steps, h.prior_fit_batch_size, h.prior_fit_lr
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for prior in (self.net.caption_prior, self.net.joint_prior):
                for p in prior.parameters() if prior is not None else ():
                    torch.distributed.broadcast(p.data, src=0)
        return nll

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.hparams.num_iw_samples_val)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.hparams.num_iw_samples_test)

    def on_validation_epoch_end(self) -> None:
        self._exit_eval_rng()
        if not self.trainer.sanity_checking:
            self.val_nelbo_best(self.val_nelbo.compute())
            self.log("val/nelbo_best", self.val_nelbo_best.compute(), prog_bar=True)

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def sample_images(self, n: int, temp: float = 1.0) -> torch.Tensor:
        """Images of ``n`` joint prior samples at latent temperature ``temp``."""
        return self.net.sample_joint(n, temp)["image"]

    def configure_optimizers(self):
        opt = self.optimizer(params=self.parameters())
        h = self.hparams
        if h.lr_min is None and h.lr_warmup_epochs <= 0:
            return opt
        t = self.trainer
        epochs = t.max_epochs if t is not None and t.max_epochs and t.max_epochs > 0 else 1
        lr = opt.param_groups[0]["lr"]
        fn = partial(
            lr_factor,
            steps_per_epoch=max(math.ceil(self._total_steps() / epochs), 1),
            warmup_epochs=h.lr_warmup_epochs,
            epochs=epochs,
            lr=lr,
            lr_min=lr if h.lr_min is None else h.lr_min,
        )
        sched = self.step_lr_scheduler(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
