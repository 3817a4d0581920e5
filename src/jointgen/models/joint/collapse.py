"""Posterior-collapse safeguards and monitors for the text branch (spec §3.4, pitfall 6).

* Free bits (Kingma et al. 2016, arXiv 1606.04934): a per-dimension KL floor in nats; below it
  the KL term is constant and gives no gradient.
* Active units (Burda et al. 2016, arXiv 1509.00519): dimension d is active when the variance
  over the data of E_q[z_d | x] exceeds 0.01.
* Mutual information I(x; z) under the aggregate posterior, with the minibatch estimator of the
  lagging-inference-networks paper (He et al. 2019, arXiv 1901.05534).

Only torch is imported.
"""

from __future__ import annotations

import math

import torch

from jointgen.models.joint.distributions import Distribution


def free_bits(kl: torch.Tensor, floor: float) -> torch.Tensor:
    """KL with a floor: ``max(kl, floor)`` element-wise, so entries below ``floor`` give no
    gradient. Pass per-dimension KLs (``(..., D)``) and sum afterwards.

    Args:
        kl: per-dimension KL values in nats.
        floor: the floor in nats per dimension; 0 returns ``kl`` unchanged.
    """
    if floor < 0:
        raise ValueError(f"free-bits floor must be >= 0, got {floor}")
    return kl.clamp(min=floor) if floor > 0 else kl


def active_units(means: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Which latent dimensions are active: ``Var_x(E_q[z_d | x]) > threshold``.

    Args:
        means: posterior means over a data set (or a large batch), ``(N, D)``.
        threshold: variance threshold (0.01 in Burda et al.).

    Returns:
        Bool ``(D,)``; ``.sum()`` is the number of active units.
    """
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(f"means must be (N >= 2, D), got {tuple(means.shape)}")
    return means.var(dim=0, unbiased=False) > threshold


@torch.no_grad()
def mutual_information(posterior: Distribution) -> torch.Tensor:
    """Minibatch estimate of I(x; z) = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)] in nats.

    The aggregate posterior q(z) is approximated by the mixture of the batch's posteriors, and
    one sample z_i ~ q(z | x_i) is drawn per datum (He et al. 2019, ``calc_mi``).

    Args:
        posterior: per-datum posteriors with parameters ``(B, D)``, B >= 2.
    """
    loc, log_scale = posterior.loc, posterior.log_scale
    if loc.dim() != 2 or loc.shape[0] < 2:
        raise ValueError(f"posterior parameters must be (B >= 2, D), got {tuple(loc.shape)}")
    neg_entropy = -posterior.entropy().mean()
    z = posterior.rsample(1)[0]  # B, D
    pairwise = type(posterior)(loc.unsqueeze(0), log_scale.unsqueeze(0), clamp=False)
    log_q = pairwise.log_prob(z.unsqueeze(1))  # (i, j): log q(z_i | x_j)
    log_qz = torch.logsumexp(log_q, dim=1) - math.log(loc.shape[0])
    return neg_entropy - log_qz.mean()
