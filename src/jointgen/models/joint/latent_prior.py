"""Learned mixture priors over the shared latent z, fitted to the image posteriors.

A single Gaussian caption expert q(z | caption) that covers every image posterior its caption
goes with (``kl_align``) puts mass between them, and its samples decode to averages (a square
averaged over its rotations is a disc). The standard prior p(z) is worse still for joint
sampling: most of it lies far from any image posterior. Both are replaced at generation time by
mixture densities fitted, by maximum likelihood, to samples of the image posteriors
(a stage-2 prior in the sense of spec ``joint_vae.md`` §3.9, but trained alongside the model):

* ``ConditionalMixturePrior``, p(z | caption): a mixture density network (Bishop 1994,
  "Mixture density networks", Aston NCRG/94/004) reading the caption expert's (loc, log_scale);
  its component means are offsets from the expert's loc. Used by caption-to-image generation.
* ``MixturePrior``: an unconditional Gaussian mixture (the aggregate image posterior), used by
  joint generation.

Their loss reads detached experts and samples, so it trains their own parameters only: the
bound and every other gradient are unchanged. Only torch is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from jointgen.models.joint.distributions import Normal, soft_clamp


class GaussianMixture:
    """Diagonal Gaussian mixture with ``K`` components over the last axis of z.

    Args:
        log_weights: normalised log mixture weights ``(..., K)``.
        loc: component means ``(..., K, D)``.
        log_scale: component log standard deviations ``(..., K, D)``.
    """

    def __init__(
        self, log_weights: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor
    ) -> None:
        self.log_weights, self.loc, self.log_scale = log_weights, loc, log_scale

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of ``z`` ``(..., D)`` (broadcast against the batch shape) -> ``(...)``."""
        per_component = Normal(self.loc, self.log_scale, clamp=False).log_prob(z.unsqueeze(-2))
        return torch.logsumexp(self.log_weights + per_component, -1)

    def sample(self, temp: float = 1.0) -> torch.Tensor:
        """One draw per batch element ``(..., D)``: a component by its weight, then its Normal
        with the scale × ``temp``. ``temp = 0`` returns the mean of the heaviest component."""
        if temp == 0:
            k = self.log_weights.argmax(-1)
        else:
            k = torch.distributions.Categorical(logits=self.log_weights).sample()
        idx = k[..., None, None].expand(*k.shape, 1, self.loc.shape[-1])
        loc, log_scale = (t.gather(-2, idx).squeeze(-2) for t in (self.loc, self.log_scale))
        return Normal(loc, log_scale, clamp=False).rsample(1, temp)[0]


def _check(z_dim: int, components: int) -> None:
    if z_dim < 1 or components < 1:
        raise ValueError(f"need z_dim >= 1 and components >= 1, got {z_dim}, {components}")


class MixturePrior(nn.Module):
    """Unconditional diagonal Gaussian mixture over z (for joint sampling).

    Args:
        z_dim: latent size D.
        components: mixture components K.
    """

    def __init__(self, z_dim: int, components: int) -> None:
        super().__init__()
        _check(z_dim, components)
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(torch.randn(components, z_dim))  # spread like p(z)
        self.log_scale = nn.Parameter(torch.zeros(components, z_dim))

    def forward(self, n: int | None = None) -> GaussianMixture:
        """The mixture; with ``n``, repeated over a batch of ``n`` (for ``sample``)."""
        log_w, loc, log_scale = self.logits.log_softmax(-1), self.loc, soft_clamp(self.log_scale)
        if n is not None:
            log_w, loc, log_scale = (t.expand(n, *t.shape) for t in (log_w, loc, log_scale))
        return GaussianMixture(log_w, loc, log_scale)


class ConditionalMixturePrior(nn.Module):
    """p(z | caption) as a mixture density network on the caption expert's parameters.

    Args:
        z_dim: latent size D.
        components: mixture components K.
        hidden: width of the two hidden layers.
    """

    def __init__(self, z_dim: int, components: int, hidden: int = 256) -> None:
        super().__init__()
        _check(z_dim, components)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.z_dim, self.components = z_dim, components
        self.net = nn.Sequential(
            nn.Linear(2 * z_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, components * (1 + 2 * z_dim)),
        )

    def forward(self, expert: Normal) -> GaussianMixture:
        """The mixture given the caption expert (its parameters are read detached)."""
        loc, log_scale = expert.loc.detach(), expert.log_scale.detach()
        h = self.net(torch.cat([loc, log_scale], -1))
        K, D = self.components, self.z_dim
        logits, d_loc, d_scale = h.split([K, K * D, K * D], -1)
        shape = (*loc.shape[:-1], K, D)
        # offsets from the expert: at initialisation every component is near q(z | caption)
        mix_loc = loc.unsqueeze(-2) + d_loc.reshape(shape)
        mix_log_scale = soft_clamp(log_scale.unsqueeze(-2) + d_scale.reshape(shape))
        return GaussianMixture(logits.log_softmax(-1), mix_loc, mix_log_scale)


def mixture_nll(
    mixture: GaussianMixture, target: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Mean of ``-log p(target)`` over the kept samples (0 when none), a scalar; ``target``
    ``(B, D)`` is detached here."""
    nll = -mixture.log_prob(target.detach())
    n = keep.sum()
    return torch.where(keep, nll, torch.zeros_like(nll)).sum() / n.clamp(min=1)


def prior_losses(
    caption_prior: ConditionalMixturePrior | None,
    joint_prior: MixturePrior | None,
    q_txt: Normal,
    target: torch.Tensor,
    paired: torch.Tensor,
    observed: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed maximum-likelihood loss of the configured priors on draws ``target`` ``(B, D)``
    of the image posteriors (the caption prior, given ``q_txt``, on the ``paired`` rows; the
    joint prior on the ``observed`` rows) and its detached terms ``prior_nll/caption`` and
    ``prior_nll/joint``."""
    loss, terms = torch.zeros((), device=target.device), {}
    if caption_prior is not None:
        nll = mixture_nll(caption_prior(q_txt), target, paired)
        terms["prior_nll/caption"], loss = nll.detach(), loss + nll
    if joint_prior is not None:
        nll = mixture_nll(joint_prior(), target, observed)
        terms["prior_nll/joint"], loss = nll.detach(), loss + nll
    return loss, terms


def fit_mixture_priors(
    caption_prior: ConditionalMixturePrior | None,
    joint_prior: MixturePrior | None,
    q_img: Normal,
    q_txt: Normal,
    paired: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
) -> dict[str, float]:
    """Refit the priors on fixed posteriors (a stage-2 fit): ``steps`` Adam steps of maximum
    likelihood on fresh draws from the image posteriors of random rows.

    Online, the priors chase image posteriors that move with every step and lag behind them
    (README, joint model); refitting on the frozen encoder closes that gap.

    Args:
        caption_prior, joint_prior: the priors to fit (either may be None).
        q_img, q_txt: unimodal posteriors of N image-caption rows, ``(N, D)``.
        paired: ``(N,)`` bool, rows whose caption is observed (the caption prior's rows).
        steps, batch_size, lr: the fit's Adam steps, rows per step and learning rate.

    Returns:
        The final step's ``prior_nll/caption`` and ``prior_nll/joint`` (nats).
    """
    modules = [m for m in (caption_prior, joint_prior) if m is not None]
    if not modules or steps <= 0:
        return {}
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    n, out = q_img.loc.shape[0], {}
    for _ in range(steps):
        rows = torch.randint(0, n, (batch_size,), device=q_img.loc.device)
        target = Normal(q_img.loc[rows], q_img.log_scale[rows], clamp=False).rsample(1)[0]
        q = Normal(q_txt.loc[rows], q_txt.log_scale[rows], clamp=False)
        both, every = paired[rows], torch.ones_like(paired[rows])
        loss, out = prior_losses(caption_prior, joint_prior, q, target, both, every)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: float(v) for k, v in out.items()}
