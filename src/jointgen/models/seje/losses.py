"""SEJE objectives: batch-hard triplet, shared-classifier category loss, adversarial alignment.

Paper: Xie, Liu et al., "Learning Text-Image Joint Embedding for Efficient Cross-Modal Retrieval
with Deep Feature Engineering", ACM TOIS 40(4), 2022, arXiv 2110.11592 (code: git-disl/SEJE).
Batch-hard mining: Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", arXiv 1703.07737, 2017. WGAN-GP: Gulrajani et al., arXiv 1704.00028, 2017.

Spec ``seje.md`` §3. Everything here runs in float32 whatever the autocast context (D10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEGATIVES = ("instance", "instance_class")
ADV_LOSSES = ("bce", "wgan_gp", "none")


def pairwise_distances(v: Tensor, r: Tensor, eps: float = 1e-12) -> Tensor:
    """``D[i, j] = ||v_i - r_j||``, as ``sqrt(max(|v|^2 + |r|^2 - 2 v.r, eps))`` (spec §3.1)."""
    v, r = v.float(), r.float()
    sq = v.pow(2).sum(1, keepdim=True) + r.pow(2).sum(1).unsqueeze(0)
    return torch.addmm(sq, v, r.T, alpha=-2.0).clamp_min(eps).sqrt()


def hardest_negatives(
    d: Tensor,
    labels: Tensor | None = None,
    negatives: str = "instance",
    unknown_class: int | None = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-hard negatives of the 2B anchors of a ``B x B`` image-recipe distance matrix.

    Args:
        d: Distances, ``d[i, j]`` between image ``i`` and recipe ``j``; the diagonal matches.
        labels: ``(B,)`` categories, needed for ``instance_class``.
        negatives: ``instance``: any non-matching item; ``instance_class``: only items of a
            different category (the paper's figure); an anchor with none falls back to its
            instance negative (spec D1).
        unknown_class: Category meaning "unknown" (classes1M background); it is never treated
            as shared, so such anchors and items behave as under ``instance``. None: no such
            class.

    Returns:
        ``(neg_img, neg_rec, fallback)``: hardest negative distance of each image anchor (row
        minimum) and each recipe anchor (column minimum), and a bool ``(2B,)`` marking anchors
        that fell back to instance negatives.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    b = d.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=d.device)
    inf = torch.finfo(d.dtype).max
    inst = d.masked_fill(eye, inf)
    neg_img, neg_rec = inst.min(1).values, inst.min(0).values
    fallback = torch.zeros(2 * b, dtype=torch.bool, device=d.device)
    if negatives == "instance_class":
        if labels is None:
            raise ValueError("negatives=instance_class needs the batch's category labels")
        same = labels[:, None] == labels[None, :]
        if unknown_class is not None:
            same &= labels[:, None] != unknown_class
        cls = inst.masked_fill(same, inf)
        ok_img, ok_rec = (~(same | eye)).any(1), (~(same | eye)).any(0)
        neg_img = torch.where(ok_img, cls.min(1).values, neg_img)
        neg_rec = torch.where(ok_rec, cls.min(0).values, neg_rec)
        fallback = torch.cat([~ok_img, ~ok_rec])
    return neg_img, neg_rec, fallback


def triplet_loss(
    v: Tensor,
    r: Tensor,
    labels: Tensor | None = None,
    gamma: float = 16.0,
    margin: float = 0.0,
    negatives: str = "instance",
    kind: str = "soft",
    unknown_class: int | None = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bidirectional batch-hard triplet loss L_tri (spec §3.1).

    ``soft`` (SEJE): mean over the 2B anchors of ``log(1 + exp(gamma * (d_pos - d_neg + m)))``
    with gamma 16, m 0. ``hinge`` (MSJE): ``max(0, m + d_pos - d_neg)`` (use m = 0.2).

    Args:
        v: ``(B, E)`` image embeddings (L2-normalised).
        r: ``(B, E)`` recipe embeddings; ``r[i]`` matches ``v[i]``.
        labels: ``(B,)`` categories (for ``instance_class``).
        gamma: Soft-margin scale.
        margin: m.
        negatives: ``instance`` | ``instance_class`` (see :func:`hardest_negatives`).
        kind: ``soft`` | ``hinge``.
        unknown_class: See :func:`hardest_negatives`.

    Returns:
        ``(loss, stats)``; stats hold the mean positive/negative distances, the share of
        anchors whose hardest negative is closer than the positive and the fallback share.
    """
    if v.shape[0] < 2:
        raise ValueError("the batch-hard triplet loss needs at least 2 pairs per batch")
    d = pairwise_distances(v, r)
    pos = d.diagonal()
    neg_img, neg_rec, fallback = hardest_negatives(d, labels, negatives, unknown_class)
    gap = torch.cat([pos - neg_img, pos - neg_rec]) + margin
    if kind == "soft":
        loss = F.softplus(gamma * gap).mean()  # log(1 + exp(.)), stable for large arguments
    elif kind == "hinge":
        loss = gap.clamp_min(0).mean()
    else:
        raise ValueError(f"kind must be soft or hinge, got {kind!r}")
    stats = {
        "d_pos": pos.mean().detach(),
        "d_neg": torch.cat([neg_img, neg_rec]).mean().detach(),
        "violations": (gap - margin > 0).float().mean().detach(),
        "fallback": fallback.float().mean(),
    }
    return loss, stats


def category_loss(
    logits_v: Tensor,
    logits_r: Tensor,
    labels: Tensor,
    ignore_index: int | None = None,
    count: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(CE(W v, y), CE(W r, y))`` with one shared classifier ``W`` (L_CA, spec §3.3).

    ``ignore_index`` drops a class (classes1M background, D6); a batch with only ignored
    labels gives 0 rather than NaN. ``count`` replaces the number of labelled items the summed
    CE is divided by (with ``ignore_index``); under DDP the global count over the world size
    makes the ranks' averaged gradients those of the mean over the global batch.
    """

    def ce(logits: Tensor) -> Tensor:
        if ignore_index is None:
            return F.cross_entropy(logits.float(), labels)
        keep = labels != ignore_index
        total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
        return total / (keep.sum().clamp_min(1) if count is None else count)

    return ce(logits_v), ce(logits_r)


# --- modality discriminator (L_DA, spec §3.4) ----------------------------------------------


class Discriminator(nn.Module):
    """Modality critic: 1024 -> 512 -> 256 -> 1 with LeakyReLU(0.2); raw logit, no sigmoid."""

    def __init__(self, dim: int = 1024, hidden: tuple[int, int] = (512, 256)) -> None:
        super().__init__()
        h1, h2 = hidden
        self.net = nn.Sequential(
            nn.Linear(dim, h1),
            nn.LeakyReLU(0.2),
            nn.Linear(h1, h2),
            nn.LeakyReLU(0.2),
            nn.Linear(h2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float()).squeeze(-1)


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP: ``mean_i (||grad_x D(x_i)|| - 1)^2`` at ``x_i = a_i real_i + (1 - a_i) fake_i``.

    ``a_i ~ U(0, 1)`` is drawn on the inputs' device (the reference forced CUDA tensors).
    """
    alpha = torch.rand(real.shape[0], 1, device=real.device, dtype=torch.float32)
    x = (alpha * real.float() + (1 - alpha) * fake.float()).requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (grad.norm(2, dim=1) - 1).pow(2).mean()


def discriminator_loss(
    critic: nn.Module, v: Tensor, r: Tensor, kind: str = "bce", gp_weight: float = 10.0
) -> Tensor:
    """Critic step on detached embeddings; images are "real", recipes "fake".

    ``bce``: ``BCE(D(v), 1) + BCE(D(r), 0)``; ``wgan_gp``: ``mean D(r) - mean D(v) + gp_weight
    * GP``. (The reference's ``log(1 - mean D(v)) + log(mean D(r))`` on an unbounded output is
    NaN whenever the mean is negative, so it is not offered.)
    """
    v, r = v.detach().float(), r.detach().float()
    if kind == "bce":
        dv, dr = critic(v), critic(r)
        return F.binary_cross_entropy_with_logits(
            dv, torch.ones_like(dv)
        ) + F.binary_cross_entropy_with_logits(dr, torch.zeros_like(dr))
    if kind == "wgan_gp":
        return critic(r).mean() - critic(v).mean() + gp_weight * gradient_penalty(critic, v, r)
    raise ValueError(f"adv_loss must be one of {ADV_LOSSES[:2]} here, got {kind!r}")


def generator_loss(critic: nn.Module, r: Tensor, kind: str = "bce") -> Tensor:
    """Alignment term for the main step: recipes should look like images to the critic.

    Only ``r`` enters, so the gradient reaches the recipe branch alone (released behaviour).
    ``bce``: non-saturating ``BCE(D(r), 1)``; ``wgan_gp``: ``-mean D(r)``.
    """
    dr = critic(r.float())
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(dr, torch.ones_like(dr))
    if kind == "wgan_gp":
        return -dr.mean()
    raise ValueError(f"adv_loss must be one of {ADV_LOSSES[:2]} here, got {kind!r}")
