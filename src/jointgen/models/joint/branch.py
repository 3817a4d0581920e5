"""The modality-branch interface of the joint VAE, and the flat private latent both light
branches share.

A branch owns one modality's encoder (the shared-latent expert and its private posterior), its
decoder, its private prior and its MMVAE+ auxiliary prior. ``JointVAE`` talks to a branch only
through ``ModalityBranch`` (documented in full in ``jointgen.models.joint.image_conv``), so a
hierarchical NVAE image branch can replace the flat conv branch without touching the objective.
Only torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from jointgen.models.joint.collapse import free_bits
from jointgen.models.joint.distributions import Distribution, standard


@dataclass
class BranchTerms:
    """What ``ModalityBranch.log_likelihood`` returns for z of shape ``(K, B, z_dim)``.

    Attributes:
        log_px: ``(K, B)`` log p(x | z, w) in nats, summed over the modality's dimensions.
        log_ratio: ``(K, B)`` Monte Carlo log p(w) - log q(w | x[, z]) of the private draws;
            zeros when w came from the (auxiliary or conditional) prior.
        kl: ``(K, B)`` closed-form KL(q(w | x[, z]) || p(w)) (free bits applied), zeros for
            prior draws; used by the closed-form ELBOs of ``poe`` and ``mopoe``.
        latents: the reparameterised posterior draws of w, each ``(K, B, ...)``; DReG registers
            its gradient hooks on them.
    """

    log_px: torch.Tensor
    log_ratio: torch.Tensor
    kl: torch.Tensor
    latents: list[torch.Tensor] = field(default_factory=list)


@runtime_checkable
class ModalityBranch(Protocol):
    """Interface every joint-VAE branch implements (image and text alike)."""

    family: str  # posterior family of the shared expert: "normal" or "laplace"
    z_dim: int  # size of the shared latent
    data_dim: int  # D_m for likelihood scaling: C*H*W for images, L for captions

    def expert(self, x: torch.Tensor) -> tuple[Distribution, Any]: ...

    def log_likelihood(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        features: Any = None,
        *,
        posterior: bool = True,
        detach_posterior: bool = False,
    ) -> BranchTerms: ...

    def generate(self, z: torch.Tensor, temp: float = 1.0, *, aux_prior: bool = False): ...

    def reconstruct(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor: ...

    def private_mean(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor: ...


# --- flat private latent --------------------------------------------------------------------


class FlatPrivate(nn.Module):
    """A flat private latent w: prior p(w) = the family's standard prior, auxiliary prior
    r(w) = zero mean with a learnable per-dimension scale (MMVAE+), and the sampling and
    density terms a branch returns in ``BranchTerms``.

    Args:
        dim: size of w; 0 disables the private latent (plain MMVAE/MVAE decoders from z only).
        family: ``normal`` or ``laplace``, the family of q(w | x), p(w) and r(w).
        free_bits: per-dimension KL floor in nats applied to the closed-form KL.
    """

    def __init__(self, dim: int, family: str = "normal", free_bits: float = 0.0) -> None:
        super().__init__()
        if dim < 0:
            raise ValueError(f"private latent size must be >= 0, got {dim}")
        self.dim, self.family, self.free_bits = dim, family, free_bits
        if dim:
            self.aux_log_scale = nn.Parameter(torch.zeros(dim))
        else:  # an empty parameter would never get a gradient, which DDP refuses
            self.register_buffer("aux_log_scale", torch.zeros(0))

    def draw(
        self,
        q: Distribution | None,
        like: torch.Tensor,
        *,
        posterior: bool,
        detach_posterior: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Draw w for every shared sample.

        Args:
            q: the posterior q(w | x) with parameters ``(B, dim)``; unused for prior draws.
            like: the shared samples ``(K, B, z_dim)`` (fixes K, B, dtype and device).
            posterior: draw from q (with density terms) or from the auxiliary prior r.
            detach_posterior: evaluate log q(w) with detached parameters (DReG).

        Returns:
            ``(w (K, B, dim) or None, log_ratio (K, B), kl (K, B), posterior draws)``.
        """
        zeros = like.new_zeros(like.shape[:-1])
        if self.dim == 0:
            return None, zeros, zeros, []
        if not posterior:
            return self.prior_sample(like.shape[:-1], aux=True), zeros, zeros, []
        K = like.shape[0]
        w = q.rsample(K)
        q_eval = q.detach() if detach_posterior else q
        log_ratio = standard(self.family, q.loc).log_prob(w) - q_eval.log_prob(w)
        kl = free_bits(q.kl_standard(), self.free_bits).sum(-1).expand(K, -1)
        return w, log_ratio, kl, [w]

    def prior_sample(
        self, lead: tuple[int, ...] | torch.Size, temp: float = 1.0, *, aux: bool = False
    ) -> torch.Tensor | None:
        """w of shape ``(*lead, dim)`` from p(w), or from r(w) when ``aux``; None when dim = 0."""
        if self.dim == 0:
            return None
        like = self.aux_log_scale.new_zeros(*lead, self.dim)
        prior = standard(self.family, like, self.aux_log_scale if aux else None)
        return prior.rsample(1, temp)[0]


def cat_latents(z: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``[z, w]`` along the last axis (z alone when there is no private latent)."""
    return z if w is None else torch.cat([z, w.to(z.dtype)], dim=-1)
