"""The hierarchical NVAE image branch of the joint caption-image VAE (spec joint_vae.md §3.3).

The private image latent is an NVAE hierarchy w_img = (w^1..w^L) conditioned on the shared z:
z is projected onto the decoder's first feature map, so the priors are p(w^1 | z) and
p(w^l | w^<l, z), and the posteriors q(w^l | x, w^<l, z) are residual Normals relative to them
(NVAE, Vahdat & Kautz 2020, arXiv 2007.03898). This replaces the MMVAE+ auxiliary prior r_img
(Palumbo et al., ICLR 2023): in the caption stratum and for caption-to-image generation, w_img
is drawn from the conditional prior hierarchy. It reuses :class:`jointgen.models.nvae.NVAE`
(built with ``cond_dim = z_dim``) and implements the branch interface documented in
``jointgen.models.joint.image_conv``. Only torch is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from jointgen.models.joint.branch import BranchTerms
from jointgen.models.joint.distributions import Distribution, make_dist
from jointgen.models.nvae import NVAE


class NVAEImageBranch(nn.Module):
    """NVAE hierarchy conditioned on the shared latent, plus the shared-latent expert head.

    Args:
        net: an :class:`NVAE` built with ``cond_dim == z_dim``.
        z_dim: size of the shared latent z.
        family: posterior family of the shared expert q_img(z | x): ``normal`` or ``laplace``.
        expert_hidden: width of the expert head's hidden layer.
    """

    def __init__(
        self, net: NVAE, z_dim: int = 32, family: str = "normal", expert_hidden: int = 256
    ) -> None:
        super().__init__()
        if net.cond_dim != z_dim:
            raise ValueError(
                f"the NVAE image branch needs net.cond_dim == z_dim, got {net.cond_dim} != {z_dim}"
            )
        make_dist(family, torch.zeros(1), torch.zeros(1))  # validates the family name
        self.net, self.z_dim, self.family = net, z_dim, family
        self.channels, self.image_size = net.in_channels, net.image_size
        self.data_dim = net.in_channels * net.image_size**2
        c_top = net.prior_ftr0.shape[0]
        # q_img(z | x) from the top encoder feature pooled over positions (mean and max): the
        # captioned attributes do not depend on where the object is, and the max finds a
        # small one; where it is stays in the hierarchy
        self.expert_head = nn.Sequential(
            nn.Linear(2 * c_top, expert_hidden),
            nn.SiLU(),
            nn.Linear(expert_hidden, 2 * z_dim),
        )

    def expert(self, x: torch.Tensor) -> tuple[Distribution, tuple]:
        """q_img(z | x) with parameters ``(B, z_dim)`` and the bottom-up NVAE features."""
        feats = self.net.encode_features(x)
        top = feats[1].float()
        pooled = torch.cat([top.mean((2, 3)), top.amax((2, 3))], dim=1)
        loc, log_scale = self.expert_head(pooled).chunk(2, dim=-1)
        return make_dist(self.family, loc, log_scale), feats

    @staticmethod
    def _repeat(feats: tuple, k: int) -> tuple:
        enc, top = feats
        rep = lambda t: t.repeat(k, 1, 1, 1)  # noqa: E731 - sample-major, like z.reshape
        return [rep(f) for f in enc], rep(top)

    def log_likelihood(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        features: tuple | None = None,
        *,
        posterior: bool = True,
        detach_posterior: bool = False,
    ) -> BranchTerms:
        """log p(x | z, w) with the hierarchy's density terms, for z ``(K, B, z_dim)``.

        With ``posterior`` the hierarchy is sampled from q(w | x, z) and ``log_ratio`` is
        sum_l log p(w^l | .) - log q(w^l | .) (``kl`` the analytic per-group KL sum); otherwise
        w comes from the conditional prior and both are zero. The hierarchy's draws are not
        returned as ``latents``: DReG reweights the shared z, while w gets the IWAE gradient.
        """
        if z.dim() != 3:
            raise ValueError(f"z must be (K, B, z_dim), got {tuple(z.shape)}")
        K, B = z.shape[:2]
        cond = z.reshape(K * B, -1)
        xk = x.repeat(K, 1, 1, 1)
        if posterior:
            if features is None:
                features = self.net.encode_features(x)
            out = self.net(
                xk, cond=cond, encoded=self._repeat(features, K), detach_q=detach_posterior
            )
            log_px = self.net.log_likelihood(out, xk).view(K, B)
            log_ratio = (out.log_p - out.log_q).sum(1).view(K, B)
            kl = out.kl.sum(1).view(K, B)
            return BranchTerms(log_px, log_ratio, kl, [])
        dist = self.net.prior_pixel_dist(K * B, 1.0, cond)
        log_px = dist.log_prob(xk).flatten(1).sum(1).view(K, B)
        zeros = torch.zeros_like(log_px)
        return BranchTerms(log_px, zeros, zeros, [])

    @torch.no_grad()
    def generate(self, z: torch.Tensor, temp: float = 1.0, *, aux_prior: bool = False):
        """Decoder means ``(..., C, H, W)`` from z ``(..., z_dim)``; w from p(w | z) at ``temp``.

        ``aux_prior`` is accepted for interface symmetry: the conditional prior hierarchy *is*
        this branch's auxiliary prior.
        """
        lead = z.shape[:-1]
        x = self.net.sample(
            int(torch.tensor(lead).prod()) if lead else 1, temp, cond=z.reshape(-1, self.z_dim)
        )
        return x.reshape(*lead, *x.shape[1:])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean from q(w | x, z) with z = the expert mean (or the given z)."""
        q_z, feats = self.expert(x)
        cond = q_z.mean if z is None else z
        return self.net(x, cond=cond, encoded=feats).dist.mean()

    @torch.no_grad()
    def private_mean(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior means of every group, flattened and concatenated: ``(B, P)``."""
        q_z, feats = self.expert(x)
        out = self.net(x, cond=q_z.mean if z is None else z, encoded=feats)
        return torch.cat([m.flatten(1) for m in out.mu_q], dim=1)
