"""Lightning wrapper of the SEJE network: manual optimisation with a discriminator, the two-stage
plateau schedule and retrieval validation.

Paper: Xie, Liu et al., SEJE, ACM TOIS 40(4), 2022, arXiv 2110.11592 (code: git-disl/SEJE).
The network and losses live in ``jointgen.models.seje``; optimizers come in as Hydra partials
(``conf/model/seje.yaml``). Spec ``seje.md`` §3-4 and §6.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics import MaxMetric, MeanMetric

from jointgen.eval.retrieval import RecipeRetrieval, size_label
from jointgen.models.seje import SEJE
from jointgen.models.seje.image import class_name_tokens, load_state_file
from jointgen.models.seje.losses import (
    ADV_LOSSES,
    category_loss,
    discriminator_loss,
    generator_loss,
    triplet_loss,
)

log = logging.getLogger(__name__)


class TwoStagePlateau(Callback):
    """SEJE's schedule (spec §4, D8): count validation epochs since the best ``val/score``.

    Stage 1: after ``lr_patience`` stale epochs every learning rate (both optimizers) becomes
    ``lr_after``, stage 2 starts and the counter resets. Stage 2: after ``stop_patience``
    stale epochs training stops. The reset is why this is not ReduceLROnPlateau plus
    EarlyStopping. State is saved in checkpoints.
    """

    def __init__(
        self,
        monitor: str = "val/score",
        lr_patience: int = 3,
        stop_patience: int = 10,
        lr_after: float = 1e-5,
    ) -> None:
        self.monitor, self.lr_patience = monitor, lr_patience
        self.stop_patience, self.lr_after = stop_patience, lr_after
        self.best, self.stale, self.stage = float("-inf"), 0, 1

    @property
    def state_key(self) -> str:
        return f"TwoStagePlateau[{self.monitor}]"

    def state_dict(self) -> dict:
        return {"best": self.best, "stale": self.stale, "stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.stale, self.stage = state["best"], state["stale"], state["stage"]

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if score > self.best:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
        if self.stage == 1 and self.stale >= self.lr_patience:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = self.lr_after
            self.stage, self.stale = 2, 0
            log.info("val plateau: every lr set to %g (stage 2)", self.lr_after)
        elif self.stage == 2 and self.stale >= self.stop_patience:
            trainer.should_stop = True
            log.info("val plateau in stage 2: stopping")


class SEJELitModule(LightningModule):
    """Trains :class:`~jointgen.models.seje.SEJE` (spec §3.5):
    ``L = L_tri + w_cat (CE_v + CE_r) + w_adv L_G``, plus the discriminator's own step.

    Args:
        net: The SEJE network (may still lack its data-sized parts; they are built in
            ``configure_model`` from the datamodule's sizes and word vectors).
        optimizer: Partial of the main optimizer (Adam, lr 1e-4, two groups: rest and CNN).
        disc_optimizer: Partial of the discriminator optimizer (Adam 1e-4, betas (0.5, 0.999)).
        cnn_lr_mult: CNN group lr = main lr x this (1 in SEJE).
        gamma / margin: Soft-margin triplet scale (16) and margin (0).
        triplet: ``soft`` (SEJE) | ``hinge`` (MSJE, margin 0.2).
        negatives: ``instance`` | ``instance_class``.
        unknown_class: Category never treated as shared by ``instance_class`` (0 = background).
        category_weight: Weight of each category CE (0.005; 0 disables the term).
        category_ignore_index: Class left out of the CE (0 for classes1M background; None for
            SEJE's 1005 classes).
        adv_loss: ``bce`` | ``wgan_gp`` | ``none``.
        adv_weight: Weight of the alignment (generator) term (0.005).
        gp_weight: Gradient-penalty weight for ``wgan_gp`` (10).
        plateau: Two-stage schedule ``{lr_patience, stop_patience, lr_after}`` or None.
        val_bag_size / val_bags: Validation retrieval bags (1000, 10).
        test_bag_sizes / test_bags: Test retrieval bags ((1000, 10000), (10, 10)).
        eval_seed: Bag seed (1234).
        distance: ``euclidean`` | ``cosine`` | ``dot`` for ranking.
        score_weights: val/score = w1 R@1 + w5 R@5 + w10 R@10 (i2r; 1, 0.8, 0.6).
        category_classifier: Local state-dict file of the image classifier for f_cat (with
            ``category_class_names``, a text file of its class names); None = f_cat off.
        category_class_names: See above.
        max_bad_steps: Consecutive non-finite losses (each skipped) before stopping.
        init_seed: Seed of the initial weights of the data-sized parts (recipe encoder,
            semantic branch, f_cat), built in ``configure_model`` once the data are known: they
            depend on it alone, not on what ran since seeding (data preparation, Lightning's
            DDP reseeding), so one process and every DDP rank start alike. The configs pass
            the run's ``seed``; None draws them from the global RNG stream.

    Under DDP the batch-hard triplet loss is computed over the global batch (every rank's
    embeddings, gathered), as one process with the same global batch would; see
    :meth:`_global_batch`.
    """

    def __init__(
        self,
        net: SEJE,
        optimizer: partial,
        disc_optimizer: partial,
        cnn_lr_mult: float = 1.0,
        gamma: float = 16.0,
        margin: float = 0.0,
        triplet: str = "soft",
        negatives: str = "instance",
        unknown_class: int | None = 0,
        category_weight: float = 0.005,
        category_ignore_index: int | None = 0,
        adv_loss: str = "bce",
        adv_weight: float = 0.005,
        gp_weight: float = 10.0,
        plateau: dict | None = None,
        val_bag_size: int = 1000,
        val_bags: int = 10,
        test_bag_sizes: tuple[int, ...] = (1000, 10000),
        test_bags: tuple[int, ...] = (10, 10),
        eval_seed: int = 1234,
        distance: str = "euclidean",
        score_weights: tuple[float, float, float] = (1.0, 0.8, 0.6),
        category_classifier: str | None = None,
        category_class_names: str | None = None,
        max_bad_steps: int = 20,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        if adv_loss not in ADV_LOSSES:
            raise ValueError(f"model.adv_loss must be one of {ADV_LOSSES}, got {adv_loss!r}")
        if (category_classifier is None) != (category_class_names is None):
            raise ValueError("set both model.category_classifier and category_class_names")
        # plain containers (not Hydra's DictConfig/ListConfig), so checkpoints load with
        # weights_only=True
        plateau = {str(k): v for k, v in plateau.items()} if plateau else None
        test_bag_sizes = tuple(int(n) for n in test_bag_sizes)
        test_bags = tuple(int(n) for n in test_bags)
        score_weights = tuple(float(w) for w in score_weights)
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "disc_optimizer"])
        self.automatic_optimization = False  # the discriminator has its own optimizer
        self.net = net
        self.optimizer, self.disc_optimizer = optimizer, disc_optimizer
        self.val_loss, self.val_score_best = MeanMetric(), MaxMetric()
        self.val_retrieval = RecipeRetrieval((val_bag_size,), val_bags, eval_seed, metric=distance)
        self.test_retrieval = RecipeRetrieval(
            tuple(test_bag_sizes), tuple(test_bags), eval_seed, metric=distance
        )
        self.bad_steps = 0
        self.bad_step_reason: str | None = None
        self._weights_loaded = False

    # --- building from the data -----------------------------------------------------------

    def configure_model(self) -> None:
        """Build the data-sized parts from ``trainer.datamodule`` (sizes, word vectors) and,
        when fitting, load the CNN's initial weights (``image_weights`` / ``pretrained``)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None and not self.net.built:
            raise RuntimeError("SEJE needs a datamodule (or explicit sizes) to be built")
        if dm is not None:
            from jointgen.utils.checks import ConfigError

            # the official-LMDB datamodule has no vocabulary or key-term vector (f_term comes
            # precomputed): minimal unused tables stand in
            sizes = (
                getattr(dm, "vocab_size", 3),
                getattr(dm, "num_keyterms", 1),
                getattr(dm, "num_classes", 1),
            )
            if self.net.built:
                try:
                    self.net.check_sizes(*sizes)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            else:
                self.net.build(*sizes, **self._data_tensors(dm), seed=self.hparams.init_seed)
        # only when fitting: a restored checkpoint overwrites them anyway, and evaluation must
        # not need the ImageNet file
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and not self._weights_loaded:
            self._weights_loaded = self.net.image.load_weights() or True

    def _data_tensors(self, dm) -> dict:
        from jointgen.data.word2vec import load_vectors, word_index

        out: dict = {}
        path = getattr(dm, "word_vectors_path", None)
        words = None
        if path and Path(path).is_file():
            words, vectors = load_vectors(path)
            out["word_vectors"] = torch.from_numpy(vectors)
        kt_ids = getattr(dm, "keyterm_word_ids", None)
        if kt_ids is not None and len(kt_ids) == dm.num_keyterms:
            out["keyterm_word_ids"] = kt_ids
        if self.hparams.category_classifier:
            if words is None:
                raise FileNotFoundError("f_cat needs the word2vec file (data word_vectors_path)")
            names = Path(self.hparams.category_class_names).read_text().split()
            out["category_tokens"] = class_name_tokens(names, word_index(words))
            out["category_state"] = load_state_file(self.hparams.category_classifier)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.net.built:  # a fresh model from the config: sizes come from the weights
            self.net.build_from_state_dict(state_dict, prefix="net.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def configure_callbacks(self):
        p = self.hparams.plateau
        return [TwoStagePlateau("val/score", **p)] if p else []

    # --- training -------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        """``(world size, global rank)``; ``(1, 0)`` outside a distributed run."""
        if self._trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _global_batch(self, *local: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor of this rank's batch extended to the global batch: every rank's rows in
        rank order (all ranks have the same batch size in training). Only this rank's rows
        carry a gradient. One process: the tensors unchanged.

        Batch-hard mining needs the whole batch: within each rank's share the hardest
        negatives would be drawn from 1/world of the candidates, a different (easier) loss
        than one process with the same global batch.
        """
        world, rank = self._world()
        if world == 1:
            return list(local)
        out = []
        for t in local:
            parts = list(self.all_gather(t).unbind(0))  # (world, B, ...), without gradient
            parts[rank] = t
            out.append(torch.cat(parts))
        return out

    def _losses(self, out, batch) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """``(loss, terms, objective)``: the loss to log, its terms, and what to
        differentiate (the loss itself in one process)."""
        h = self.hparams
        world = self._world()[0]
        img, rec, labels = self._global_batch(out.img, out.rec, batch["category"])
        tri, stats = triplet_loss(
            img, rec, labels, h.gamma, h.margin, h.negatives, h.triplet, h.unknown_class
        )
        terms = {"triplet": tri, **stats}
        loss = tri
        # every rank computes the same global triplet loss but differentiates it through its
        # own rows only, and DDP averages the ranks' gradients: scaled by the world size, that
        # average is the sum of the ranks' parts, one process's gradient over the global batch
        objective = world * tri
        if h.category_weight > 0:
            ignore = h.category_ignore_index
            count = None  # one process: the batch's labelled items
            if world > 1 and ignore is not None:  # global count: DDP's mean is then exact
                count = (labels != ignore).sum().clamp_min(1) / world
            ce_v, ce_r = category_loss(
                out.logits_img, out.logits_rec, batch["category"], ignore, count
            )
            loss = loss + h.category_weight * (ce_v + ce_r)
            objective = objective + h.category_weight * (ce_v + ce_r)
            terms |= {"ce_img": ce_v, "ce_rec": ce_r}
        if h.adv_loss != "none" and h.adv_weight > 0:
            g = generator_loss(self.net.discriminator, out.rec, h.adv_loss)
            loss = loss + h.adv_weight * g
            objective = objective + h.adv_weight * g
            terms["adv_g"] = g
        return loss, terms, objective

    def training_step(self, batch: dict, batch_idx: int):
        opt, d_opt = self.optimizers()
        h = self.hparams
        out = self.net(batch)
        terms: dict = {}
        if h.adv_loss != "none" and h.adv_weight > 0:  # D first, on detached embeddings
            d_loss = discriminator_loss(
                self.net.discriminator, out.img, out.rec, h.adv_loss, h.gp_weight
            )
            if torch.isfinite(d_loss):
                d_opt.zero_grad()
                self.manual_backward(d_loss)
                d_opt.step()
            terms["adv_d"] = d_loss
        loss, more, objective = self._losses(out, batch)
        terms |= more
        if not torch.isfinite(loss):
            return self._skip(terms)
        self.bad_steps = 0
        opt.zero_grad()
        self.manual_backward(objective)
        opt.step()
        bs = batch["image"].shape[0]
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=bs)  # fmt: skip
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=bs)
        return {"loss": loss.detach()}

    def _skip(self, terms: dict):
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        self.bad_steps += 1
        self.bad_step_reason = f"non-finite loss ({', '.join(bad) or 'total'})"
        log.warning("step %d skipped: %s", self.global_step, self.bad_step_reason)
        if self.bad_steps >= self.hparams.max_bad_steps:
            raise RuntimeError(
                f"stopping: {self.bad_steps} consecutive non-finite SEJE losses ({bad}); "
                "lower model.optimizer.lr or check the data"
            )
        return None

    # --- evaluation -----------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        out = self.net(batch)
        if len(out.img) > 1:
            loss, _ = triplet_loss(
                out.img, out.rec, gamma=h.gamma, margin=h.margin, kind=h.triplet
            )
            self.val_loss.update(loss)
        self.val_retrieval.update(out.img, out.rec, batch.get("id"))

    def on_validation_epoch_end(self) -> None:
        res = {k: float(v) for k, v in self.val_retrieval.compute().items()}
        self.val_retrieval.reset()
        s = size_label(self.hparams.val_bag_size)
        w1, w5, w10 = self.hparams.score_weights
        score = w1 * res[f"r1_i2r_{s}"] + w5 * res[f"r5_i2r_{s}"] + w10 * res[f"r10_i2r_{s}"]
        logs = {"val/score": score}
        for d in ("i2r", "r2i"):
            for stat in ("medr", "r1", "r5", "r10"):
                logs[f"val/{stat}_{d}"] = res[f"{stat}_{d}_{s}"]
        if self.val_loss.update_called:
            logs["val/loss"] = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict(logs, prog_bar=False)
        self.log("val/medr", logs["val/medr_i2r"], prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_score_best(torch.tensor(score, device=self.device))
            self.log("val/score_best", self.val_score_best.compute(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.test_retrieval.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        out = self.net(batch)
        self.test_retrieval.update(out.img, out.rec, batch.get("id"))

    def on_test_epoch_end(self) -> None:
        res = self.test_retrieval.compute()
        self.log_dict({f"test/{k}": v for k, v in res.items()})

    def configure_optimizers(self):
        cnn, rest = self.net.parameter_groups()
        lr = self.optimizer.keywords.get("lr", 1e-4)
        groups = [{"params": rest}]
        if cnn:
            groups.append({"params": cnn, "lr": lr * self.hparams.cnn_lr_mult})
        opt = self.optimizer(params=groups)
        d_opt = self.disc_optimizer(params=self.net.discriminator.parameters())
        return [opt, d_opt]
