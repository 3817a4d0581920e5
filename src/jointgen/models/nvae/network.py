"""NVAE: a deep hierarchical VAE with residual cells, residual Normal posteriors and flows.

Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational Autoencoder", NeurIPS 2020,
https://arxiv.org/abs/2007.03898 (official code: https://github.com/NVlabs/NVAE, under a
non-commercial licence; this is an independent implementation from the paper and
``shared/spec/nvae.md``).

Layout (data flow): stem -> pre-process -> encoder tower (high to low resolution) -> enc0;
the decoder starts from a learned constant, walks the latent groups from the top (lowest
resolution), and injects a latent sample per group through a combiner; post-process and an
output head give the pixel distribution. Only torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from jointgen.models.nvae.distributions import (
    Bernoulli,
    DiscMixLogistic,
    Normal,
    standard_normal_like,
)
from jointgen.models.nvae.flows import FlowStack
from jointgen.models.nvae.layers import Cell, DecCombiner, EncCombiner, conv


def groups_per_scale(num_scales: int, num_groups: int, ada_groups: bool, min_groups: int):
    """Groups per latent scale, high to low resolution (halved per scale with ``ada_groups``)."""
    out, g = [], num_groups
    for _ in range(num_scales):
        out.append(g)
        if ada_groups:
            g = max(g // 2, min_groups)
    return out


@dataclass
class NVAEOutput:
    """What a posterior pass returns.

    Attributes:
        dist: the pixel distribution p(x|z) (DiscMixLogistic or Bernoulli).
        kl: per-group KL, shape (B, L): analytic without flows, log q - log p with flows.
        log_q: per-group log q(z|x) summed over dims, (B, L).
        log_p: per-group log p(z) summed over dims, (B, L).
        kl_per_channel: per-group (B, L_g channels) KL averaged over space, for active units.
        mu_q: per-group posterior means (list of B x G x h x w).
    """

    dist: object
    kl: torch.Tensor
    log_q: torch.Tensor
    log_p: torch.Tensor
    kl_per_channel: list[torch.Tensor] = field(default_factory=list)
    mu_q: list[torch.Tensor] = field(default_factory=list)
    sigma_q: list[torch.Tensor] = field(default_factory=list)


class NVAE(nn.Module):
    """The NVAE network.

    Args:
        in_channels: image channels (1 for binary data, 3 for colour).
        image_size: height = width of the *data*; padded up to a multiple of
            ``2**(P+S-1)`` when ``pad_input`` is true (the likelihood is cropped back).
        pad_input: pad automatically (MNIST 28 -> 32); when false a size that does not divide
            raises ``ValueError``.
        num_channels: C, channels after the stem (encoder = decoder).
        num_latent_scales: S.
        num_groups_per_scale: groups at the highest-resolution scale.
        ada_groups: halve the groups at each lower scale.
        min_groups_per_scale: floor for ``ada_groups``.
        num_latent_per_group: G, latent channels per group (20 in every published run).
        num_preprocess_blocks / num_preprocess_cells: P blocks of cells before the encoder.
        num_postprocess_blocks / num_postprocess_cells: after the decoder.
        num_cell_per_cond_enc / num_cell_per_cond_dec: cells per group in the towers.
        decoder_dist: ``dmol`` (discretised logistic mixture) or ``bernoulli``.
        num_mixture_dec: mixture components M of the ``dmol`` decoder.
        num_x_bits: bit depth of the data (8, or 5 for the 256 px runs).
        num_nf: pairs of autoregressive flow cells per group (posterior only).
        use_se: Squeeze-and-Excitation in every cell.
        recompute_bn_swish: recompute BN+Swish in backward (memory lever).
        checkpoint_cells: activation checkpointing of whole cells (bigger memory lever).
        channels_last: NHWC memory layout (faster convs on CPU and on tensor-core GPUs).
        cond_dim: size of an external latent z that conditions the whole hierarchy (0: none).
            z is projected onto the decoder's first feature map, the top group gets a learned
            prior p(w1 | z) and a residual posterior, so every prior is p(w_l | w_<l, z). The
            joint caption-image VAE uses this as its image branch.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        pad_input: bool = False,
        num_channels: int = 16,
        num_latent_scales: int = 1,
        num_groups_per_scale: int = 2,
        ada_groups: bool = False,
        min_groups_per_scale: int = 1,
        num_latent_per_group: int = 20,
        num_preprocess_blocks: int = 1,
        num_preprocess_cells: int = 2,
        num_postprocess_blocks: int = 1,
        num_postprocess_cells: int = 2,
        num_cell_per_cond_enc: int = 2,
        num_cell_per_cond_dec: int = 2,
        decoder_dist: str = "dmol",
        num_mixture_dec: int = 10,
        num_x_bits: int = 8,
        num_nf: int = 0,
        use_se: bool = True,
        recompute_bn_swish: bool = False,
        checkpoint_cells: bool = False,
        channels_last: bool = False,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        for name, v in [
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("num_channels", num_channels),
            ("num_latent_scales", num_latent_scales),
            ("num_groups_per_scale", num_groups_per_scale),
            ("num_latent_per_group", num_latent_per_group),
            ("num_mixture_dec", num_mixture_dec),
            ("num_x_bits", num_x_bits),
        ]:
            if v <= 0:
                raise ValueError(f"model.net.{name} must be positive, got {v}")
        if decoder_dist not in ("dmol", "bernoulli"):
            raise ValueError(
                f"model.net.decoder_dist must be dmol or bernoulli, got {decoder_dist!r}"
            )
        factor = 2 ** (num_preprocess_blocks + num_latent_scales - 1)
        padded = -(-image_size // factor) * factor
        if padded != image_size and not pad_input:
            raise ValueError(
                f"image size {image_size} is not divisible by the model's down-sampling factor "
                f"{factor} (2^(num_preprocess_blocks + num_latent_scales - 1)); "
                f"set model.net.pad_input=true or change the image size"
            )
        if num_postprocess_blocks != num_preprocess_blocks:
            raise ValueError("model.net.num_postprocess_blocks must equal num_preprocess_blocks")
        self.in_channels, self.image_size, self.padded_size = in_channels, image_size, padded
        self.decoder_dist, self.num_mix, self.num_bits = decoder_dist, num_mixture_dec, num_x_bits
        self.G = num_latent_per_group
        self.groups = groups_per_scale(
            num_latent_scales, num_groups_per_scale, ada_groups, min_groups_per_scale
        )
        self.num_groups = sum(self.groups)
        kw = dict(use_se=use_se, recompute=recompute_bn_swish, checkpoint_cell=checkpoint_cells)
        C, G, S = num_channels, self.G, num_latent_scales

        # --- encoder side ---
        self.stem = conv(in_channels, C, k=3)
        pre, c = [], C
        for _ in range(num_preprocess_blocks):
            for i in range(num_preprocess_cells):
                cell = Cell("enc_down" if i == num_preprocess_cells - 1 else "enc", c, **kw)
                pre.append(cell)
                c = cell.cout
        self.pre = nn.Sequential(*pre)
        self.enc_groups, self.enc_downs, self.enc_combiners = (
            nn.ModuleList(),
            nn.ModuleList(),
            nn.ModuleList(),
        )
        for s in range(S):
            for g in range(self.groups[s]):
                self.enc_groups.append(
                    nn.Sequential(*[Cell("enc", c, **kw) for _ in range(num_cell_per_cond_enc)])
                )
                if not (s == S - 1 and g == self.groups[s] - 1):
                    self.enc_combiners.append(EncCombiner(c, c))
            if s < S - 1:
                down = Cell("enc_down", c, **kw)
                self.enc_downs.append(down)
                c = down.cout
        self.enc0 = nn.Sequential(nn.ELU(), conv(c, c, k=1), nn.ELU())
        c_low = c

        # --- decoder side; samplers per group, top (lowest resolution) first ---
        low = padded // factor
        self.prior_ftr0 = nn.Parameter(torch.rand(c_low, low, low))
        self.enc_sampler, self.dec_sampler = nn.ModuleList(), nn.ModuleList()
        self.dec_groups, self.dec_combiners, self.dec_ups = (
            nn.ModuleList(),
            nn.ModuleList(),
            nn.ModuleList(),
        )
        self.flows = nn.ModuleList()
        c = c_low
        for s in range(S):
            for g in range(self.groups[S - 1 - s]):
                first = s == 0 and g == 0
                self.enc_sampler.append(conv(c, 2 * G, k=3))
                if not first:
                    self.dec_groups.append(
                        nn.Sequential(
                            *[Cell("dec", c, **kw) for _ in range(num_cell_per_cond_dec)]
                        )
                    )
                    self.dec_sampler.append(nn.Sequential(nn.ELU(), conv(c, 2 * G, k=1)))
                self.dec_combiners.append(DecCombiner(c, G))
                self.flows.append(FlowStack(G, num_nf))
            if s < S - 1:
                up = Cell("dec_up", c, **kw)
                self.dec_ups.append(up)
                c = up.cout
        post = []
        for _ in range(num_postprocess_blocks):
            for i in range(num_postprocess_cells):
                cell = Cell("post_up" if i == 0 else "post", c, **kw)
                post.append(cell)
                c = cell.cout
        self.post = nn.Sequential(*post)
        out_ch = (
            in_channels
            if decoder_dist == "bernoulli"
            else DiscMixLogistic.num_params(in_channels, num_mixture_dec)
        )
        self.head = nn.Sequential(nn.ELU(), conv(c, out_ch, k=3))
        self.cond_dim = cond_dim
        if cond_dim > 0:
            self.cond_proj = nn.Linear(cond_dim, c_low * low * low)
            self.top_prior = nn.Sequential(nn.ELU(), conv(c_low, 2 * G, k=1))
            self.top_combiner = EncCombiner(c_low, c_low)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.to(memory_format=torch.channels_last)

    # --- helpers -------------------------------------------------------------------------

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padded_size - self.image_size
        if p == 0:
            return x
        return F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))

    def _crop(self, t: torch.Tensor) -> torch.Tensor:
        p = self.padded_size - self.image_size
        if p == 0:
            return t
        a = p // 2
        return t[..., a : a + self.image_size, a : a + self.image_size]

    def _prior_state(self, n: int) -> torch.Tensor:
        s = self.prior_ftr0.unsqueeze(0).expand(n, -1, -1, -1)
        return s.contiguous(memory_format=self.memory_format)

    def _pixel_dist(self, s: torch.Tensor):
        logits = self._crop(self.head(self.post(s)))
        if self.decoder_dist == "bernoulli":
            return Bernoulli(logits)
        return DiscMixLogistic(logits, self.in_channels, self.num_mix, self.num_bits)

    def _encode_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self._pad(x).contiguous(memory_format=self.memory_format)
        h = self.pre(self.stem(2.0 * x - 1.0))
        feats, gi = [], 0
        for s, n in enumerate(self.groups):
            for _ in range(n):
                h = self.enc_groups[gi](h)
                gi += 1
                if gi < self.num_groups:
                    feats.append(h)
            if s < len(self.groups) - 1:
                h = self.enc_downs[s](h)
        return feats, self.enc0(h)

    def encode_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Bottom-up features (combiner inputs, top feature) for reuse across samples."""
        return self._encode_features(x)

    def _walk(
        self,
        encoded,
        n: int,
        temp: float,
        cond: torch.Tensor | None = None,
        detach_q: bool = False,
    ):
        """Top-down pass. With ``encoded`` features the posterior is used, else the prior at
        temperature ``temp``. ``cond`` (n, cond_dim) conditions the hierarchy.

        Returns (decoder state, per-group records).
        """
        x = encoded
        if x is not None:
            feats, top = encoded
            n = top.shape[0]
        s = self._prior_state(n)
        if self.cond_dim > 0:
            if cond is None:
                raise ValueError("this NVAE is conditional: pass cond (n, cond_dim)")
            low = s.shape[-1]
            proj = self.cond_proj(cond).view(n, -1, low, low)
            s = (s + proj).contiguous(memory_format=self.memory_format)
        records = []
        S = len(self.groups)
        k = 0
        for si in range(S):
            for _ in range(self.groups[S - 1 - si]):
                if k == 0 and self.cond_dim > 0:
                    mu_p, ls_p = self.top_prior(s).chunk(2, dim=1)
                    if x is not None:
                        mu_q, ls_q = self.enc_sampler[0](self.top_combiner(top, s)).chunk(2, 1)
                        q, p = Normal(mu_p + mu_q, ls_p + ls_q), Normal(mu_p, ls_p)
                    else:
                        p, q = Normal(mu_p, ls_p, temp), None
                elif k == 0:
                    if x is not None:
                        mu_q, ls_q = self.enc_sampler[0](top).chunk(2, dim=1)
                        q = Normal(mu_q, ls_q)
                        p = standard_normal_like(q.mu)
                    else:
                        shape = (n, self.G, s.shape[2], s.shape[3])
                        p = standard_normal_like(s.new_zeros(shape), temp)
                        q = None
                else:
                    s = self.dec_groups[k - 1](s)
                    mu_p, ls_p = self.dec_sampler[k - 1](s).chunk(2, dim=1)
                    if x is not None:
                        f = self.enc_combiners[-k](feats[-k], s)
                        mu_q, ls_q = self.enc_sampler[k](f).chunk(2, dim=1)
                        # residual posterior: raw parameters are added before the clamp
                        q = Normal(mu_p + mu_q, ls_p + ls_q)
                        p = Normal(mu_p, ls_p)
                    else:
                        p, q = Normal(mu_p, ls_p, temp), None
                if q is not None:
                    z0, _ = q.sample()
                    # DReG scores log q with detached parameters (z0 keeps its path)
                    log_q = (q.detach() if detach_q else q).log_prob(z0)
                    z = self.flows[k](z0)  # log-det is 0: log q(z) = log q0(z0)
                    rec = (q, p, z0, z, log_q)
                else:
                    z, _ = p.sample()
                    rec = (None, p, z, z, None)
                records.append(rec)
                s = self.dec_combiners[k](s, z)
                k += 1
            if si < S - 1:
                s = self.dec_ups[si](s)
        return s, records

    def _has_flows(self) -> bool:
        return any(len(f.cells) > 0 for f in self.flows)

    # --- public API ----------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None = None,
        encoded=None,
        detach_q: bool = False,
    ) -> NVAEOutput:
        """Posterior pass on ``x`` in [0, 1], shape (B, C, H, W).

        ``encoded`` reuses :meth:`encode_features` output (e.g. repeated for K samples of
        ``cond``); ``x`` is then only used for its batch size.
        """
        if encoded is None:
            encoded = self._encode_features(x)
        s, records = self._walk(encoded, x.shape[0], 1.0, cond, detach_q)
        flows = self._has_flows()
        kls, lqs, lps, kpc, mus, sigs = [], [], [], [], [], []
        for q, p, _z0, z, log_q in records:
            log_p = p.log_prob(z)
            lq, lp = log_q.flatten(1).sum(1), log_p.flatten(1).sum(1)
            if flows:
                kl_el = log_q - log_p
            else:
                kl_el = q.kl(p)
            kls.append(kl_el.flatten(1).sum(1))
            kpc.append(kl_el.mean(dim=(2, 3)))
            lqs.append(lq)
            lps.append(lp)
            mus.append(q.mu)
            sigs.append(q.sigma)
        return NVAEOutput(
            dist=self._pixel_dist(s),
            kl=torch.stack(kls, 1),
            log_q=torch.stack(lqs, 1),
            log_p=torch.stack(lps, 1),
            kl_per_channel=kpc,
            mu_q=mus,
            sigma_q=sigs,
        )

    def log_likelihood(self, out: NVAEOutput, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed per image, shape (B,)."""
        lp = out.dist.log_prob(x)
        return lp.flatten(1).sum(1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temp: float = 1.0,
        pixel_temp: float = 1.0,
        mode: str = "mean",
        cond: torch.Tensor | None = None,
    ):
        """Draw ``n`` images from the prior at latent temperature ``temp``.

        Args:
            mode: ``mean`` (decoder mean, what FID uses) or ``sample`` (a pixel sample at
                ``pixel_temp``; Bernoulli data are always sampled in ``sample`` mode).
        """
        s, _ = self._walk(None, n, temp, cond)
        dist = self._pixel_dist(s)
        return dist.mean() if mode == "mean" else dist.sample(pixel_temp)

    def prior_pixel_dist(self, n: int, temp: float = 1.0, cond: torch.Tensor | None = None):
        """The pixel distribution after a prior pass (with gradients): the MMVAE+ cross stratum
        decodes an image from a caption's z through the conditional prior hierarchy."""
        s, _ = self._walk(None, n, temp, cond)
        return self._pixel_dist(s)

    @torch.no_grad()
    def readjust_bn(self, iters: int = 500, batch: int = 16, temp: float = 1.0) -> None:
        """BN re-adjustment (NVAE Sec. 5): train-mode prior samples at ``temp`` let the running
        statistics (momentum 0.05) adapt to low-temperature activations; ends in eval mode."""
        self.train()
        for _ in range(iters):
            cond = None
            if self.cond_dim > 0:
                cond = torch.randn(batch, self.cond_dim, device=self.prior_ftr0.device) * temp
            self.post(self._walk(None, batch, temp, cond)[0])  # every BN on the sampling path
        self.eval()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, active_threshold: float = 0.1, cond=None) -> dict:
        """Per-group posterior means (the recommended representation), sigmas, samples and an
        active-channel mask (channel KL > ``active_threshold`` averaged over the batch)."""
        out = self.forward(x, cond)
        return {
            "mu": out.mu_q,
            "sigma": out.sigma_q,
            "active": [k.mean(0) > active_threshold for k in out.kl_per_channel],
        }

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mode: str = "mean", pixel_temp: float = 1.0, cond=None):
        """Reconstruct ``x``: decoder mean by default, a pixel sample with ``mode='sample'``."""
        dist = self.forward(x, cond).dist
        return dist.mean() if mode == "mean" else dist.sample(pixel_temp)

    @torch.no_grad()
    def decode_latents(self, zs: list[torch.Tensor]) -> object:
        """Decode given per-group latents (top first); returns the pixel distribution."""
        s = self._prior_state(zs[0].shape[0])
        S, k = len(self.groups), 0
        for si in range(S):
            for _ in range(self.groups[S - 1 - si]):
                if k > 0:
                    s = self.dec_groups[k - 1](s)
                s = self.dec_combiners[k](s, zs[k])
                k += 1
            if si < S - 1:
                s = self.dec_ups[si](s)
        return self._pixel_dist(s)

    @torch.no_grad()
    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decoder means along a linear path between the posterior means of two images.

        Returns (steps, C, H, W). Deeper groups are decoded from the interpolated means too.
        """
        m0 = self.encode(x0[None])["mu"]
        m1 = self.encode(x1[None])["mu"]
        out = []
        for a in torch.linspace(0, 1, steps).tolist():
            zs = [(1 - a) * u + a * v for u, v in zip(m0, m1)]
            out.append(self.decode_latents(zs).mean())
        return torch.cat(out)
