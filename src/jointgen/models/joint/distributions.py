"""Posterior families for the shared and private latents of the joint VAE (spec §3.1).

Normal (default) and Laplace, both parameterised by ``(loc, log_scale)`` over the last (event)
axis. The log-scale is soft-clamped to ``(-LOG_SCALE_BOUND, LOG_SCALE_BOUND)`` with
``b * tanh(x / b)`` (the NVAE soft clamp, Vahdat & Kautz 2020, arXiv 2007.03898), so the
precisions of a product of experts stay finite and the gradient never vanishes at the bound.
Laplace posteriors follow MMVAE (Shi et al. 2019, arXiv 1911.03393); they are allowed only for
the mixture fusions, because a product of Laplace experts has no closed form.

Shapes: parameters are ``(B, D)`` (or any ``(..., D)``); ``rsample(K)`` returns ``(K, B, D)``;
``log_prob(z)`` broadcasts ``z`` of shape ``(..., B, D)`` against the parameters and sums over D.
Only torch is imported.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)
# sigma in (e^-6, e^6): precision at most 1.6e5, so sums of precisions are finite in float32
LOG_SCALE_BOUND = 6.0


def soft_clamp(x: torch.Tensor, bound: float = LOG_SCALE_BOUND) -> torch.Tensor:
    """``bound * tanh(x / bound)``: about the identity near 0, smooth, never outside the bound."""
    return bound * torch.tanh(x / bound)


def log_mean_exp(x: torch.Tensor, dim: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log(mean(exp(x)))`` along ``dim``, over the entries where ``mask`` is true.

    Masked-out entries get a zero gradient. Every slice must keep at least one entry (the result
    would be ``-inf``).

    Args:
        x: log-values.
        dim: axis to average over.
        mask: bool, broadcastable to ``x``; ``None`` keeps every entry.
    """
    if mask is None:
        return torch.logsumexp(x, dim) - math.log(x.shape[dim])
    mask = mask.expand_as(x)
    x = torch.where(mask, x, torch.full_like(x, -math.inf))
    return torch.logsumexp(x, dim) - torch.log(mask.sum(dim).to(x.dtype))


# --- families -------------------------------------------------------------------------------


class _Family:
    """Shared parts of the location-scale families."""

    family = ""

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor, *, clamp: bool = True) -> None:
        """Args:
        loc: location, ``(..., D)``.
        log_scale: log of the scale, same shape.
        clamp: soft-clamp ``log_scale``; false for parameters that are already bounded (a
            product of clamped experts, a detached copy).
        """
        self.loc = loc
        self.log_scale = soft_clamp(log_scale) if clamp else log_scale

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def detach(self):
        """The same distribution with parameters cut from the graph (DReG density terms)."""
        return type(self)(self.loc.detach(), self.log_scale.detach(), clamp=False)

    def rsample(self, K: int = 1, temp: float = 1.0) -> torch.Tensor:
        """Reparameterised samples with a leading sample axis: ``(K, *loc.shape)``.

        Args:
            K: number of samples.
            temp: multiplies the scale (0 returns the location).
        """
        eps = self._noise((K, *self.loc.shape))
        return self.loc + temp * self.scale * eps

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density summed over the event axis: ``(..., B, D) -> (..., B)``."""
        raise NotImplementedError

    def kl_standard(self) -> torch.Tensor:
        """Closed-form KL to the family's standard prior, per dimension: ``(B, D)``."""
        raise NotImplementedError

    def entropy(self) -> torch.Tensor:
        """Entropy summed over the event axis: ``(B,)``."""
        raise NotImplementedError


class Normal(_Family):
    """Diagonal Normal; its standard prior is N(0, I)."""

    family = "normal"

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        e = (z - self.loc) * torch.exp(-self.log_scale)
        return (-0.5 * e * e - self.log_scale - 0.5 * LOG_2PI).sum(-1)

    def kl_standard(self) -> torch.Tensor:
        return 0.5 * (self.loc**2 + torch.exp(2.0 * self.log_scale) - 1.0) - self.log_scale

    def kl(self, other: Normal) -> torch.Tensor:
        """KL(self || other) between diagonal Normals, summed over the event axis: ``(B,)``."""
        var_ratio = torch.exp(2 * (self.log_scale - other.log_scale))
        mahalanobis = (self.loc - other.loc) ** 2 * torch.exp(-2 * other.log_scale)
        return (other.log_scale - self.log_scale + 0.5 * (var_ratio + mahalanobis) - 0.5).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (0.5 * (1.0 + LOG_2PI) + self.log_scale).sum(-1)


class Laplace(_Family):
    """Diagonal Laplace; its standard prior is Laplace(0, 1) (MMVAE uses Laplace priors)."""

    family = "laplace"

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        # inverse CDF; |u| < 1 keeps log1p finite
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device) * 2.0 - 1.0
        u = u.clamp(-1.0 + 1e-6, 1.0 - 1e-6)
        return -torch.sign(u) * torch.log1p(-u.abs())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return (-(z - self.loc).abs() * torch.exp(-self.log_scale) - self.log_scale - LOG_2).sum(
            -1
        )

    def kl_standard(self) -> torch.Tensor:
        a, b = self.loc.abs(), self.scale
        return -self.log_scale - 1.0 + a + b * torch.exp(-a / b)

    def entropy(self) -> torch.Tensor:
        return (1.0 + LOG_2 + self.log_scale).sum(-1)


FAMILIES = {"normal": Normal, "laplace": Laplace}
Distribution = Normal | Laplace


def make_dist(family: str, loc: torch.Tensor, log_scale: torch.Tensor) -> Distribution:
    """A posterior of ``family`` (``normal`` or ``laplace``) with a soft-clamped log-scale."""
    if family not in FAMILIES:
        raise ValueError(f"posterior family must be one of {sorted(FAMILIES)}, got {family!r}")
    return FAMILIES[family](loc, log_scale)


def standard(family: str, like: torch.Tensor, log_scale: torch.Tensor | None = None):
    """The family's zero-mean prior shaped like ``like`` (unit scale unless ``log_scale``)."""
    loc = torch.zeros_like(like)
    log_scale = torch.zeros_like(like) if log_scale is None else log_scale.expand_as(like)
    return FAMILIES[family](loc, log_scale, clamp=False)
