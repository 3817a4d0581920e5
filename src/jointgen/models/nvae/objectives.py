"""NVAE training objective pieces: KL warm-up and balancing, spectral and BN regularisers,
the learning-rate schedule and the importance-weighted bound.

NVAE (Vahdat & Kautz, 2020, arXiv 2007.03898) Sec. 3.2 and appendix A; KL balancing follows
DVAE++ (Vahdat et al., 2018, arXiv 1802.04920) Sec. H. Every schedule is a pure function of the
global optimizer step, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from jointgen.models.nvae.layers import WNConv2d

# --- schedules -------------------------------------------------------------------------------


def kl_coeff(step: int, total_steps: int, anneal_portion: float, const_portion: float,
             min_coeff: float) -> float:
    """KL warm-up ``k = max(min((step - c) / A, 1), k_min)`` with ``A = anneal_portion * T`` and
    ``c = const_portion * T`` (T = total optimizer steps)."""
    anneal = max(anneal_portion * total_steps, 1e-8)
    return max(min((step - const_portion * total_steps) / anneal, 1.0), min_coeff)


def reg_coeff(k: float, lam: float, lam_init: float, anneal: bool) -> float:
    """Spectral/BN coefficient: geometric interpolation from ``lam_init`` to ``lam`` driven by the
    KL coefficient ``k`` (reaches ``lam`` when the KL warm-up ends)."""
    if not anneal:
        return lam
    return math.exp((1.0 - k) * math.log(lam_init) + k * math.log(lam))


def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, epochs: int,
              lr: float, lr_min: float) -> float:
    """Multiplier of the base lr: linear warm-up per *step*, then cosine stepped per *epoch*.

    The cosine has ``T_max = epochs - warmup_epochs - 1`` and ``eta_min = lr_min``, and is
    advanced once at the start of each epoch after the warm-up epochs (as in the reference).
    Warm-up uses ``(step + 1) / warmup_iters`` so the very first step is not wasted at lr 0.
    """
    warmup_iters = warmup_epochs * steps_per_epoch
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    epoch = step // max(steps_per_epoch, 1)
    n = max(0, epoch - math.ceil(warmup_epochs))
    t_max = max(epochs - warmup_epochs - 1, 1)
    n = min(n, t_max)
    cos = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * n / t_max)) / 2
    return cos / lr


# --- KL balancing ----------------------------------------------------------------------------


def balance_alphas(groups_per_scale: list[int]) -> torch.Tensor:
    """Static per-group weights: ``alpha_i = 4**i / groups_i`` for scale i (i = 0 the top),
    normalised so min(alpha) = 1. Returned in decoder order (top group first)."""
    top_first = list(reversed(groups_per_scale))
    alphas = []
    for i, n in enumerate(top_first):
        alphas += [(2**i) ** 2 / n] * n
    a = torch.tensor(alphas)
    return a / a.min()


def balanced_kl(kl: torch.Tensor, alphas: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL_bal per image, (B,), and the coefficients c_l.

    While ``k < 1``: ``c_l = (mean_batch |KL_l| + 0.01) / alpha_l``, rescaled to mean 1 over the
    groups and detached; afterwards every ``c_l = 1``.
    """
    if k >= 1.0:
        c = torch.ones(kl.shape[1], device=kl.device)
        return kl.sum(1), c
    c = (kl.detach().abs().mean(0) + 0.01) / alphas.to(kl.device)
    c = c / c.mean()
    return (kl * c).sum(1), c


# --- spectral regularisation -----------------------------------------------------------------


def _conv_weight(m: nn.Conv2d) -> torch.Tensor:
    w = m.normalized_weight() if isinstance(m, WNConv2d) else m.weight
    return w.reshape(w.shape[0], -1)


class SpectralRegularizer(nn.Module):
    """Sum over every conv of its largest singular value, by batched power iteration.

    Weights are grouped by matrix shape (Cout, Cin*k*k) and iterated together. The u and v
    vectors are registered buffers, so they are saved in checkpoints and resumed exactly
    (the reference kept them in Python dicts). 4 iterations per call, 40 on the first.
    """

    def __init__(self, net: nn.Module, iters: int = 4, first_iters: int = 40) -> None:
        super().__init__()
        self.iters, self.first_iters = iters, first_iters
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name, m in net.named_modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                groups[(w.shape[0], w[0].numel())].append(name)
        self.shapes = sorted(groups)
        self.names = [groups[s] for s in self.shapes]
        # modules are looked up by name at call time; holding them here would register them twice
        for i, (r, c) in enumerate(self.shapes):
            n = len(self.names[i])
            self.register_buffer(f"u{i}", F.normalize(torch.randn(n, r), dim=1, eps=1e-3))
            self.register_buffer(f"v{i}", F.normalize(torch.randn(n, c), dim=1, eps=1e-3))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, net: nn.Module) -> torch.Tensor:
        modules = dict(net.named_modules())
        iters = self.iters if bool(self.initialized) else self.first_iters
        total = 0.0
        with torch.autocast(device_type=self.u0.device.type, enabled=False):  # fp32 always
            for i, names in enumerate(self.names):
                w = torch.stack([_conv_weight(modules[n]).float() for n in names])  # n, r, c
                u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
                with torch.no_grad():
                    wd = w.detach()
                    for _ in range(iters):
                        v = F.normalize(torch.einsum("nrc,nr->nc", wd, u), dim=1, eps=1e-3)
                        u = F.normalize(torch.einsum("nrc,nc->nr", wd, v), dim=1, eps=1e-3)
                    if self.training:
                        getattr(self, f"u{i}").copy_(u)
                        getattr(self, f"v{i}").copy_(v)
                sigma = torch.einsum("nr,nrc,nc->n", u, w, v)
                total = total + sigma.sum()
        if self.training:
            self.initialized.fill_(True)
        return total


def bn_loss(net: nn.Module) -> torch.Tensor:
    """Sum over affine BatchNorms of max |gamma| (the NVAE BN penalty)."""
    terms = [
        m.weight.abs().max()
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


# --- importance-weighted bound ---------------------------------------------------------------


@torch.no_grad()
def iw_log_likelihood(net: nn.Module, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Importance-weighted estimate of log p(x), shape (B,), in nats.

    ``log p(x) ~ logsumexp_k [log p(x|z_k) + sum_groups (log p(z_k) - log q(z_k|x))] - log K``.
    K = 1 gives the ELBO with a single sample (log q - log p instead of the analytic KL).
    """
    ws = []
    for _ in range(num_samples):
        out = net(x)
        ll = net.log_likelihood(out, x)
        ws.append(ll + (out.log_p - out.log_q).sum(1))
    w = torch.stack(ws)
    return torch.logsumexp(w, 0) - math.log(num_samples)


def bits_per_dim(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    return nll_nats / (math.log(2.0) * num_dims)
