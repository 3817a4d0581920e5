"""The light ``conv`` image branch of the joint VAE, and the branch interface it defines.

The flat variant of spec §3.3: a conv encoder (32×32 or 64×64, 3 channels) gives the shared
expert q_img(z | x) and a flat private posterior q(w_img | x) (default 32-d); a conv decoder maps
[z, w_img] to the mean of a Laplace or Gaussian pixel likelihood with a fixed or learned scale.
The MMVAE+ auxiliary prior r_img (zero mean, learnable scale; Palumbo, Daunhawer & Vogt, ICLR
2023, openreview sPsPnzTRBl) supplies w_img in the caption stratum. No BatchNorm anywhere: batch
statistics would let a masked-out placeholder image change other samples' outputs.

IMAGE-BRANCH INTERFACE (``jointgen.models.joint.branch.ModalityBranch``; the text branch has the
same methods). ``x`` is the modality's batch (images ``(B, C, H, W)`` in [0, 1], or tokens
``(B, L)``); ``z`` carries a leading sample axis where noted.

* Attributes ``family`` (posterior family of the shared expert, ``"normal"`` or ``"laplace"``),
  ``z_dim`` and ``data_dim`` (D_m for likelihood scaling: C·H·W, or L for captions).
* ``expert(x) -> (q_z, features)``: the shared expert, a ``distributions.Normal`` or ``Laplace``
  with parameters ``(B, z_dim)``, and whatever the private posterior needs later (here
  q(w | x); for NVAE the bottom-up feature maps), so the encoder runs once per step.
* ``log_likelihood(x, z, features=None, *, posterior=True, detach_posterior=False) ->
  BranchTerms`` for z ``(K, B, z_dim)``: with ``posterior=True`` one w ~ q(w | x[, z]) per
  shared sample and ``log_ratio = log p(w) - log q(w)`` (``kl`` its closed form, free bits
  applied); with ``posterior=False`` (cross stratum) w ~ the auxiliary prior r (a hierarchical
  branch: the conditional prior p(w | z)) and zero density terms. ``detach_posterior`` evaluates
  log q(w) with detached parameters (DReG). ``features=None`` re-runs the encoder. Returns
  ``log_px``, ``log_ratio``, ``kl`` of shape ``(K, B)`` (nats per image, summed over pixels)
  and the posterior draws ``latents`` (for DReG hooks).
* ``generate(z, temp=1.0, *, aux_prior=False)``: z ``(..., z_dim)`` -> images
  ``(..., C, H, W)`` in [0, 1] (the likelihood mean), w from p(w) (r(w) when ``aux_prior``) with
  its scale times ``temp``. The text branch adds ``greedy`` and returns tokens ``(..., L)``.
* ``reconstruct(x, z=None)``: decode from the posterior means of z (or the given z ``(B, z_dim)``)
  and w -> ``(B, C, H, W)``.
* ``private_mean(x, z=None)``: the posterior mean of w, flattened to ``(B, P)`` (for probes).

Only torch is imported.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from jointgen.models.joint.branch import BranchTerms, FlatPrivate, cat_latents
from jointgen.models.joint.broadcast import AddCoords, BroadcastDecoder
from jointgen.models.joint.distributions import LOG_2PI, Distribution, make_dist

LIKELIHOODS = ("laplace", "gaussian")
SCALES = ("learned", "fixed", "per_pixel")
DECODERS = ("upsample", "broadcast")


def _conv(c_in: int, c_out: int, coords: bool, transpose: bool = False, **kw) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    return [AddCoords(), conv(c_in + 2, c_out, **kw)] if coords else [conv(c_in, c_out, **kw)]


def _extra_convs(channels: int, n: int, coords: bool = False) -> list[nn.Module]:
    # GroupNorm, not BatchNorm: per-sample statistics keep masked placeholder images from
    # changing other samples' outputs
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [
            *_conv(channels, channels, coords, kernel_size=3, padding=1),
            nn.GroupNorm(min(8, channels), channels),
            nn.SiLU(),
        ]
    return layers


def _upsample_decoder(
    in_dim: int,
    widths: list[int],
    out_channels: int,
    hidden_channels: int,
    convs_per_level: int,
    full_res_convs: int,
    co: bool,
) -> nn.Sequential:
    """Linear map to a 4x4 feature map, then one transposed conv per level up to full size."""
    up = {"kernel_size": 4, "stride": 2, "padding": 1, "transpose": True}
    dec: list[nn.Module] = [
        nn.Linear(in_dim, widths[-1] * 16),
        nn.SiLU(),
        nn.Unflatten(1, (widths[-1], 4, 4)),
        *_extra_convs(widths[-1], convs_per_level, co),
    ]
    for c_in, c_out in zip(widths[::-1], widths[::-1][1:]):
        dec += [*_conv(c_in, c_out, co, **up), nn.SiLU()]
        dec += _extra_convs(c_out, convs_per_level, co)
    if full_res_convs:
        stem = hidden_channels // 2
        dec += [*_conv(widths[0], stem, co, **up), nn.SiLU()]
        dec += [*_extra_convs(stem, full_res_convs, co), nn.Conv2d(stem, out_channels, 1)]
    else:
        dec += _conv(widths[0], out_channels, co, **up)
    return nn.Sequential(*dec)


class ConvImageBranch(nn.Module):
    """Conv encoder/decoder image branch with a flat private latent.

    Args:
        image_size: side of the square images, a power of two >= 8 (32 or 64 in practice).
        channels: image channels.
        z_dim: size of the shared latent z.
        w_dim: size of the private latent w_img; 0 decodes from z alone (plain MMVAE).
        hidden_channels: channels of the first conv layer, doubled per level (at most 4x).
        convs_per_level: extra 3x3 conv + GroupNorm + SiLU layers at every resolution, in the
            encoder and the decoder (0: the plain stride-2 stacks of the MMVAE image nets).
        likelihood: ``laplace`` or ``gaussian`` pixel likelihood.
        scale: ``learned`` (one log-scale per channel), ``fixed``, or ``per_pixel`` (the
            decoder predicts a log-scale for every pixel and channel, so noisy textured
            backgrounds get a wide likelihood and the flat-coloured object a sharp one).
        init_scale: the fixed scale, or the initial learned one (pixels are in [0, 1]).
        derived_inputs: the encoder also reads each pixel's saturation (max - min channel) and
            its coordinates; both are functions of the image, and the saturation separates the
            coloured object from the grey background textures.
        chroma_inputs: the encoder also reads each pixel's chroma, its channels minus their
            mean. On a grey background the chroma is zero whatever the background's brightness,
            so an object's hue gives the same input on light and dark backgrounds; from the raw
            channels the encoder must learn a different colour code for each background.
        full_res_convs: 3x3 conv + GroupNorm + SiLU layers at the full image resolution, before
            the encoder's first down-sampling and after the decoder's last up-sampling (the
            outline of a small object is lost once the side is halved).
        decoder_coords: every decoder conv also reads the pixel coordinates (``AddCoords``).
        z_from_map: the shared expert also reads the flattened final 4x4 feature map, not only
            its mean and max over positions: without a private latent, z must carry where the
            object is and how it is turned, which pooling hides from it.
        family: posterior family of q(z | x) and q(w | x): ``normal`` or ``laplace``.
        free_bits: per-dimension KL floor for the closed-form KL of w (nats).
        decoder: ``upsample`` (a linear map to a 4x4 feature map, then transposed convs) or
            ``broadcast`` (``BroadcastDecoder``: [z, w] tiled over the full grid with the
            pixel coordinates, then stride-1 convs; ``decoder_coords``, ``convs_per_level``
            and ``full_res_convs`` then apply to the encoder only).
        broadcast_channels, broadcast_layers: width and 3x3 depth of the broadcast decoder.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        z_dim: int = 32,
        w_dim: int = 32,
        hidden_channels: int = 32,
        convs_per_level: int = 0,
        likelihood: str = "laplace",
        scale: str = "learned",
        init_scale: float = 0.1,
        family: str = "normal",
        free_bits: float = 0.0,
        derived_inputs: bool = False,
        full_res_convs: int = 0,
        decoder_coords: bool = False,
        z_from_map: bool = False,
        chroma_inputs: bool = False,
        decoder: str = "upsample",
        broadcast_channels: int = 32,
        broadcast_layers: int = 3,
    ) -> None:
        super().__init__()
        levels = int(round(math.log2(image_size / 4))) if image_size > 0 else 0
        if levels < 1 or 4 * 2**levels != image_size:
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        make_dist(family, torch.zeros(1), torch.zeros(1))  # validates the family name
        self.image_size, self.channels, self.z_dim, self.w_dim = image_size, channels, z_dim, w_dim
        self.family, self.likelihood, self.scale = family, likelihood, scale
        self.derived_inputs, self.z_from_map = derived_inputs, z_from_map
        self.chroma_inputs = chroma_inputs
        self.data_dim = channels * image_size * image_size

        widths = [hidden_channels * 2 ** min(i, 2) for i in range(levels)]
        enc: list[nn.Module] = []
        c_in = channels + (3 if derived_inputs else 0) + (channels if chroma_inputs else 0)
        if full_res_convs:
            stem = hidden_channels // 2
            enc += [nn.Conv2d(c_in, stem, 3, padding=1), nn.GroupNorm(min(8, stem), stem)]
            enc += [nn.SiLU(), *_extra_convs(stem, full_res_convs - 1)]
            c_in = stem
        for c in widths:  # each level halves the side: image_size -> 4
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.SiLU()]
            enc += _extra_convs(c, convs_per_level)
            c_in = c
        self.encoder = nn.Sequential(*enc)
        # the shared expert sees globally pooled features (mean and max over positions): the
        # captioned attributes do not depend on where the object is, and a small object is
        # found by the max; the private posterior (or, with z_from_map, z) reads the spatial map
        flat = widths[-1] * 16  # the final map is always 4x4
        z_in = 2 * widths[-1] + (flat if z_from_map else 0)
        self.head_z = nn.Sequential(
            nn.Linear(z_in, 4 * z_dim), nn.SiLU(), nn.Linear(4 * z_dim, 2 * z_dim)
        )
        self.head_w = nn.Linear(flat, 2 * w_dim) if w_dim else None

        out_channels = channels * (2 if scale == "per_pixel" else 1)
        if decoder == "broadcast":
            self.decoder: nn.Module = BroadcastDecoder(
                z_dim + w_dim, out_channels, image_size, broadcast_channels, broadcast_layers
            )
        else:
            self.decoder = _upsample_decoder(
                z_dim + w_dim, widths, out_channels, hidden_channels, convs_per_level,
                full_res_convs, decoder_coords,
            )  # fmt: skip

        log_scale = torch.full((channels, 1, 1), math.log(init_scale))
        if scale == "learned":
            self.log_scale = nn.Parameter(log_scale)
        else:  # per_pixel: the decoder's offset is added to this initial value
            self.register_buffer("log_scale", log_scale)
        self.private = FlatPrivate(w_dim, family, free_bits)

    # --- encoder ------------------------------------------------------------------------------

    def expert(self, x: torch.Tensor) -> tuple[Distribution, Distribution | None]:
        """Shared expert q(z | x) ``(B, z_dim)`` and the private posterior q(w | x) (or None)."""
        h = self.encoder(self._inputs(x))
        feats = [h.mean((2, 3)), h.amax((2, 3))] + ([h.flatten(1)] if self.z_from_map else [])
        loc_z, log_scale_z = self.head_z(torch.cat(feats, dim=1)).chunk(2, dim=-1)
        q_w = None
        if self.head_w is not None:
            loc_w, log_scale_w = self.head_w(h.flatten(1)).chunk(2, dim=-1)
            q_w = make_dist(self.family, loc_w, log_scale_w)
        return make_dist(self.family, loc_z, log_scale_z), q_w

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: the image and the derived channels the options ask for."""
        chroma = 4.0 * (x - x.mean(1, keepdim=True)) if self.chroma_inputs else None
        if self.derived_inputs:
            x = self._with_derived(x)
        return x if chroma is None else torch.cat([x, chroma], dim=1)

    @staticmethod
    def _with_derived(x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> [2x - 1, 4 × saturation, x coordinate, y coordinate]."""
        sat = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        ys, xs = ys.view(1, 1, h, 1).expand(b, 1, h, w), xs.view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([2.0 * x - 1.0, 4.0 * sat, xs, ys], dim=1)

    def private_mean(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean of w_img, ``(B, w_dim)`` (z is unused: q(w | x) is flat)."""
        _, q_w = self.expert(x)
        return q_w.mean if q_w is not None else x.new_zeros(x.shape[0], 0)

    # --- decoder ------------------------------------------------------------------------------

    def decode_params(
        self, z: torch.Tensor, w: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Likelihood mean in [0, 1] and log-scale: ``(..., z_dim)`` (+ w) -> two
        ``(..., C, H, W)`` tensors (the log-scale broadcastable unless ``per_pixel``)."""
        zw = cat_latents(z, w)
        lead = zw.shape[:-1]
        out = self.decoder(zw.reshape(-1, zw.shape[-1]))
        if self.scale == "per_pixel":
            out, offset = out.chunk(2, dim=1)
            log_scale = (self.log_scale + offset).reshape(*lead, *offset.shape[1:])
        else:
            log_scale = self.log_scale
        return torch.sigmoid(out).reshape(*lead, *out.shape[1:]), log_scale

    def decode(self, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Likelihood mean in [0, 1]: ``(..., z_dim)`` (+ w) -> ``(..., C, H, W)``."""
        return self.decode_params(z, w)[0]

    def pixel_log_prob(
        self, x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x | mean) in nats per image: ``x (B, C, H, W)``, ``mean (..., B, C, H, W)``;
        ``log_scale`` broadcastable to ``mean`` (default: the branch's per-channel scale)."""
        log_scale = (self.log_scale if log_scale is None else log_scale).clamp(min=-7.0)
        e = (x - mean) * torch.exp(-log_scale)
        if self.likelihood == "laplace":
            lp = -e.abs() - log_scale - math.log(2.0)
        else:
            lp = -0.5 * e * e - log_scale - 0.5 * LOG_2PI
        return lp.flatten(-3).sum(-1)

    def log_likelihood(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        features: Distribution | None = None,
        *,
        posterior: bool = True,
        detach_posterior: bool = False,
    ) -> BranchTerms:
        """log p(x | z, w) and the private density terms for z ``(K, B, z_dim)``.

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            z: shared samples ``(K, B, z_dim)``.
            features: q(w | x) from ``expert``; recomputed when None and ``posterior``.
            posterior: w ~ q(w | x) (own stratum) or w ~ r(w) (cross stratum).
            detach_posterior: log q(w) with detached parameters (DReG).
        """
        if z.dim() != 3:
            raise ValueError(f"z must be (K, B, z_dim), got {tuple(z.shape)}")
        if posterior and features is None and self.w_dim:
            _, features = self.expert(x)
        w, log_ratio, kl, latents = self.private.draw(
            features, z, posterior=posterior, detach_posterior=detach_posterior
        )
        log_px = self.pixel_log_prob(x, *self.decode_params(z, w))
        return BranchTerms(log_px, log_ratio, kl, latents)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, temp: float = 1.0, *, aux_prior: bool = False):
        """Images ``(..., C, H, W)`` in [0, 1] from z ``(..., z_dim)``; w from p(w) or r(w)."""
        return self.decode(z, self.private.prior_sample(z.shape[:-1], temp, aux=aux_prior))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Decode from the posterior means (or from the given z) -> ``(B, C, H, W)``."""
        q_z, q_w = self.expert(x)
        return self.decode(q_z.mean if z is None else z, q_w.mean if q_w is not None else None)
