"""Likelihood numbers of a joint caption-image VAE on held-out pairs (spec §5, "Likelihoods").

Each modality is scored alone, with z from the model's own unimodal posterior q(z | x_m) (the
expert; for ``poe``/``mopoe`` its product with the prior expert), the prior p(z), and the
branch's private posterior for w. With K importance samples the bound is

    log p(x_m) >= log (1/K) sum_k p(x_m | z_k, w_k) p(z_k) p(w_k) / (q(z_k | x_m) q(w_k | .)),

the ELBO at K = 1. Units, stated in every metric name:

* image, ``conv`` branch (Laplace/Gaussian pixel density on [0, 1]): a *continuous* density, so
  ``img_nelbo_bpd_continuous`` is -bound / (D ln 2) of the [0, 1]-scaled pixels and can be
  negative; ``img_nelbo_bpd_8bit_approx`` adds log2(256) = 8 bits/dim, the usual conversion to a
  discrete 8-bit figure (p(bin) ~ p(x)/256 for bins of width 1/256), an approximation that is not
  comparable with discretised-likelihood papers;
* image, NVAE branch (discretised logistic mixture): ``img_nelbo_bpd`` is a true discrete
  bits/dim bound;
* caption: ``txt_nelbo_nats`` is the bound in nats per caption over all L positions (PAD
  included, as the model defines the likelihood); ``txt_nelbo_nats_per_token`` divides the
  summed bound by the scored tokens (words + EOS, not PAD), an upper bound on the per-token NLL,
  and ``txt_perplexity_bound`` is its exp; ``txt_recon_nats_per_token`` /
  ``txt_recon_perplexity`` are the conditional -log p(caption | z, w) with z, w drawn from the
  caption's posterior (the ELBO's reconstruction term), per scored token: no KL, not a bound.
"""

from __future__ import annotations

import math

import torch

from jointgen.data.shapes.vocab import PAD
from jointgen.eval.text_metrics import token_nll
from jointgen.models.joint.distributions import log_mean_exp, standard

IMAGE_KINDS = {
    "ConvImageBranch": "continuous density of [0, 1] pixels (Laplace/Gaussian)",
    "NVAEImageBranch": "discrete 8-bit (discretised logistic mixture)",
}


def _posterior(net, m: str, x: torch.Tensor):
    """q(z | x_m) as the model infers from modality ``m`` alone, and the branch features."""
    q, feats = net.branches[m].expert(x)
    if net.fusion in ("poe", "mopoe"):  # the product with the prior expert (and weights)
        q = net.unimodal_posterior(m, x)
    return q, feats


@torch.no_grad()
def unimodal_nelbo(net, m: str, x: torch.Tensor, K: int = 1) -> torch.Tensor:
    """Minus the K-sample bound on log p(x_m) of one modality, nats per sample ``(B,)``.

    Args:
        net: a ``JointVAE``.
        m: ``img`` or ``txt``.
        x: images ``(B, C, H, W)`` in [0, 1] or tokens ``(B, L)``.
        K: importance samples (1 = the ELBO).
    """
    q, feats = _posterior(net, m, x)
    z = q.rsample(K)
    t = net.branches[m].log_likelihood(x, z, feats)
    density = standard(net.family, z[0]).log_prob(z) - q.log_prob(z)
    return -log_mean_exp(t.log_px + t.log_ratio + density, 0)


@torch.no_grad()
def caption_token_nll(net, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -log p(token | z, w) with z, w ~ q( . | caption): ``(nll, mask)``, both (B, L).

    Uses the text branch's decoder logits (teacher-forced for an autoregressive decoder).
    """
    txt = net.branches["txt"]
    q, q_w = _posterior(net, "txt", tokens)
    z = q.rsample(1)[0]
    w = q_w.rsample(1)[0] if q_w is not None else None
    return token_nll(txt.decoder(z, w, tokens), tokens, pad=PAD)


@torch.no_grad()
def likelihood_metrics(
    net,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    K: int = 1,
    batch_size: int = 250,
) -> dict[str, float | str]:
    """Image and caption bounds and perplexities on paired samples (see the module docstring).

    Args:
        net: a ``JointVAE`` in eval mode.
        images: ``(N, C, H, W)`` float in [0, 1] (on any device; moved batch by batch).
        tokens: ``(N, L)`` token ids.
        K: importance samples of the bounds.
        batch_size: samples per forward pass.
    """
    device = next(net.parameters()).device
    img_nats, txt_nats, nll_sum, tok_count = [], [], 0.0, 0
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].to(device)
        t = tokens[s : s + batch_size].to(device)
        img_nats.append(unimodal_nelbo(net, "img", x, K).double().cpu())
        txt_nats.append(unimodal_nelbo(net, "txt", t, K).double().cpu())
        nll, mask = caption_token_nll(net, t)
        nll_sum += float(nll.double().sum())
        tok_count += int(mask.sum())
    img_nats, txt_nats = torch.cat(img_nats), torch.cat(txt_nats)
    branch = type(net.branches["img"]).__name__
    dims = net.branches["img"].data_dim
    bpd = float(img_nats.mean()) / (dims * math.log(2.0))
    out: dict[str, float | str] = {
        "iw_samples": float(K),
        "img_nelbo_nats": float(img_nats.mean()),
        "img_kind": IMAGE_KINDS.get(branch, f"unknown ({branch})"),
    }
    if branch == "ConvImageBranch":
        out["img_nelbo_bpd_continuous"] = bpd
        out["img_nelbo_bpd_8bit_approx"] = bpd + 8.0
    else:
        out["img_nelbo_bpd"] = bpd
    per_token = float(txt_nats.sum()) / max(tok_count, 1)
    out |= {
        "txt_nelbo_nats": float(txt_nats.mean()),
        "txt_nelbo_nats_per_token": per_token,
        "txt_perplexity_bound": math.exp(min(per_token, 700.0)),
        "txt_recon_nats_per_token": nll_sum / max(tok_count, 1),
        "txt_recon_perplexity": math.exp(min(nll_sum / max(tok_count, 1), 700.0)),
    }
    return out
