"""Distributions used by NVAE: soft-clamped Normal, discretised logistic mixture, Bernoulli.

References: NVAE (Vahdat & Kautz, 2020, arXiv 2007.03898) for the clamps and sigma floor;
PixelCNN++ (Salimans et al., 2017, arXiv 1701.05517) for the discretised mixture of logistics.
"""

from __future__ import annotations

import functools
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
        if temp == 1.0 and _tracked(mu, log_sigma):
            self.mu, self.sigma = _ClampedParams.apply(mu, log_sigma)
        else:
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
        args = (self.mu, self.sigma, other.mu, other.sigma)
        if _tracked(*args):
            return _NormalKL.apply(*args)
        return _kl(*args)

    def detach(self) -> Normal:
        out = Normal.__new__(Normal)
        out.mu, out.sigma = self.mu.detach(), self.sigma.detach()
        return out


def _kl(mu_q, sigma_q, mu_p, sigma_p) -> torch.Tensor:
    var_ratio = (sigma_q / sigma_p) ** 2
    t = ((mu_q - mu_p) / sigma_p) ** 2
    return 0.5 * (var_ratio + t - 1.0 - torch.log(var_ratio))


def _tracked(*ts: torch.Tensor) -> bool:
    """Whether autograd records an op on ``ts`` (and the memory-lean functions apply)."""
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in ts)
        and not torch.compiler.is_compiling()
    )


# The latent path saves for backward only mu and sigma of each distribution (and the sampling
# noise): autograd of the formulas above keeps about a dozen latent-sized tensors per group
# (tanh and exp outputs of the clamps, ratios and quotients of the KL).


class _ClampedParams(torch.autograd.Function):
    """(mu, sigma) = (5 tanh(m / 5), exp(5 tanh(l / 5)) + 0.01), with derivatives taken from
    the outputs: d mu / d m = 1 - (mu / 5)^2, d sigma / d l = e (1 - (log(e) / 5)^2) with
    e = sigma - 0.01 (at least exp(-5))."""

    @staticmethod
    def forward(ctx, mu, log_sigma):
        mu_c = soft_clamp5(mu)
        sigma = torch.exp(soft_clamp5(log_sigma)) + 1e-2
        ctx.save_for_backward(mu_c, sigma)
        return mu_c, sigma

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mu, g_sigma):
        mu_c, sigma = ctx.saved_tensors
        d_mu = d_ls = None
        if ctx.needs_input_grad[0] and g_mu is not None:
            t = mu_c / 5.0
            d_mu = g_mu * (1.0 - t * t)
        if ctx.needs_input_grad[1] and g_sigma is not None:
            e = sigma - 1e-2
            t = torch.log(e) / 5.0
            d_ls = g_sigma * e * (1.0 - t * t)
        return d_mu, d_ls


class _NormalKL(torch.autograd.Function):
    """Element-wise KL(N(mu_q, sigma_q) || N(mu_p, sigma_p)) saving only its four inputs."""

    @staticmethod
    def forward(ctx, mu_q, sigma_q, mu_p, sigma_p):
        ctx.save_for_backward(mu_q, sigma_q, mu_p, sigma_p)
        return _kl(mu_q, sigma_q, mu_p, sigma_p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        mu_q, sigma_q, mu_p, sigma_p = ctx.saved_tensors
        need = ctx.needs_input_grad
        inv_p2 = sigma_p.pow(-2)
        d = mu_q - mu_p
        g_mu = g * d * inv_p2 if need[0] or need[2] else None
        g_sq = g * (sigma_q * inv_p2 - 1.0 / sigma_q) if need[1] else None
        g_sp = None
        if need[3]:
            g_sp = g * (1.0 / sigma_p - (sigma_q * sigma_q + d * d) * inv_p2 / sigma_p)
        return (
            g_mu if need[0] else None,
            g_sq,
            -g_mu if need[2] else None,
            g_sp,
        )


def standard_normal_like(z: torch.Tensor, temp: float = 1.0) -> Normal:
    """The top prior N(0, I); its effective sigma is 1.01 because of the floor (on purpose)."""
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

    ``log_prob`` runs a fused kernel (``_DMoLLogProb``) that computes the gradient with respect
    to the parameters in the forward pass and keeps three full-size tensors for backward;
    ``_log_prob_autograd`` is the plain formula, used when ``x`` itself needs a gradient.
    """

    def __init__(self, params: torch.Tensor, channels: int, num_mix: int, num_bits: int = 8):
        self.params = params
        self.c, self.m = channels, num_mix
        self.levels = 2**num_bits - 1
        self.half_bin = 1.0 / self.levels  # half bin width in [-1, 1] units

    # the split views are built on demand: training only needs log_prob, which reads params
    @property
    def logit_pi(self) -> torch.Tensor:
        return self.params[:, : self.m]  # B, M, H, W

    def _split(self, i: int, n: int) -> torch.Tensor:
        b, _, h, w = self.params.shape
        lo = self.m + i * self.c * self.m
        return self.params[:, lo : lo + n * self.m].reshape(b, n, self.m, h, w)

    @functools.cached_property
    def means(self) -> torch.Tensor:
        return self._split(0, self.c)  # B, C, M, H, W

    @functools.cached_property
    def log_scales(self) -> torch.Tensor:
        return self._split(1, self.c).clamp(min=-7.0)

    @functools.cached_property
    def coeffs(self) -> torch.Tensor:
        return torch.tanh(self._split(2, self.c * (self.c - 1) // 2))

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
        if x01.requires_grad:
            return self._log_prob_autograd(x01)
        if torch.is_grad_enabled() and self.params.requires_grad:
            return _DMoLLogProb.apply(self.params, x01, self.c, self.m, self.half_bin)
        q, x, kdim = _layout(self.params, x01)
        outs = [
            _dmol_terms(qs, xs, kdim, self.c, self.m, self.half_bin, need_grad=False)[0]
            for qs, xs in _row_chunks(q, x, self.m)
        ]
        return _cat(outs).to(self.params.dtype)

    def _log_prob_autograd(self, x01: torch.Tensor) -> torch.Tensor:
        """The same density written as plain differentiable ops (the readable reference)."""
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
        inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
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


# --- fused DMoL log-likelihood ---------------------------------------------------------------
# The autograd version keeps about fifteen full-size (B, C, M, H, W) temporaries for backward and
# spends most of its time in softplus and where. Here the per-element log-probability and its two
# partial derivatives (d/d mean, d/d log-scale) are computed together in the forward pass, so
# backward is a few products. Work happens in the decoder output's own memory layout (the
# parameter axis is dim 1 for NCHW, dim 3 for channels-last) so nothing is transposed, and the
# rare branches (edge levels, underflowing CDF differences) run on their few elements only.


def _layout(params: torch.Tensor, x01: torch.Tensor):
    """Parameters and data in [-1, 1] as float32, with the parameter/colour axis at ``kdim``."""
    nhwc = params.dim() == 4 and not params.is_contiguous()
    nhwc = nhwc and params.is_contiguous(memory_format=torch.channels_last)
    q, x = params.float(), 2.0 * x01.float() - 1.0
    if nhwc:
        return q.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1).contiguous(), 3
    return q, x.contiguous(), 1


# Images per chunk: the fused terms below keep about a dozen (rows, C, M, H, W) temporaries
# alive at once, so the batch is processed a few images at a time (results do not depend on
# the split: every term is per pixel). On CPU a chunk of about 2**16 elements per temporary
# stays in cache and bounds the likelihood's share of the step's memory peak (e.g. 12 x 0.9 MB
# for 8 CIFAR-sized images at once); on an accelerator large chunks avoid extra kernel launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 16}
_CHUNK_ELEMENTS_OTHER = 1 << 24


def _row_chunks(q: torch.Tensor, x: torch.Tensor, m: int):
    """(parameters, data) pairs of consecutive images, split along the batch dimension."""
    per_row = max(m * x[0].numel(), 1)  # elements of one image's (C, M, H, W) temporary
    rows = max(1, _CHUNK_ELEMENTS.get(x.device.type, _CHUNK_ELEMENTS_OTHER) // per_row)
    if rows >= x.shape[0]:
        return [(q, x)]
    return list(zip(q.split(rows), x.split(rows)))


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _put(t: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
    t.view(-1)[idx] = v


def _dmol_terms(q, x, kdim: int, c: int, m: int, half_bin: float, need_grad: bool):
    """log p(x) per pixel and, if ``need_grad``, the tensors backward needs.

    Args:
        q: parameters with the K = M(1 + 2C + C(C-1)/2) axis at ``kdim``;
        x: data in [-1, 1] with the colour axis at ``kdim``.
    Returns:
        (log_prob without the K axis, dict of saved tensors or None).
    """
    cm, n_coef = c * m, c * (c - 1) // 2

    def block(start: int, n: int) -> torch.Tensor:  # (.., n, M, ..) slice of q
        return q.narrow(kdim, start, n * m).unflatten(kdim, (n, m))

    cdim, mdim = kdim, kdim + 1  # colour and component axes of the full-size tensors
    logit_pi = q.narrow(kdim, 0, m)
    means, ls_raw = block(m, c), block(m + cm, c)
    log_s = ls_raw.clamp(min=-7.0).contiguous()
    xe = x.unsqueeze(mdim)
    pairs = [(ch, j) for ch in range(1, c) for j in range(ch)]
    if pairs:
        coef = torch.tanh(block(m + 2 * cm, n_coef).contiguous())  # tanh is slow on strides
    mu = torch.empty(log_s.shape, dtype=q.dtype, device=q.device)
    mu.select(cdim, 0).copy_(means.select(cdim, 0))
    for ch in range(1, c):
        mc = means.select(cdim, ch)
        for k, (c_k, j) in enumerate(pairs):
            if c_k == ch:
                mc = mc + coef.select(cdim, k) * xe.select(cdim, j)
        mu.select(cdim, ch).copy_(mc)

    centered = xe - mu
    del mu
    # in-place where possible: every fresh full-size buffer costs page faults on CPU
    inv_s = torch.neg(log_s).exp_()
    plus = (centered + half_bin).mul_(inv_s)
    minus = (centered - half_bin).mul_(inv_s)
    sp, sm = torch.sigmoid(plus), torch.sigmoid(minus)
    delta = sp - sm
    lp = delta.clamp(min=1e-12).log_()
    # bins where the CDF difference underflows take the log pdf at the bin centre instead
    pdf_idx = (~(delta > 1e-5)).view(-1).nonzero().squeeze(1)
    g_mu = g_ls = None
    if need_grad:
        # d lp / d plus = s'(plus) / delta, d lp / d minus = -s'(minus) / delta
        r = delta.reciprocal_()
        g_plus = (1.0 - sp).mul_(sp).mul_(r)
        g_minus = (1.0 - sm).mul_(sm).mul_(r)
        del r
        g_mu = (g_minus - g_plus).mul_(inv_s)  # d plus / d mu = d minus / d mu = -1/s
        # d plus / d log s = -plus, likewise for minus
        g_ls = g_minus.mul_(minus).sub_(g_plus.mul_(plus))
        del g_plus, g_minus
    del delta

    if pdf_idx.numel():
        i = pdf_idx
        t_inv = inv_s.view(-1)[i]
        mid = centered.view(-1)[i] * t_inv
        _put(lp, i, mid - log_s.view(-1)[i] - 2.0 * F.softplus(mid) + math.log(2 * half_bin))
        if need_grad:
            d_mid = 1.0 - 2.0 * torch.sigmoid(mid)
            _put(g_mu, i, -t_inv * d_mid)
            _put(g_ls, i, -mid * d_mid - 1.0)

    # edge levels take the open tails: lower CDF at the lowest level, upper at the highest
    inner = x[0, 0].numel() if cdim == 1 else 1  # x elements after the colour axis
    offs = torch.arange(m, device=x.device) * inner
    for below in (True, False):
        edge = x < -1.0 + half_bin if below else x > 1.0 - half_bin
        e = edge.view(-1).nonzero()  # (n, 1) flat indices into x; each covers M elements
        if not e.numel():
            continue
        i = ((e // inner) * (m * inner) + e % inner + offs).view(-1)
        t_inv = inv_s.view(-1)[i]
        if below:
            t, d = plus.view(-1)[i], 1.0 - sp.view(-1)[i]
            _put(lp, i, t - F.softplus(t))  # log sigmoid(plus)
        else:
            t, d = minus.view(-1)[i], -sm.view(-1)[i]
            _put(lp, i, -F.softplus(t))  # log(1 - sigmoid(minus))
        if need_grad:
            _put(g_mu, i, -t_inv * d)
            _put(g_ls, i, -t * d)

    # logsumexp_m(L_m + log_softmax(pi)_m) = logsumexp_m(L_m + pi_m) - logsumexp_m(pi_m)
    lw = lp.sum(dim=cdim) + logit_pi
    lse_w = torch.logsumexp(lw, dim=kdim, keepdim=True)
    lse_pi = torch.logsumexp(logit_pi, dim=kdim, keepdim=True)
    out = (lse_w - lse_pi).squeeze(kdim)
    if not need_grad:
        return out, None
    g_ls.mul_(ls_raw >= -7.0)  # the clamp passes no gradient below -7
    resp = torch.exp(lw - lse_w)  # posterior over the components
    saved = dict(g_mu=g_mu, g_ls=g_ls, resp=resp, d_pi=resp - torch.exp(logit_pi - lse_pi))
    if pairs:
        # d mu_c / d coef_raw for each (c, j) pair: x_j (1 - tanh^2)
        xj = torch.stack([xe.select(cdim, j) for _, j in pairs], dim=cdim)
        saved["d_coef"] = (1.0 - coef * coef).mul_(xj)
    return out, saved


class _DMoLLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params, x01, c, m, half_bin):
        q, x, kdim = _layout(params, x01)
        outs, saved, rows = [], [], []
        for qs, xs in _row_chunks(q, x, m):
            out, terms = _dmol_terms(qs, xs, kdim, c, m, half_bin, need_grad=True)
            outs.append(out)
            saved += terms.values()
            rows.append(xs.shape[0])
        ctx.save_for_backward(*saved)
        ctx.c, ctx.m, ctx.kdim, ctx.dtype = c, m, kdim, params.dtype
        ctx.shape, ctx.rows = params.shape, rows
        return _cat(outs).to(params.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        c, m, kdim = ctx.c, ctx.m, ctx.kdim
        b, _, h, wd = ctx.shape
        shape = (b, h, wd, ctx.shape[1]) if kdim == 3 else tuple(ctx.shape)
        dq = torch.empty(shape, device=grad.device)
        saved = ctx.saved_tensors
        per_chunk = len(saved) // len(ctx.rows)
        go_all = grad.float().unsqueeze(kdim)
        start = 0
        for k, n in enumerate(ctx.rows):
            terms = saved[k * per_chunk : (k + 1) * per_chunk]
            go = go_all.narrow(0, start, n)
            _dmol_grad(dq.narrow(0, start, n), go, terms, c, m, kdim)
            start += n
        if kdim == 3:
            dq = dq.permute(0, 3, 1, 2)
        return dq.to(ctx.dtype), None, None, None, None


def _dmol_grad(dq: torch.Tensor, go: torch.Tensor, terms, c: int, m: int, kdim: int) -> None:
    """Write d log p / d params of a chunk of images into ``dq`` (the layout of ``q``)."""
    g_mu, g_ls, resp, d_pi, *d_coef = terms
    cdim = kdim
    w = (go * resp).unsqueeze(cdim)  # each component's share of the gradient
    n_coef = c * (c - 1) // 2

    def block(start: int, n: int) -> torch.Tensor:
        return dq.narrow(kdim, start, n * m).unflatten(kdim, (n, m))

    torch.mul(go, d_pi, out=dq.narrow(kdim, 0, m))
    d_mu = block(m, c)
    torch.mul(g_mu, w, out=d_mu)
    torch.mul(g_ls, w, out=block(m + c * m, c))
    if n_coef:
        d_cf = block(m + 2 * c * m, n_coef)
        pairs = [(ch, j) for ch in range(1, c) for j in range(ch)]
        for k, (ch, _) in enumerate(pairs):
            torch.mul(d_mu.select(cdim, ch), d_coef[0].select(cdim, k), out=d_cf.select(cdim, k))
