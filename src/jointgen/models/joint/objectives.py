"""Bounds of the joint VAE: stratified MMVAE/MMVAE+ bounds, PoE with sub-sampling, MoPoE.

Spec §3.5-3.7. Every bound is returned per sample ``(B,)`` and is averaged over the strata
(or PoE terms, or MoPoE subsets) that the sample observed; unobserved reconstructions and strata
enter only through ``torch.where`` and have exactly zero effect on values and gradients.

* ``stratified_bound`` (``moe``, ``mmvae_plus``): for each observed modality m, K samples
  z ~ q_m(z | x_m) and log importance weights log p(z, X) - log q_mix(z | X) (MMVAE, Shi et al.
  2019, arXiv 1911.03393). ``iwae`` scores the log of the mean weight over all observed strata
  and samples; ``looser`` averages the per-stratum bounds outside the log. MMVAE+ (Palumbo et al.,
  ICLR 2023, openreview sPsPnzTRBl): in stratum m, x_m is decoded from (z, w_m ~ q(w_m | x_m))
  and every other x_n from (z, w_n ~ r_n); the log density ratio is multiplied by beta.
  With ``moe`` every observed modality uses its own posterior w_n (set w_dim = 0 for plain MMVAE).
* ``poe_bound``: the joint PoE term plus one term per observed modality (MVAE sub-sampling, Wu &
  Goodman 2018, arXiv 1802.05335; without the unimodal terms cross-modal inference fails).
* ``mopoe_bound``: ELBO with the subset-KL upper bound (Sutter et al. 2021, arXiv 2105.02470).

Objectives: ``elbo`` (mean over the K samples; closed-form KL for ``poe``/``mopoe``), ``iwae``
(log-mean-exp), ``dreg`` (IWAE value, doubly reparameterised encoder gradients, Tucker et al.
2019, arXiv 1810.04152: posterior parameters detached inside the densities, and a gradient hook
on every reparameterised sample multiplies its gradient by the normalised importance weight once
more, giving the squared weights). The KL warm-up coefficient multiplies beta. Only torch is
imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from jointgen.models.joint.branch import BranchTerms
from jointgen.models.joint.collapse import free_bits
from jointgen.models.joint.distributions import Distribution, log_mean_exp, standard
from jointgen.models.joint.fusion import moe, mopoe, poe

MODALITIES = ("img", "txt")
OBJECTIVES = ("elbo", "iwae", "dreg")
SCALE_MODES = ("auto_dim_ratio", "auto_upweight", "none")


def resolve_likelihood_scales(
    mode: str | Mapping[str, float], dims: Mapping[str, int]
) -> dict[str, float]:
    """Per-modality log-likelihood multipliers (spec §3.6).

    Args:
        mode: ``auto_dim_ratio`` (image × D_txt / D_img, MMVAE), ``auto_upweight`` (each
            modality × D_max / D_m, MoPoE), ``none`` (all 1), or an explicit mapping
            ``{"img": float, "txt": float}``.
        dims: D_m per modality (C·H·W for images, L for captions).
    """
    if isinstance(mode, Mapping):
        if set(mode) != set(dims):
            raise ValueError(f"explicit likelihood scales need keys {sorted(dims)}, got {mode}")
        scales = {m: float(mode[m]) for m in dims}
        if any(s <= 0 for s in scales.values()):
            raise ValueError(f"likelihood scales must be > 0, got {scales}")
        return scales
    if mode == "auto_dim_ratio":
        return {m: dims["txt"] / dims[m] if m == "img" else 1.0 for m in dims}
    if mode == "auto_upweight":
        return {m: max(dims.values()) / dims[m] for m in dims}
    if mode == "none":
        return {m: 1.0 for m in dims}
    raise ValueError(f"likelihood_scale must be one of {SCALE_MODES} or a mapping, got {mode!r}")


@dataclass
class Encoded:
    """A batch after the encoders: data, masks, experts and private-posterior features."""

    x: dict[str, torch.Tensor]
    obs: dict[str, torch.Tensor]
    experts: dict[str, Distribution]
    features: dict[str, Any]


@dataclass
class BoundOptions:
    """Settings of one bound evaluation (see ``JointVAE`` for their meaning)."""

    objective: str
    K: int
    looser: bool
    coeff: float  # beta × KL warm-up coefficient
    scales: dict[str, float]
    family: str
    prior_expert: bool = True
    expert_weights: list[torch.Tensor] | None = None
    free_bits: float = 0.0
    mopoe_sampling: str = "batch_split"
    cross_frozen: tuple[str, ...] = ()  # decoders that take no parameter gradient from cross terms
    kl_align: tuple[str, ...] = ()  # modalities whose cross likelihood is replaced by KL matching
    kl_align_weight: float = 1.0
    kl_align_direction: str = "forward"  # forward KL(sg q_n || q_m) | reverse KL(q_m || sg q_n)
    shared_recon: tuple[str, ...] = ()  # modalities also decoded from (z ~ q_m, w ~ r_m)
    shared_recon_weight: float = 1.0


class TermLog:
    """Masked running means of the logged terms (detached scalars)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor, mask: torch.Tensor) -> None:
        value = value.detach().reshape(-1, mask.shape[0])  # (K, B) or (1, B)
        keep = mask.expand_as(value)
        total = torch.where(keep, value, torch.zeros_like(value)).sum()
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + keep.sum()

    def means(self) -> dict[str, torch.Tensor]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}


def _zero_where(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros_like(x))


def log_weight(
    terms: dict[str, BranchTerms],
    obs: dict[str, torch.Tensor],
    density: torch.Tensor,
    posterior: dict[str, bool],
    opts: BoundOptions,
    log: TermLog,
    valid: torch.Tensor,
    own: str | None,
    closed_form: bool,
) -> torch.Tensor:
    """sum_n s_n log p(x_n | z, w_n) + coeff × (density + private terms), ``(K, B)``.

    Args:
        terms: ``BranchTerms`` of the decoded modalities.
        obs: observation masks.
        density: log p(z) - log q(z | X) ``(K, B)``, or minus the closed-form KL ``(B,)``.
        posterior: which modalities drew w from their posterior (their density terms count).
        opts: bound settings.
        log: where the logged terms go (only on ``valid`` samples).
        valid: samples for which this stratum counts.
        own: the stratum's modality (its likelihood is logged as ``loglik``, the others as
            ``loglik_cross``); None logs every modality as ``loglik``.
        closed_form: use ``BranchTerms.kl`` instead of the Monte Carlo ``log_ratio``.
    """
    recon = 0.0
    log.add("kl/z", -density, valid)
    for n, t in terms.items():
        keep = obs[n] & valid
        recon = recon + opts.scales[n] * _zero_where(keep, t.log_px)
        name = "loglik" if own in (None, n) else "loglik_cross"
        log.add(f"{name}/{n}", t.log_px, keep)
        log.add(f"{name}_scaled/{n}", opts.scales[n] * t.log_px, keep)
        if posterior[n]:
            private = -t.kl if closed_form else t.log_ratio
            density = density + _zero_where(keep, private)
            log.add(f"kl/w_{n}", -private, keep)
    return recon + opts.coeff * density


def reduce_strata(
    lws: list[torch.Tensor],
    valid: list[torch.Tensor],
    latents: list[list[torch.Tensor]],
    objective: str,
    looser: bool,
) -> torch.Tensor:
    """Per-sample bound ``(B,)`` from per-stratum log weights ``(K, B)``.

    ``elbo``: mean over samples, averaged over valid strata. ``iwae``: log-mean-exp over all
    valid (stratum, sample) pairs, or with ``looser`` per stratum, averaged outside the log.
    ``dreg``: the ``iwae`` value; its gradient is the DReG surrogate, with hooks on ``latents``
    (the reparameterised samples of each stratum) that multiply by the normalised weights.
    """
    lw, mask = torch.stack(lws), torch.stack(valid)  # S, K, B and S, B
    n_valid = mask.sum(0).to(lw.dtype)
    if objective == "elbo":
        return _zero_where(mask, lw.mean(1)).sum(0) / n_valid
    keep = mask.unsqueeze(1).expand_as(lw)
    S, K, B = lw.shape
    if looser:
        value = _zero_where(mask, log_mean_exp(lw, 1)).sum(0) / n_valid
    else:
        value = log_mean_exp(lw.reshape(S * K, B), 0, keep.reshape(S * K, B))
    if objective == "iwae":
        return value
    with torch.no_grad():
        masked = torch.where(keep, lw, torch.full_like(lw, -torch.inf))
        if looser:
            wt = torch.softmax(masked, dim=1)
        else:
            wt = torch.softmax(masked.reshape(S * K, B), dim=0).reshape(S, K, B)
        wt = _zero_where(keep, wt)  # also clears the NaNs of fully invalid strata
    for s, tensors in enumerate(latents):
        for t in tensors:
            if t.requires_grad:
                w_s = wt[s].view(K, B, *([1] * (t.dim() - 2)))
                t.register_hook(lambda g, w_s=w_s: g * w_s)
    surrogate = _zero_where(keep, wt * lw).sum(1)  # S, B
    surrogate = surrogate.sum(0) / n_valid if looser else surrogate.sum(0)
    return value.detach() + surrogate - surrogate.detach()


# --- the three families of bounds -----------------------------------------------------------


class _Call(nn.Module):
    """``branch.log_likelihood`` as a module's forward, for ``functional_call``."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, *args, **kwargs) -> Any:
        return self.branch.log_likelihood(*args, **kwargs)


def frozen_log_likelihood(branch: nn.Module, *args, **kwargs) -> Any:
    """``branch.log_likelihood`` with the branch's parameters detached (the private latent's
    own parameters excepted: the MMVAE+ auxiliary prior learns only from cross terms).
    Gradients still reach z, so a cross term trains the other modality's encoder to put z
    where this decoder, shaped by its own modality's reconstructions alone, draws the data
    — instead of teaching the decoder to draw the blurred average of everything a caption
    allows."""
    params = {
        f"branch.{k}": v if k.startswith("private.") else v.detach()
        for k, v in branch.named_parameters()
    }
    return functional_call(_Call(branch), params, args, kwargs, strict=False)


def _decode(
    branches, enc: Encoded, z, posterior: dict[str, bool], modalities, dreg: bool,
    frozen: tuple[str, ...] = (),
):  # fmt: skip
    out = {}
    for n in modalities:
        args = (enc.x[n], z, enc.features[n])
        kw = {"posterior": posterior[n], "detach_posterior": dreg}
        if n in frozen:
            out[n] = frozen_log_likelihood(branches[n], *args, **kw)
        else:
            out[n] = branches[n].log_likelihood(*args, **kw)
    return out


def stratified_bound(
    branches: Mapping[str, Any], enc: Encoded, opts: BoundOptions, plus: bool
) -> tuple[torch.Tensor, TermLog]:
    """MMVAE (``plus=False``) or MMVAE+ (``plus=True``) stratified bound, per sample ``(B,)``."""
    dreg = opts.objective == "dreg"
    mixture = moe([enc.experts[m] for m in MODALITIES], [enc.obs[m] for m in MODALITIES])
    density_q = mixture.detach() if dreg else mixture
    log, lws, valid, latents = TermLog(), [], [], []
    for m in MODALITIES:
        z = enc.experts[m].rsample(opts.K)
        posterior = {n: n == m or not plus for n in MODALITIES}
        frozen = tuple(n for n in opts.cross_frozen if n != m)
        decoded = [n for n in MODALITIES if n == m or n not in opts.kl_align]
        terms = _decode(branches, enc, z, posterior, decoded, dreg, frozen)
        density = standard(opts.family, z[0]).log_prob(z) - density_q.log_prob(z)
        lws.append(log_weight(terms, enc.obs, density, posterior, opts, log, enc.obs[m], m, False))
        valid.append(enc.obs[m])
        latents.append([z] + [w for t in terms.values() for w in t.latents])
    bound = reduce_strata(lws, valid, latents, opts.objective, opts.looser)
    return bound - kl_align_penalty(enc, opts, log), log


def shared_recon_term(
    branches: Mapping[str, Any], enc: Encoded, opts: BoundOptions, log: TermLog
) -> torch.Tensor:
    """Sum over m in ``opts.shared_recon`` of weight × s_m × mean over K of log p(x_m | z, w)
    with z ~ q_m(z | x_m) and w ~ r_m(w), the auxiliary prior, ``(B,)`` (0 where x_m is
    absent; 0 when the list is empty): x_m decoded from its own shared sample while the
    private latent says nothing about it. With a private latent the decoder could draw the
    captioned attributes from w as well as from z, and then draws them wrong when w comes from
    a prior (caption-to-image); this term rewards drawing from z whatever z carries. Not part
    of the bound (the loss adds it; ``val/nelbo`` does not): logged as ``loglik_shared/<m>``."""
    total = torch.zeros((), device=next(iter(enc.obs.values())).device)
    for m in opts.shared_recon:
        z = enc.experts[m].rsample(opts.K)
        t = branches[m].log_likelihood(enc.x[m], z, enc.features[m], posterior=False)
        log.add(f"loglik_shared/{m}", t.log_px, enc.obs[m])
        value = _zero_where(enc.obs[m], t.log_px.mean(0))
        total = total + opts.shared_recon_weight * opts.scales[m] * value
    return total


def kl_align_penalty(enc: Encoded, opts: BoundOptions, log: TermLog) -> torch.Tensor:
    """The weighted :func:`align_kl` of every modality in ``opts.kl_align``, ``(B,)`` (0 when
    none), to subtract from any fusion's bound."""
    total = torch.zeros((), device=next(iter(enc.obs.values())).device)
    for n in opts.kl_align:
        total = total + opts.kl_align_weight * align_kl(enc, n, log, opts.kl_align_direction)
    return total


def align_kl(enc: Encoded, n: str, log: TermLog, direction: str = "forward") -> torch.Tensor:
    """sum over the other experts m of a KL between sg[q_n(z | x_n)] and q_m(z | x_m) on the
    samples that observe both, ``(B,)``: trains q_m as a conditional prior over the posteriors
    of every x_n it goes with, instead of (through the cross likelihood) a point whose decoding
    is their blurred average. ``forward`` KL(sg q_n || q_m) covers all of them (diverse
    samples); ``reverse`` KL(q_m || sg q_n) is mode-seeking: q_m settles where they overlap
    (its precision is their mean precision), so its samples are typical rather than diverse."""
    target = enc.experts[n].detach()
    total = torch.zeros_like(enc.obs[n], dtype=target.loc.dtype)
    for m in MODALITIES:
        if m == n:
            continue
        q = enc.experts[m]
        kl = target.kl(q) if direction == "forward" else q.kl(target)
        both = enc.obs[n] & enc.obs[m]
        log.add(f"kl_align/{m}_{n}", kl, both)
        total = total + _zero_where(both, kl)
    return total


def poe_bound(
    branches: Mapping[str, Any], enc: Encoded, opts: BoundOptions
) -> tuple[torch.Tensor, TermLog]:
    """PoE bound: the joint term over the observed experts plus every unimodal term (a sample
    that observed one modality has only its joint term, which equals the unimodal one)."""
    dreg, closed_form = opts.objective == "dreg", opts.objective == "elbo"
    experts = [enc.experts[m] for m in MODALITIES]
    masks = [enc.obs[m] for m in MODALITIES]
    both = torch.stack(masks).all(0)
    w = opts.expert_weights
    terms_def = [(MODALITIES, poe(experts, masks, prior_expert=opts.prior_expert, weights=w))]
    for i, m in enumerate(MODALITIES):
        w_i = None if w is None else [w[i]]
        q = poe([experts[i]], [torch.ones_like(both)], prior_expert=opts.prior_expert, weights=w_i)
        terms_def.append(((m,), q))
    log, lws, valid, latents = TermLog(), [], [], []
    for subset, q in terms_def:
        ok = torch.ones_like(both) if len(subset) > 1 else enc.obs[subset[0]] & both
        z = q.rsample(opts.K)
        posterior = {n: True for n in subset}
        terms = _decode(branches, enc, z, posterior, subset, dreg)
        if closed_form:
            density = -free_bits(q.kl_standard(), opts.free_bits).sum(-1)
        else:
            q_eval = q.detach() if dreg else q
            density = standard(opts.family, z[0]).log_prob(z) - q_eval.log_prob(z)
        own = None if len(subset) > 1 else subset[0]
        lws.append(log_weight(terms, enc.obs, density, posterior, opts, log, ok, own, closed_form))
        valid.append(ok)
        latents.append([z] + [w for t in terms.values() for w in t.latents])
    return reduce_strata(lws, valid, latents, opts.objective, looser=True), log


def mopoe_bound(
    branches: Mapping[str, Any], enc: Encoded, opts: BoundOptions
) -> tuple[torch.Tensor, TermLog]:
    """MoPoE ELBO: reconstruction under the subset mixture (batch split or stratified) minus
    the subset-KL upper bound and the private KLs."""
    if opts.objective != "elbo":
        raise ValueError(f"mopoe supports only the elbo objective, got {opts.objective!r}")
    mixture = mopoe(
        [enc.experts[m] for m in MODALITIES],
        [enc.obs[m] for m in MODALITIES],
        prior_expert=opts.prior_expert,
        weights=opts.expert_weights,
    )
    density = -free_bits(mixture.kl_bound(), opts.free_bits).sum(-1)
    if opts.mopoe_sampling == "batch_split":
        z, _ = mixture.rsample_split(opts.K)
        strata = [(z, torch.ones_like(mixture.valid[0]))]
    else:
        strata = list(zip(mixture.rsample_stratified(opts.K), mixture.valid))
    posterior = {n: True for n in MODALITIES}
    log, lws, valid = TermLog(), [], []
    for z, ok in strata:
        terms = _decode(branches, enc, z, posterior, MODALITIES, False)
        lws.append(log_weight(terms, enc.obs, density, posterior, opts, log, ok, None, True))
        valid.append(ok)
    return reduce_strata(lws, valid, [[] for _ in lws], "elbo", looser=True), log
