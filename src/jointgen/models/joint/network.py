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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from jointgen.models.joint.distributions import Distribution, Normal, standard
from jointgen.models.joint.fusion import FUSIONS, poe
from jointgen.models.joint.latent_prior import (
    ConditionalMixturePrior,
    MixturePrior,
    fit_mixture_priors,
    prior_losses,
)
from jointgen.models.joint.objectives import (
    MODALITIES,
    OBJECTIVES,
    BoundOptions,
    Encoded,
    kl_align_penalty,
    mopoe_bound,
    poe_bound,
    resolve_likelihood_scales,
    shared_recon_term,
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
        cross_aux_prior, cross_frozen, kl_align, kl_align_weight, kl_align_direction,
            shared_recon, shared_recon_weight: see ``conf/model/joint.yaml`` and
            ``objectives.BoundOptions``.
        caption_prior_components: K > 0 fits p(z | caption), a K-component mixture density
            network on the caption expert, to the image posteriors; caption-to-image samples
            it instead of q(z | caption) (``latent_prior``). 0 = off.
        joint_prior_components: K > 0 fits a K-component Gaussian mixture to the image
            posteriors; joint samples draw z from it instead of p(z). 0 = off.
        prior_hidden: hidden width of the caption prior's network.
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
        shared_recon: Sequence[str] = (),
        shared_recon_weight: float = 1.0,
        caption_prior_components: int = 0,
        joint_prior_components: int = 0,
        prior_hidden: int = 256,
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
        if set(shared_recon) - set(MODALITIES) or shared_recon_weight < 0:
            raise ValueError(
                f"shared_recon needs known modalities and a weight >= 0, got "
                f"{list(shared_recon)}, {shared_recon_weight}"
            )
        if shared_recon and fusion not in ("moe", "mmvae_plus"):
            raise ValueError(f"shared_recon needs fusion moe or mmvae_plus, got {fusion!r}")
        self.shared_recon, self.shared_recon_weight = tuple(shared_recon), shared_recon_weight
        self.fusion, self.prior_expert, self.objective = fusion, prior_expert, objective
        self.K, self.looser, self.beta, self.free_bits = K, looser, beta, free_bits
        self.mopoe_sampling, self.family, self.z_dim = mopoe_sampling, image.family, image.z_dim
        dims = {"img": image.data_dim, "txt": text.data_dim}
        self.likelihood_scales = resolve_likelihood_scales(likelihood_scale, dims)
        self.expert_log_weights = nn.Parameter(torch.zeros(2)) if poe_expert_weights else None
        if caption_prior_components < 0 or joint_prior_components < 0:
            raise ValueError(
                "caption_prior_components and joint_prior_components must be >= 0, got "
                f"{caption_prior_components}, {joint_prior_components}"
            )
        if (caption_prior_components or joint_prior_components) and self.family != "normal":
            raise ValueError(f"mixture priors need normal posteriors, got {self.family!r}")
        # generation-time priors fitted to the image posteriors (latent_prior.py); None = off
        self.caption_prior = (
            ConditionalMixturePrior(self.z_dim, caption_prior_components, prior_hidden)
            if caption_prior_components
            else None
        )
        self.joint_prior = (
            MixturePrior(self.z_dim, joint_prior_components) if joint_prior_components else None
        )

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
            self.shared_recon, self.shared_recon_weight,
        )  # fmt: skip
        if self.fusion in ("moe", "mmvae_plus"):
            bound, log = stratified_bound(self.branches, enc, opts, self.fusion == "mmvae_plus")
        else:
            bound_fn = poe_bound if self.fusion == "poe" else mopoe_bound
            bound, log = bound_fn(self.branches, enc, opts)
            bound = bound - kl_align_penalty(enc, opts, log)  # no cross term to drop: added
        loss = -(bound + shared_recon_term(self.branches, enc, opts, log)).mean()
        terms = {**log.means(), "bound": bound.detach().mean()}
        loss = loss + self._prior_losses(enc, terms)
        return JointOutput(loss, bound.detach(), terms)

    def _prior_losses(self, enc: Encoded, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Maximum-likelihood losses of the generation-time mixture priors on one sample of
        sg q(z | image) per observed image (their own parameters only); logged as
        ``prior_nll/caption`` and ``prior_nll/joint``."""
        if self.caption_prior is None and self.joint_prior is None:
            return torch.zeros((), device=enc.obs["img"].device)
        with torch.no_grad():
            target = self._as_unimodal("img", enc.experts["img"]).rsample(1)[0]
        q_txt = self._as_unimodal("txt", enc.experts["txt"])
        img, txt = enc.obs["img"], enc.obs["txt"]
        priors = (self.caption_prior, self.joint_prior)
        loss, nlls = prior_losses(*priors, q_txt, target, img & txt, img)
        terms.update(nlls)
        return loss

    def fit_priors(
        self,
        batches: Iterable[Mapping[str, torch.Tensor]],
        steps: int,
        batch_size: int = 256,
        lr: float = 1e-3,
    ) -> dict[str, float]:
        """Refit ``caption_prior`` and ``joint_prior`` on the posteriors of ``batches`` (image
        observed rows; the caption prior also needs the caption) with the network frozen in
        eval mode. Gradients must be enabled. Returns the final negative log-likelihoods."""
        if self.caption_prior is None and self.joint_prior is None:
            return {}
        was_training = self.training
        self.eval()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("il", "is", "tl", "ts", "both")}
        with torch.no_grad():
            for batch in batches:
                enc = self.encode_experts(batch)
                keep = enc.obs["img"]
                q_img = self._as_unimodal("img", enc.experts["img"])
                q_txt = self._as_unimodal("txt", enc.experts["txt"])
                for key, t in zip(
                    parts, (q_img.loc, q_img.log_scale, q_txt.loc, q_txt.log_scale, enc.obs["txt"])
                ):
                    parts[key].append(t[keep])
        cat = {k: torch.cat(v) for k, v in parts.items()}
        if len(cat["il"]) == 0:
            raise ValueError("fit_priors: no sample with an observed image")
        self.train(was_training)
        return fit_mixture_priors(
            self.caption_prior, self.joint_prior,
            Normal(cat["il"], cat["is"], clamp=False), Normal(cat["tl"], cat["ts"], clamp=False),
            cat["both"], steps=steps, batch_size=batch_size, lr=lr,
        )  # fmt: skip

    # --- posteriors -----------------------------------------------------------------------

    def unimodal_posterior(self, m: str, x: torch.Tensor) -> Distribution:
        """q(z | x_m) as the fusion sees a sample with only modality ``m``."""
        return self._as_unimodal(m, self.branches[m].expert(x)[0])

    def _as_unimodal(self, m: str, q: Distribution) -> Distribution:
        if self.fusion in ("poe", "mopoe"):
            x = q.loc
            w = self._weights()
            ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            i = MODALITIES.index(m)
            return poe([q], [ones], prior_expert=self.prior_expert, weights=w and [w[i]])
        return q

    def _cross(self, m: str, x: torch.Tensor, temp: float) -> torch.Tensor:
        q = self.unimodal_posterior(m, x)
        if m == "txt" and self.caption_prior is not None:
            return self.caption_prior(q).sample(temp)
        return q.rsample(1, temp)[0]

    # --- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def sample_joint(self, n: int, temp: float = 1.0) -> dict[str, torch.Tensor]:
        """z ~ p(z) (or the fitted ``joint_prior`` mixture when configured; scale × temp), then
        both decoders with private latents from their priors.

        Returns ``image`` (n, C, H, W) in [0, 1] and ``tokens`` (n, L).
        """
        ref = next(self.parameters())
        if self.joint_prior is not None:
            z = self.joint_prior(n).sample(temp)
        else:
            z = standard(self.family, ref.new_zeros(n, self.z_dim)).rsample(1, temp)[0]
        return {
            "image": self.branches["img"].generate(z, temp),
            "tokens": self.branches["txt"].generate(z, temp),
        }

    @torch.no_grad()
    def caption_to_image(
        self, tokens: torch.Tensor, temp: float = 1.0, *, aux_prior: bool | None = None
    ) -> torch.Tensor:
        """z ~ q(z | caption) (or, when configured, the fitted ``caption_prior`` mixture given that
        expert; scale × temp; 0 gives the mean), w_img from its prior p(w), or
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
