"""NVAE training objective pieces: KL warm-up and balancing, spectral and BN regularisers,
the learning-rate schedule and the importance-weighted bound.

NVAE (Vahdat & Kautz, 2020, arXiv 2007.03898) Sec. 3.2 and appendix A; KL balancing follows
DVAE++ (Vahdat et al., 2018, arXiv 1802.04920) Sec. H. Every schedule is a pure function of the
global optimizer step, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from jointgen.models.nvae.layers import WNConv2d

# --- schedules -------------------------------------------------------------------------------


def kl_coeff(
    step: int, total_steps: int, anneal_portion: float, const_portion: float, min_coeff: float
) -> float:
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


def lr_factor(
    step: int, steps_per_epoch: int, warmup_epochs: float, epochs: int, lr: float, lr_min: float
) -> float:
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


def balanced_kl(
    kl: torch.Tensor, alphas: torch.Tensor, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
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


def _conv_matrix(m: nn.Conv2d) -> tuple[torch.Tensor, bool]:
    """The weight as a (Cout, Cin*kh*kw) float matrix, a view where possible, and whether its
    columns are in channels-last order (kh, kw, Cin) rather than (Cin, kh, kw). Singular values
    do not depend on the column order; only v has to be permuted to match."""
    w = (m.normalized_weight() if isinstance(m, WNConv2d) else m.weight).float()
    if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), True
    return w.reshape(w.shape[0], -1), False


def _nchw_matrix(m: nn.Conv2d) -> torch.Tensor:
    w = (m.normalized_weight() if isinstance(m, WNConv2d) else m.weight).float()
    return w.reshape(w.shape[0], -1)


def _v_to_nhwc(v: torch.Tensor, kshape: torch.Size) -> torch.Tensor:
    return v.unflatten(1, kshape).permute(0, 2, 3, 1).flatten(1)


def _v_to_nchw(v: torch.Tensor, kshape: torch.Size) -> torch.Tensor:
    cin, kh, kw = kshape
    return v.unflatten(1, (kh, kw, cin)).permute(0, 3, 1, 2).flatten(1)


# on CPU, matrices at least this large are iterated one by one instead of being stacked:
# stacking copies every weight each step, which costs more than the per-matrix calls it saves
# (on a GPU the copy is cheap and the calls are not, so everything is stacked there)
_STACK_BELOW = 1 << 16


class SpectralRegularizer(nn.Module):
    """Sum over every conv of its largest singular value, by batched power iteration.

    Weights are grouped by matrix shape (Cout, Cin*k*k) and iterated together (on CPU large
    matrices one at a time, which avoids copying them). The u and v vectors are registered
    buffers, so they are saved in checkpoints and resumed exactly (the reference kept them in
    Python dicts); v is stored in (Cin, kh, kw) order whatever the weights' memory layout.
    4 iterations per call, 40 on the first.
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
        for i, (r, c) in enumerate(self.shapes):
            n = len(self.names[i])
            self.register_buffer(f"u{i}", F.normalize(torch.randn(n, r), dim=1, eps=1e-3))
            self.register_buffer(f"v{i}", F.normalize(torch.randn(n, c), dim=1, eps=1e-3))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._net: weakref.ref | None = None
        self._convs: list[list[weakref.ref]] = []

    def _conv_groups(self, net: nn.Module) -> list[list[nn.Module]]:
        # the convs are looked up by name once per network and held by weak reference:
        # holding them directly would register them twice (and pickle or copy them with us)
        if self._net is not None and self._net() is net:
            convs = [[r() for r in refs] for refs in self._convs]
            if all(m is not None for ms in convs for m in ms):
                return convs
        modules = dict(net.named_modules())
        convs = [[modules[n] for n in names] for names in self.names]
        self._net = weakref.ref(net)
        self._convs = [[weakref.ref(m) for m in ms] for ms in convs]
        return convs

    def forward(self, net: nn.Module) -> torch.Tensor:
        iters = self.iters if bool(self.initialized) else self.first_iters
        total = 0.0
        with torch.autocast(device_type=self.u0.device.type, enabled=False):  # fp32 always
            for i, convs in enumerate(self._conv_groups(net)):
                u_all, v_all = getattr(self, f"u{i}"), getattr(self, f"v{i}")
                mats = [_conv_matrix(m) for m in convs]
                r, c = self.shapes[i]
                n = len(convs)
                stack = r * c < _STACK_BELOW or u_all.device.type != "cpu"
                parts = [range(n)] if stack else [range(k, k + 1) for k in range(n)]
                for part in parts:
                    sigma = self._part_sigma(part, convs, mats, u_all, v_all, iters)
                    total = total + sigma.sum()
        if self.training:
            self.initialized.fill_(True)
        return total

    def _part_sigma(self, part, convs, mats, u_all, v_all, iters: int) -> torch.Tensor:
        """Power-iterate the matrices ``part`` of one shape group; returns their u^T W v."""
        sl = slice(part[0], part[-1] + 1)
        kshape = convs[part[0]].weight.shape[1:]
        # one column order for the whole batch: matrices in NHWC order are used as they are
        nhwc = all(mats[k][1] and convs[k].weight.shape[1:] == kshape for k in part)
        ws = [mats[k][0] if nhwc or not mats[k][1] else _nchw_matrix(convs[k]) for k in part]
        w = ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws)  # n, r, c
        u, v = u_all[sl], v_all[sl]
        with torch.no_grad():
            v = _v_to_nhwc(v, kshape) if nhwc else v
            wd = w.detach()
            wt = wd.transpose(1, 2)
            for _ in range(iters):
                # row vector times matrix: on CPU a batched W @ v is several times slower
                v = F.normalize(torch.bmm(u.unsqueeze(1), wd).squeeze(1), dim=1, eps=1e-3)
                u = F.normalize(torch.bmm(v.unsqueeze(1), wt).squeeze(1), dim=1, eps=1e-3)
            if self.training:
                u_all[sl].copy_(u)
                v_all[sl].copy_(_v_to_nchw(v, kshape) if nhwc else v)
        return torch.bmm(torch.bmm(u.unsqueeze(1), w), v.unsqueeze(2))  # u^T W v

    def __getstate__(self):  # weak references cannot be pickled; they are rebuilt on demand
        return {**self.__dict__, "_net": None, "_convs": []}


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
