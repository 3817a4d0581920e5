"""Distributions used by NVAE: soft-clamped Normal, discretised logistic mixture, Bernoulli.

References: NVAE (Vahdat & Kautz, 2020, arXiv 2007.03898) for the clamps and sigma floor;
PixelCNN++ (Salimans et al., 2017, arXiv 1701.05517) for the discretised mixture of logistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def soft_clamp5(x: torch.Tensor) -> torch.Tensor:
    """5 * tanh(x / 5): keeps mu and log-sigma in (-5, 5) with a smooth gradient."""
    return 5.0 * torch.tanh(x / 5.0)


# --- Normal --------------------------------------------------------------------------------


class Normal:
    """Diagonal Normal with NVAE's soft clamp and a 0.01 sigma floor.

    ``sigma = exp(5 tanh(log_sigma / 5)) + 0.01``, multiplied by the temperature ``t``.
    Residual posteriors are built by adding *raw* parameters before the clamp
    (``Normal(mu_p + dmu, log_sig_p + dlog_sig)``), as in the reference.
    """

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor, temp: float = 1.0) -> None:
        self.mu = soft_clamp5(mu)
        self.sigma = (torch.exp(soft_clamp5(log_sigma)) + 1e-2) * temp

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample; returns (z, eps)."""
        # drawn in logical (NCHW) order so a seed gives the same z in any memory layout
        eps = torch.randn(self.mu.shape, dtype=self.mu.dtype, device=self.mu.device)
        return self.mu + self.sigma * eps, eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Element-wise log density."""
        e = (z - self.mu) / self.sigma
        return -0.5 * e * e - torch.log(self.sigma) - 0.5 * LOG_2PI

    def kl(self, other: Normal) -> torch.Tensor:
        """Element-wise closed-form KL(self || other)."""
        var_ratio = (self.sigma / other.sigma) ** 2
        t = ((self.mu - other.mu) / other.sigma) ** 2
        return 0.5 * (var_ratio + t - 1.0 - torch.log(var_ratio))

    def detach(self) -> Normal:
        out = Normal.__new__(Normal)
        out.mu, out.sigma = self.mu.detach(), self.sigma.detach()
        return out


def standard_normal_like(z: torch.Tensor, temp: float = 1.0) -> Normal:
    """The top prior N(0, I); its effective sigma is 1.01 because of the floor (kept on purpose)."""
    zeros = torch.zeros_like(z)
    return Normal(zeros, zeros, temp)


# --- pixel likelihoods -----------------------------------------------------------------------


class Bernoulli:
    """Bernoulli over binary pixels; ``x`` in {0, 1}."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -F.binary_cross_entropy_with_logits(self.logits, x, reduction="none")

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self, t: float = 1.0) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits / t))


class DiscMixLogistic:
    """Discretised mixture of logistics with autoregressive colour channels (PixelCNN++).

    Parameter layout along dim 1 (for C colour channels and M components): M mixture logits,
    then for each channel M means, M log-scales, and (C>1) the coefficients (M per pair
    r->g, r->b, g->b). For C=3 that is 10*M channels. Data ``x`` is in [0, 1] with
    ``2**num_bits`` levels and is mapped to [-1, 1] internally.

    Deviation from the reference (documented in the README): the upper tail is used for the top
    level only (threshold 1 - half bin, not 0.99), so the pmf sums to exactly 1 over all levels.
    """

    def __init__(self, params: torch.Tensor, channels: int, num_mix: int, num_bits: int = 8):
        b, _, h, w = params.shape
        m, c = num_mix, channels
        self.c, self.m = c, m
        self.logit_pi = params[:, :m]  # B, M, H, W
        rest = params[:, m:]
        self.means = rest[:, : c * m].reshape(b, c, m, h, w)
        self.log_scales = rest[:, c * m : 2 * c * m].reshape(b, c, m, h, w).clamp(min=-7.0)
        n_coef = c * (c - 1) // 2
        self.coeffs = torch.tanh(rest[:, 2 * c * m : (2 * c + n_coef) * m]).reshape(
            b, n_coef, m, h, w
        )
        self.levels = 2**num_bits - 1
        self.half_bin = 1.0 / self.levels  # half bin width in [-1, 1] units

    @staticmethod
    def num_params(channels: int, num_mix: int) -> int:
        return num_mix * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _conditional_means(self, x: torch.Tensor) -> torch.Tensor:
        """Means with channel c shifted by coefficients times the *observed* earlier channels."""
        means = [self.means[:, 0]]
        k = 0
        for c in range(1, self.c):
            mc = self.means[:, c]
            for j in range(c):
                mc = mc + self.coeffs[:, k] * x[:, j : j + 1]
                k += 1
            means.append(mc)
        return torch.stack(means, dim=1)

    def log_prob(self, x01: torch.Tensor) -> torch.Tensor:
        """Per-pixel log-likelihood (B, H, W) of ``x01`` in [0, 1]; channels are summed inside."""
        x = 2.0 * x01 - 1.0  # B, C, H, W
        mu = self._conditional_means(x)  # B, C, M, H, W
        xe = x.unsqueeze(2)
        centered = xe - mu
        inv_s = torch.exp(-self.log_scales)
        plus = inv_s * (centered + self.half_bin)
        minus = inv_s * (centered - self.half_bin)
        cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): lower tail, value 0
        log_one_minus_cdf_min = -F.softplus(minus)  # log(1 - sigmoid(minus)): upper tail
        # log pdf at the bin centre, used where the difference of CDFs underflows
        mid = inv_s * centered
        log_pdf_mid = mid - self.log_scales - 2.0 * F.softplus(mid) + math.log(2 * self.half_bin)
        inner = torch.where(
            cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid
        )
        lo = -1.0 + self.half_bin  # midpoint between the two lowest levels
        hi = 1.0 - self.half_bin
        lp = torch.where(xe < lo, log_cdf_plus, torch.where(xe > hi, log_one_minus_cdf_min, inner))
        lp = lp.sum(dim=1) + F.log_softmax(self.logit_pi, dim=1)  # B, M, H, W
        return torch.logsumexp(lp, dim=1)

    def mean(self) -> torch.Tensor:
        """Softmax-weighted component means in [0, 1], channels filled autoregressively."""
        pi = F.softmax(self.logit_pi, dim=1)  # B, M, H, W
        out = []
        k = 0
        for c in range(self.c):
            mc = self.means[:, c]
            for j in range(c):
                mc = mc + self.coeffs[:, k] * out[j].unsqueeze(1)
                k += 1
            out.append((pi * mc).sum(dim=1).clamp(-1.0, 1.0))
        return (torch.stack(out, dim=1) + 1.0) / 2.0

    def sample(self, t: float = 1.0) -> torch.Tensor:
        """Sample pixels in [0, 1].

        The component is drawn by Gumbel-max on ``logits / t``; the logistic noise is multiplied
        by ``scale * t``, so ``t < 1`` reduces pixel noise (the reference divides by t instead).
        """
        g = -torch.log(-torch.log(torch.rand_like(self.logit_pi).clamp(1e-5, 1 - 1e-5)))
        sel = F.one_hot((self.logit_pi / t + g).argmax(dim=1), self.m).permute(0, 3, 1, 2)
        sel = sel.to(self.means.dtype)  # B, M, H, W
        out = []
        k = 0
        for c in range(self.c):
            mc = (self.means[:, c] * sel).sum(1)
            ls = (self.log_scales[:, c] * sel).sum(1)
            for j in range(c):
                mc = mc + (self.coeffs[:, k] * sel).sum(1) * out[j]
                k += 1
            u = torch.rand_like(mc).clamp(1e-5, 1 - 1e-5)
            xc = mc + torch.exp(ls) * t * (torch.log(u) - torch.log1p(-u))
            out.append(xc.clamp(-1.0, 1.0))
        x = (torch.stack(out, dim=1) + 1.0) / 2.0
        return torch.round(x * self.levels) / self.levels
