"""Fusion of the unimodal experts q_m(z | x_m) into a joint posterior q(z | X_S) (spec §3.2).

Operators, for M modalities with per-sample observation masks ``(B,)`` bool:

* ``poe``: precision-weighted product of the observed Gaussian experts, optionally times the
  N(0, I) prior expert (MVAE: Wu & Goodman 2018, arXiv 1802.05335).
* ``moe``: uniform mixture of the observed experts, sampled stratified (MMVAE: Shi et al. 2019,
  arXiv 1911.03393).
* ``mopoe``: uniform mixture over the non-empty subsets of the observed modalities, each subset a
  PoE (MoPoE-VAE: Sutter et al. 2021, arXiv 2105.02470).
* ``mmvae_plus``: the shared latent of MMVAE+ (Palumbo, Daunhawer & Vogt, ICLR 2023,
  openreview sPsPnzTRBl), fused exactly as ``moe``; the private latents live in the objective.

A masked-out expert never enters a sum or a log-sum-exp except through ``torch.where``, so it has
exactly zero effect on the outputs and on the gradients. Only torch is imported.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from jointgen.models.joint.distributions import Distribution, Normal, log_mean_exp


def _stack_masks(experts: Sequence[Distribution], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Masks as one ``(M, B)`` bool tensor, checked against the experts."""
    if len(experts) != len(masks) or not experts:
        raise ValueError(f"need one mask per expert, got {len(experts)} and {len(masks)}")
    batch = experts[0].loc.shape[0]
    for m in masks:
        if m.dtype != torch.bool or m.shape != (batch,):
            raise ValueError(f"masks must be bool of shape ({batch},), got {m.dtype} {m.shape}")
    return torch.stack(list(masks))


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B,)`` mask reshaped to broadcast against ``like`` of shape ``(B, ...)``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


# --- product of experts ---------------------------------------------------------------------


def poe(
    experts: Sequence[Normal],
    masks: Sequence[torch.Tensor],
    *,
    prior_expert: bool = True,
    weights: Sequence[torch.Tensor | float] | None = None,
) -> Normal:
    """Product of the observed Gaussian experts. EXACT (closed form).

    Precision T = [1 if prior_expert] + sum_m w_m / sigma_m^2 over observed m, mean
    mu = (sum_m w_m mu_m / sigma_m^2) / T, variance 1 / T; the prior expert adds mean 0, sigma 1.

    Args:
        experts: one Normal ``(B, D)`` per modality.
        masks: one bool ``(B,)`` per modality; false experts are left out per sample.
        prior_expert: include N(0, I) as an expert (then a sample may observe nothing).
        weights: optional per-expert precision multipliers (generalised PoE), broadcastable.
    """
    stacked = _stack_masks(experts, masks)
    if not prior_expert and not bool(stacked.any(0).all()):
        raise ValueError("poe without the prior expert needs an observed expert in every sample")
    loc0 = experts[0].loc
    precision = torch.full_like(loc0, 1.0 if prior_expert else 0.0)
    weighted = torch.zeros_like(loc0)
    for i, q in enumerate(experts):
        if not isinstance(q, Normal):
            raise TypeError(f"poe needs Normal experts (closed-form product), got {type(q)}")
        p = torch.exp(-2.0 * q.log_scale)
        if weights is not None:
            p = p * weights[i]
        keep = _per_sample(stacked[i], p)
        precision = precision + torch.where(keep, p, torch.zeros_like(p))
        weighted = weighted + torch.where(keep, p * q.loc, torch.zeros_like(p))
    return Normal(weighted / precision, -0.5 * torch.log(precision), clamp=False)


# --- mixtures -------------------------------------------------------------------------------


class Mixture:
    """Uniform mixture of the observed experts of each sample.

    Args:
        experts: one distribution ``(B, D)`` per modality (Normal or Laplace).
        masks: ``(M, B)`` bool, which experts each sample observed.
    """

    def __init__(self, experts: Sequence[Distribution], masks: torch.Tensor) -> None:
        if not bool(masks.any(0).all()):
            raise ValueError("a mixture needs an observed expert in every sample")
        self.experts, self.masks = list(experts), masks

    def rsample_stratified(self, K: int = 1, temp: float = 1.0) -> list[torch.Tensor]:
        """K reparameterised samples from EVERY expert: a list of ``(K, B, D)``, one per expert.

        The caller uses only the observed strata; each observed expert supplies K samples.
        """
        return [q.rsample(K, temp) for q in self.experts]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Mixture log density ``(..., B, D) -> (..., B)``: log-mean-exp over observed experts."""
        lp = torch.stack([q.log_prob(z) for q in self.experts])  # M, ..., B
        mask = self.masks.view(self.masks.shape[0], *([1] * (lp.dim() - 2)), -1)
        return log_mean_exp(lp, 0, mask)

    def detach(self) -> Mixture:
        return Mixture([q.detach() for q in self.experts], self.masks)

    @property
    def mean(self) -> torch.Tensor:
        """Mixture mean: the average of the observed experts' means, ``(B, D)``."""
        locs = torch.stack([q.loc for q in self.experts])
        keep = self.masks.unsqueeze(-1)
        total = torch.where(keep, locs, torch.zeros_like(locs)).sum(0)
        return total / keep.sum(0).to(locs.dtype)


def moe(experts: Sequence[Distribution], masks: Sequence[torch.Tensor]) -> Mixture:
    """Uniform mixture of the observed experts (MMVAE).

    The density is EXACT (log-mean-exp of the observed experts' densities); sampling is a
    STRATIFIED ESTIMATOR: each observed expert supplies its own K samples
    (``Mixture.rsample_stratified``), and the objective averages over the observed strata.
    Its KL to the prior has no closed form and is estimated by Monte Carlo.

    Args:
        experts: one distribution ``(B, D)`` per modality (Normal or Laplace).
        masks: one bool ``(B,)`` per modality.
    """
    return Mixture(experts, _stack_masks(experts, masks))


def mmvae_plus(experts: Sequence[Distribution], masks: Sequence[torch.Tensor]) -> Mixture:
    """Shared-latent posterior of MMVAE+: the uniform mixture of ``moe``.

    Density EXACT, sampling a STRATIFIED ESTIMATOR over the observed experts, as in ``moe``;
    MMVAE+ differs only in the objective (private latents, auxiliary priors, beta on the log
    density ratio), see ``jointgen.models.joint.objectives``.

    Args:
        experts: one distribution ``(B, D)`` per modality (Normal or Laplace).
        masks: one bool ``(B,)`` per modality.
    """
    return moe(experts, masks)


# --- mixture of products of experts ---------------------------------------------------------


def nonempty_subsets(num: int) -> list[tuple[int, ...]]:
    """Non-empty subsets of ``range(num)``, by size then index: (0,), (1,), (0, 1) for 2."""
    return [s for r in range(1, num + 1) for s in itertools.combinations(range(num), r)]


class SubsetMixture:
    """Uniform mixture over the valid subsets of each sample, each component a subset PoE.

    Args:
        subsets: modality indices of every subset.
        components: the PoE of each subset, Normal ``(B, D)``.
        valid: ``(S, B)`` bool, subsets whose modalities were all observed.
    """

    def __init__(
        self, subsets: Sequence[tuple[int, ...]], components: Sequence[Normal], valid: torch.Tensor
    ) -> None:
        self.subsets, self.components, self.valid = list(subsets), list(components), valid

    def kl_bound(self) -> torch.Tensor:
        """UPPER BOUND on KL(mixture || prior): mean over valid subsets of the closed-form
        subset KLs (convexity of KL), per dimension ``(B, D)``."""
        kl = torch.stack([c.kl_standard() for c in self.components])  # S, B, D
        keep = self.valid.unsqueeze(-1)
        total = torch.where(keep, kl, torch.zeros_like(kl)).sum(0)
        return total / keep.sum(0).to(kl.dtype)

    def assign(self) -> torch.Tensor:
        """Batch split: one valid subset per sample, ``(B,)`` long.

        Samples with the same valid subsets are shuffled and dealt round-robin, so each subset
        gets batch/#subsets of them (up to one).
        """
        bits = torch.arange(len(self.subsets), device=self.valid.device).unsqueeze(1)
        codes = (self.valid.long() << bits).sum(0)
        out = torch.empty_like(codes)
        for code in codes.unique().tolist():
            idx = (codes == code).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx)).to(idx.device)]
            options = self.valid[:, idx[0]].nonzero().squeeze(1)
            out[idx] = options[torch.arange(len(idx), device=idx.device) % len(options)]
        return out

    def rsample_split(self, K: int = 1, temp: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-split samples: z ``(K, B, D)`` from each sample's assigned subset, and the
        assignment ``(B,)``. Gradients reach only the assigned component."""
        assignment = self.assign()
        z = torch.zeros_like(self.components[0].loc).expand(K, -1, -1)
        for s, zs in enumerate(self.rsample_stratified(K, temp)):
            z = torch.where((assignment == s).view(1, -1, 1), zs, z)
        return z, assignment

    def rsample_stratified(self, K: int = 1, temp: float = 1.0) -> list[torch.Tensor]:
        """K samples from EVERY subset PoE: a list of ``(K, B, D)``; use the valid ones."""
        return [c.rsample(K, temp) for c in self.components]

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the PoE of all observed modalities (the largest valid subset), ``(B, D)``."""
        out = self.components[0].loc
        for s in range(1, len(self.subsets)):  # subsets are ordered by size
            out = torch.where(self.valid[s].unsqueeze(-1), self.components[s].loc, out)
        return out

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights ``(S, B)``: 1/#valid subsets on the valid ones."""
        return self.valid.float() / self.valid.sum(0, keepdim=True).float()


def mopoe(
    experts: Sequence[Normal],
    masks: Sequence[torch.Tensor],
    *,
    prior_expert: bool = True,
    weights: Sequence[torch.Tensor | float] | None = None,
) -> SubsetMixture:
    """Mixture of the PoEs of every non-empty subset of the observed modalities (MoPoE).

    Each component is EXACT (closed-form PoE); the KL term is an UPPER BOUND (mean over subsets
    of the subset KLs, ``SubsetMixture.kl_bound``). Sampling: batch split
    (``rsample_split``, each valid subset reconstructs about batch/#subsets samples, as in the
    MoPoE code) or STRATIFIED over the subsets (``rsample_stratified``), a config choice.

    Args:
        experts: one Normal ``(B, D)`` per modality.
        masks: one bool ``(B,)`` per modality.
        prior_expert: include N(0, I) in every subset product.
        weights: optional per-expert precision multipliers (generalised PoE).
    """
    stacked = _stack_masks(experts, masks)
    if not bool(stacked.any(0).all()):
        raise ValueError("mopoe needs an observed modality in every sample")
    subsets = nonempty_subsets(len(experts))
    components, valid = [], []
    for subset in subsets:
        # a subset is valid for a sample when all its modalities are observed; invalid
        # components are computed for batching only and never leave a torch.where
        ok = torch.stack([stacked[i] for i in subset]).all(0)
        everyone = [torch.ones_like(ok)] * len(subset)
        sub_w = None if weights is None else [weights[i] for i in subset]
        sub_experts = [experts[i] for i in subset]
        components.append(poe(sub_experts, everyone, prior_expert=prior_expert, weights=sub_w))
        valid.append(ok)
    return SubsetMixture(subsets, components, torch.stack(valid))


FUSIONS = {"poe": poe, "moe": moe, "mopoe": mopoe, "mmvae_plus": mmvae_plus}
