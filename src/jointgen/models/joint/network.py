"""JointVAE: the joint caption–image VAE network (spec §3), a plain ``nn.Module``.

Holds an image branch and a text branch (the interface is documented in
``jointgen.models.joint.image_conv``), fuses their shared-latent experts with ``poe`` (MVAE, Wu &
Goodman 2018, arXiv 1802.05335), ``moe`` (MMVAE, Shi et al. 2019, arXiv 1911.03393), ``mopoe``
(MoPoE, Sutter et al. 2021, arXiv 2105.02470) or ``mmvae_plus`` (MMVAE+, Palumbo, Daunhawer &
Vogt, ICLR 2023, openreview sPsPnzTRBl), and trains with ``elbo``, ``iwae`` or ``dreg`` (Tucker
et al. 2019, arXiv 1810.04152); the bounds live in ``jointgen.models.joint.objectives``. It knows
nothing about training loops: a LightningModule calls ``forward(batch, kl_coeff)`` and logs
``terms``. Only torch is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from jointgen.models.joint.distributions import Distribution, standard
from jointgen.models.joint.fusion import FUSIONS, poe
from jointgen.models.joint.objectives import (
    MODALITIES,
    OBJECTIVES,
    BoundOptions,
    Encoded,
    kl_align_penalty,
    mopoe_bound,
    poe_bound,
    resolve_likelihood_scales,
    stratified_bound,
)

MOPOE_SAMPLING = ("batch_split", "stratified")


@dataclass
class JointOutput:
    """What ``JointVAE.forward`` returns.

    Attributes:
        loss: scalar, minus the batch mean of the per-sample bound.
        bound: per-sample bound ``(B,)`` (detached), averaged over each sample's strata.
        terms: detached scalars for logging: ``loglik/{img,txt}`` (raw log-likelihood in nats,
            own stratum or PoE term), ``loglik_scaled/...`` (times the likelihood scale),
            ``loglik_cross/...`` (decoded from the other modality's z, mixture fusions only),
            ``kl/z`` (closed form or Monte Carlo log q - log p), ``kl/w_img``, ``kl/w_txt``.
    """

    loss: torch.Tensor
    bound: torch.Tensor
    terms: dict[str, torch.Tensor]


class JointVAE(nn.Module):
    """Joint caption–image VAE with a shared latent z and private latents w_img, w_txt.

    Args:
        image: the image branch (``ConvImageBranch`` or a hierarchical NVAE branch).
        text: the text branch (``TextBranch``).
        fusion: ``mmvae_plus`` (default), ``mopoe``, ``moe`` or ``poe``.
        prior_expert: include N(0, I) as an expert in every product (``poe``, ``mopoe``).
        objective: ``elbo``, ``iwae`` or ``dreg`` (``mopoe``: ``elbo`` only).
        K: importance samples per stratum (or per PoE term).
        looser: average the strata outside the log (``moe``/``mmvae_plus`` with iwae/dreg).
        beta: weight of the KL (or of the log density ratio), times the warm-up coefficient.
        likelihood_scale: ``auto_dim_ratio`` (image × D_txt/D_img), ``auto_upweight``,
            ``none``, or a mapping ``{"img": float, "txt": float}``.
        mopoe_sampling: ``batch_split`` (each subset reconstructs batch/#subsets samples) or
            ``stratified`` (every valid subset reconstructs every sample).
        free_bits: per-dimension floor (nats) on the closed-form KL of z (``poe``/``mopoe``
            with ``elbo``); the private floors are set in the branches.
        poe_expert_weights: learn a positive precision multiplier per modality (generalised PoE).
    """

    def __init__(
        self,
        image: nn.Module,
        text: nn.Module,
        *,
        fusion: str = "mmvae_plus",
        prior_expert: bool = True,
        objective: str = "elbo",
        K: int = 1,
        looser: bool = False,
        beta: float = 1.0,
        likelihood_scale: str | Mapping[str, float] = "auto_dim_ratio",
        mopoe_sampling: str = "batch_split",
        free_bits: float = 0.0,
        poe_expert_weights: bool = False,
        cross_aux_prior: bool = False,
        cross_frozen: Sequence[str] = (),
        kl_align: Sequence[str] = (),
        kl_align_weight: float = 1.0,
        kl_align_direction: str = "forward",
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if fusion == "mopoe" and objective != "elbo":
            raise ValueError(f"mopoe supports only objective='elbo' (KL bound), got {objective!r}")
        if mopoe_sampling not in MOPOE_SAMPLING:
            raise ValueError(f"mopoe_sampling must be one of {MOPOE_SAMPLING}")
        if K < 1 or beta <= 0 or free_bits < 0:
            raise ValueError(
                f"need K >= 1, beta > 0, free_bits >= 0; got {K}, {beta}, {free_bits}"
            )
        if free_bits > 0 and (fusion not in ("poe", "mopoe") or objective != "elbo"):
            raise ValueError("free_bits on z needs a closed-form KL: poe or mopoe with elbo")
        if image.z_dim != text.z_dim:
            raise ValueError(f"branches disagree on z_dim: {image.z_dim} vs {text.z_dim}")
        if image.family != text.family:
            raise ValueError(f"branches disagree on the family: {image.family}, {text.family}")
        if image.family == "laplace" and fusion not in ("moe", "mmvae_plus"):
            raise ValueError(f"laplace posteriors need fusion moe or mmvae_plus, got {fusion!r}")
        self.branches = nn.ModuleDict({"img": image, "txt": text})
        self.cross_aux_prior = cross_aux_prior
        unknown = set(cross_frozen) - set(MODALITIES)
        if unknown:
            raise ValueError(f"cross_frozen names unknown modalities {sorted(unknown)}")
        if cross_frozen and fusion not in ("moe", "mmvae_plus"):
            raise ValueError(f"cross_frozen needs fusion moe or mmvae_plus, got {fusion!r}")
        self.cross_frozen = tuple(cross_frozen)
        bad = set(kl_align) - set(MODALITIES)
        if bad or (kl_align and image.family != "normal"):
            raise ValueError(
                f"kl_align needs known modalities (got {list(kl_align)}) and normal "
                f"posteriors (got {image.family!r})"
            )
        if kl_align_direction not in ("forward", "reverse"):
            raise ValueError(
                f"kl_align_direction must be 'forward' or 'reverse', got {kl_align_direction!r}"
            )
        self.kl_align, self.kl_align_weight = tuple(kl_align), float(kl_align_weight)
        self.kl_align_direction = kl_align_direction
        self.fusion, self.prior_expert, self.objective = fusion, prior_expert, objective
        self.K, self.looser, self.beta, self.free_bits = K, looser, beta, free_bits
        self.mopoe_sampling, self.family, self.z_dim = mopoe_sampling, image.family, image.z_dim
        dims = {"img": image.data_dim, "txt": text.data_dim}
        self.likelihood_scales = resolve_likelihood_scales(likelihood_scale, dims)
        self.expert_log_weights = nn.Parameter(torch.zeros(2)) if poe_expert_weights else None

    # --- training -------------------------------------------------------------------------

    def _inputs(self, batch: Mapping[str, torch.Tensor]):
        x = {"img": batch["image"], "txt": batch["tokens"]}
        obs = {"img": batch["mask_image"].bool(), "txt": batch["mask_text"].bool()}
        if not bool((obs["img"] | obs["txt"]).all()):
            raise ValueError("every sample needs an observed modality (mask_image | mask_text)")
        return x, obs

    def _weights(self) -> list[torch.Tensor] | None:
        return None if self.expert_log_weights is None else list(self.expert_log_weights.exp())

    def encode_experts(self, batch: Mapping[str, torch.Tensor]) -> Encoded:
        """Run both encoders once: experts ``(B, z_dim)`` and private-posterior features."""
        x, obs = self._inputs(batch)
        experts, features = {}, {}
        for m in MODALITIES:
            experts[m], features[m] = self.branches[m].expert(x[m])
        return Encoded(x, obs, experts, features)

    def forward(self, batch: Mapping[str, torch.Tensor], kl_coeff: float = 1.0) -> JointOutput:
        """Loss and logged terms of a batch.

        Args:
            batch: ``image`` (B, C, H, W) in [0, 1], ``tokens`` (B, L), ``mask_image`` and
                ``mask_text`` (B,) bool.
            kl_coeff: KL warm-up coefficient c(step) in [0, 1], multiplies ``beta``.
        """
        enc = self.encode_experts(batch)
        opts = BoundOptions(
            self.objective, self.K, self.looser, self.beta * kl_coeff, self.likelihood_scales,
            self.family, self.prior_expert, self._weights(), self.free_bits, self.mopoe_sampling,
            self.cross_frozen, self.kl_align, self.kl_align_weight, self.kl_align_direction,
        )  # fmt: skip
        if self.fusion in ("moe", "mmvae_plus"):
            bound, log = stratified_bound(self.branches, enc, opts, self.fusion == "mmvae_plus")
        else:
            bound_fn = poe_bound if self.fusion == "poe" else mopoe_bound
            bound, log = bound_fn(self.branches, enc, opts)
            bound = bound - kl_align_penalty(enc, opts, log)  # no cross term to drop: added
        loss = -bound.mean()
        terms = {**log.means(), "bound": bound.detach().mean()}
        return JointOutput(loss, bound.detach(), terms)

    # --- posteriors -----------------------------------------------------------------------

    def unimodal_posterior(self, m: str, x: torch.Tensor) -> Distribution:
        """q(z | x_m) as the fusion sees a sample with only modality ``m``."""
        q, _ = self.branches[m].expert(x)
        if self.fusion in ("poe", "mopoe"):
            w = self._weights()
            ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            i = MODALITIES.index(m)
            return poe([q], [ones], prior_expert=self.prior_expert, weights=w and [w[i]])
        return q

    def _cross(self, m: str, x: torch.Tensor, temp: float) -> torch.Tensor:
        return self.unimodal_posterior(m, x).rsample(1, temp)[0]

    # --- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def sample_joint(self, n: int, temp: float = 1.0) -> dict[str, torch.Tensor]:
        """z ~ p(z) (scale × temp), then both decoders with private latents from their priors.

        Returns ``image`` (n, C, H, W) in [0, 1] and ``tokens`` (n, L).
        """
        ref = next(self.parameters())
        z = standard(self.family, ref.new_zeros(n, self.z_dim)).rsample(1, temp)[0]
        return {
            "image": self.branches["img"].generate(z, temp),
            "tokens": self.branches["txt"].generate(z, temp),
        }

    @torch.no_grad()
    def caption_to_image(
        self, tokens: torch.Tensor, temp: float = 1.0, *, aux_prior: bool | None = None
    ) -> torch.Tensor:
        """z ~ q(z | caption) (scale × temp; 0 gives the mean), w_img from its prior p(w), or
        from the auxiliary prior r(w) when ``aux_prior`` (default: ``self.cross_aux_prior``)
        -> images ``(B, C, H, W)``."""
        z = self._cross("txt", tokens, temp)
        aux = self.cross_aux_prior if aux_prior is None else aux_prior
        return self.branches["img"].generate(z, temp, aux_prior=aux)

    @torch.no_grad()
    def image_to_caption(
        self, images: torch.Tensor, greedy: bool = True, temp: float = 1.0
    ) -> torch.Tensor:
        """z ~ q(z | image) (scale × temp), w_txt from its prior (MMVAE+: auxiliary prior), then
        greedy or sampled decoding -> tokens ``(B, L)``."""
        z = self._cross("img", images, temp)
        aux = self.fusion == "mmvae_plus"
        return self.branches["txt"].generate(z, temp, aux_prior=aux, greedy=greedy)

    @torch.no_grad()
    def reconstruct(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality decoded from its own posterior means (z as the fusion sees the modality
        alone, w from q(w | x)): ``image`` (B, C, H, W) and greedy ``tokens`` (B, L)."""
        x, _ = self._inputs(batch)
        out = {}
        for m, key in zip(MODALITIES, ("image", "tokens")):
            z = self.unimodal_posterior(m, x[m]).mean
            out[key] = self.branches[m].reconstruct(x[m], z)
        return out

    @torch.no_grad()
    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Posterior means for probes: ``z`` fused over each sample's observed modalities
        (PoE; MoPoE: the PoE of all observed; mixtures: mean of the observed experts), ``z_img``
        and ``z_txt`` (unimodal), ``w_img`` and ``w_txt`` (private, flattened). Unimodal and
        private means of an unobserved modality come from its placeholder."""
        enc = self.encode_experts(batch)
        experts = [enc.experts[m] for m in MODALITIES]
        masks = [enc.obs[m] for m in MODALITIES]
        if self.fusion in ("poe", "mopoe"):
            z = poe(experts, masks, prior_expert=self.prior_expert, weights=self._weights()).mean
        else:
            z = FUSIONS[self.fusion](experts, masks).mean
        out = {"z": z}
        for m in MODALITIES:
            out[f"z_{m}"] = self.unimodal_posterior(m, enc.x[m]).mean
            out[f"w_{m}"] = self.branches[m].private_mean(enc.x[m], out[f"z_{m}"])
        return out
