"""wandb media for the NVAE and SEJE families (the joint VAE's come from ``CrossCoherence``).

Each callback acts only on rank zero, only when a ``WandbLogger`` is attached, and only on its
own model family, so all of them can sit in ``conf/callbacks/default.yaml`` and cost nothing
with ``logger=csv``. Nothing here runs a collective op, so DDP ranks never wait on each other.

Keys (wandb groups panels by the prefix before the slash):

* NVAE: ``val/reconstructions`` (originals above their reconstructions) and ``val/kl_groups``
  (a table of mean KL, active and total units per latent group, with a bar chart
  ``val/kl_groups_chart``); samples per temperature are ``samples/t<T>`` from ``SampleGrid``.
* SEJE: ``val/retrieval`` and ``test/retrieval`` (MedR, R@1/5/10 per direction and bag size),
  and ``val/neighbours`` (query image, true title, the top-k recipe titles, rank of the truth).
"""

from __future__ import annotations

import re

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from jointgen.generate import eval_mode


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    """The trainer's wandb loggers on rank zero (an empty list anywhere else)."""
    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _due(trainer: Trainer, every_n_epochs: int) -> bool:
    return not trainer.sanity_checking and (trainer.current_epoch + 1) % every_n_epochs == 0


def _head(batch: dict, n: int) -> dict:
    """The first ``n`` items of a collated batch, detached on the CPU."""
    out = {}
    for k, v in batch.items():
        out[k] = v[:n].detach().cpu() if isinstance(v, torch.Tensor) else list(v[:n])
    return out


# --- NVAE -----------------------------------------------------------------------------------


class NVAEMedia(Callback):
    """Reconstructions and per-group KL / active units of an ``NVAELitModule`` in wandb.

    Args:
        every_n_epochs: log after every n-th validation epoch.
        num_images: validation images reconstructed (the first of the first batch).
        active_threshold: mean KL (nats) above which a latent channel counts as active (0.1,
            as ``val/active_units``).
    """

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 8, active_threshold: float = 0.1
    ) -> None:
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.active_threshold = active_threshold
        self._images: torch.Tensor | None = None

    def _active(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        is_nvae = hasattr(pl_module, "val_kl_stats") and hasattr(pl_module.net, "reconstruct")
        return is_nvae and bool(wandb_loggers(trainer)) and _due(trainer, self.every_n_epochs)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._active(trainer, pl_module):
            self._images = batch["image"][: self.num_images].detach()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(trainer, pl_module):
            return
        import wandb
        from torchvision.utils import make_grid

        step, media = trainer.global_step, {}
        if self._images is not None and self.num_images > 0:
            x = self._images
            # posterior draws from a fixed seed, leaving the training RNG streams untouched
            devices = [x.device.index or 0] if x.is_cuda else []
            with eval_mode(pl_module.net), torch.no_grad(), torch.random.fork_rng(devices):
                torch.manual_seed(0)
                recon = pl_module.net.reconstruct(x, mode="mean")
            pair = torch.cat([x, recon]).float().cpu().clamp(0, 1)
            grid = make_grid(pair, nrow=len(x), padding=1)
            caption = "top: validation images, bottom: reconstructions (decoder mean)"
            media["val/reconstructions"] = wandb.Image(grid, caption=caption)
        stats = pl_module.val_kl_stats
        if stats is not None:
            rows = []
            for g, (kl, ch) in enumerate(zip(stats["kl_group"].tolist(), stats["kl_channel"])):
                active = int((ch > self.active_threshold).sum())
                rows.append([g, kl, active, ch.numel()])
            table = wandb.Table(columns=["group", "kl", "active_units", "units"], data=rows)
            media["val/kl_groups"] = table
            media["val/kl_groups_chart"] = wandb.plot.bar(
                table, "group", "kl", title="mean KL per latent group (nats)"
            )
        for lg in wandb_loggers(trainer):
            lg.log_metrics(media, step=step)
        self._images = None


# --- SEJE -----------------------------------------------------------------------------------

_RETRIEVAL_KEY = re.compile(r"^(val|test)/(medr|r1|r5|r10)_(i2r|r2i)(?:_(\w+))?$")


def retrieval_rows(metrics: dict, stage: str) -> list[list]:
    """Rows ``[bag size, direction, MedR, R@1, R@5, R@10]`` from logged metrics such as
    ``val/medr_i2r`` or ``test/r5_r2i_1k`` (bag size "val" for the validation bags)."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        m = _RETRIEVAL_KEY.match(key)
        if m and m.group(1) == stage:
            size = m.group(4) or stage
            found.setdefault((size, m.group(3)), {})[m.group(2)] = float(value)
    rows = []
    for (size, d), v in sorted(found.items()):
        if len(v) == 4:
            rows.append([size, d, v["medr"], v["r1"], v["r5"], v["r10"]])
    return rows


class SEJEMedia(Callback):
    """The retrieval table and a nearest-neighbour gallery of an ``SEJELitModule`` in wandb.

    The gallery embeds the first ``pool_size`` validation recipes (kept from the validation
    batches on rank zero) and, for the first ``num_queries`` images, lists the ``top_k``
    closest recipe titles under the model's ranking distance.

    Args:
        every_n_epochs: log after every n-th validation epoch (the test table always).
        pool_size: validation recipes searched by the gallery queries.
        num_queries: gallery rows.
        top_k: titles per query.
        image_mean / image_std: per-channel normalisation of the batches, undone for display.
    """

    COLUMNS = ["bag size", "direction", "MedR", "R@1", "R@5", "R@10"]

    def __init__(
        self,
        every_n_epochs: int = 1,
        pool_size: int = 100,
        num_queries: int = 8,
        top_k: int = 5,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ) -> None:
        if num_queries > pool_size:
            raise ValueError(f"num_queries={num_queries} exceeds pool_size={pool_size}")
        self.every_n_epochs, self.pool_size = every_n_epochs, pool_size
        self.num_queries, self.top_k = num_queries, top_k
        self.mean = torch.tensor(list(image_mean)).view(1, 3, 1, 1)
        self.std = torch.tensor(list(image_std)).view(1, 3, 1, 1)
        self._batches: list[dict] = []
        self._words: list[str] | None = None

    @staticmethod
    def _is_seje(pl_module: LightningModule) -> bool:
        return hasattr(pl_module, "val_retrieval") and hasattr(pl_module, "test_retrieval")

    def _active(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        due = _due(trainer, self.every_n_epochs)
        return self._is_seje(pl_module) and bool(wandb_loggers(trainer)) and due

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0:
            self._batches = []
        have = sum(len(b["image"]) for b in self._batches)
        if have < self.pool_size and self._active(trainer, pl_module):
            self._batches.append(_head(batch, self.pool_size - have))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(trainer, pl_module):
            return
        import wandb

        media = {}
        rows = retrieval_rows(trainer.callback_metrics, "val")
        if rows:
            media["val/retrieval"] = wandb.Table(columns=self.COLUMNS, data=rows)
        if self._batches and self.num_queries > 0:
            media["val/neighbours"] = self._gallery(trainer, pl_module)
        for lg in wandb_loggers(trainer):
            lg.log_metrics(media, step=trainer.global_step)
        self._batches = []

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        rows = retrieval_rows(trainer.callback_metrics, "test")
        if not (self._is_seje(pl_module) and loggers and rows):
            return
        import wandb

        for lg in loggers:
            table = wandb.Table(columns=self.COLUMNS, data=rows)
            lg.log_metrics({"test/retrieval": table}, step=trainer.global_step)

    # --- gallery ----------------------------------------------------------------------------

    def _title(self, trainer: Trainer, ids: torch.Tensor, length: int, recipe_id: str) -> str:
        """Title words from word ids (0 PAD, 1 UNK, i >= 2 row i - 2 of the word vectors);
        the recipe id when the datamodule has no word-vector file."""
        if self._words is None:
            from pathlib import Path

            from jointgen.data.word2vec import load_vectors

            path = getattr(trainer.datamodule, "word_vectors_path", None)
            self._words = load_vectors(path)[0] if path and Path(path).is_file() else []
        if not self._words:
            return str(recipe_id)
        ids = ids[:length].tolist()
        return " ".join(self._words[i - 2] if i >= 2 else "<unk>" for i in ids if i > 0)

    @torch.no_grad()
    def _gallery(self, trainer: Trainer, pl_module: LightningModule):
        import wandb

        from jointgen.eval.retrieval import distance_matrix

        img, rec, titles, images = [], [], [], []
        with eval_mode(pl_module.net):
            for b in self._batches:
                on_device = {
                    k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v
                    for k, v in b.items()
                }
                out = pl_module.net(on_device)
                img.append(out.img.float().cpu())
                rec.append(out.rec.float().cpu())
                ids = b.get("id") or [str(i) for i in range(len(b["image"]))]
                for t, n, rid in zip(b["title"], b["title_length"], ids):
                    titles.append(self._title(trainer, t, int(n), rid))
                images.append(b["image"])
        img, rec, images = torch.cat(img), torch.cat(rec), torch.cat(images)
        dist = distance_matrix(img, rec, pl_module.hparams.distance)
        k = min(self.top_k, len(rec))
        nearest = dist.topk(k, dim=1, largest=False).indices
        # rank of the true recipe, ties in its favour (as in the retrieval metric)
        ranks = 1 + (dist < dist.diagonal().unsqueeze(1)).sum(1)
        shown = (images[: self.num_queries].float() * self.std + self.mean).clamp(0, 1)
        columns = ["query image", "true title", *[f"top {j + 1}" for j in range(k)], "rank"]
        rows = []
        for q in range(min(self.num_queries, len(img))):
            picked = [titles[j] + (" [true]" if j == q else "") for j in nearest[q].tolist()]
            image = wandb.Image(shown[q].permute(1, 2, 0).numpy())
            rows.append([image, titles[q], *picked, int(ranks[q])])
        return wandb.Table(columns=columns, data=rows)
