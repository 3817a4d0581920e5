"""The caption branch of the joint VAE: encoder + decoder + private latent w_txt (spec §3.4).

Implements the branch interface documented in ``jointgen.models.joint.image_conv`` (same method
names as the image branch). The auxiliary prior r_txt (zero mean, learnable scale) of MMVAE+
(Palumbo, Daunhawer & Vogt, ICLR 2023, openreview sPsPnzTRBl) supplies w_txt in the image stratum
and in image-to-caption generation. Only torch is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from jointgen.models.joint.branch import BranchTerms, FlatPrivate
from jointgen.models.joint.distributions import Distribution
from jointgen.models.joint.text import CaptionEncoder, NonAutoregressiveDecoder, _check_options
from jointgen.models.joint.text_ar import AutoregressiveDecoder

DECODERS = ("nonautoregressive", "autoregressive")


class TextBranch(nn.Module):
    """Caption encoder and decoder with a flat private latent.

    Args:
        vocab_size: number of token ids (PAD=0, BOS=1, EOS=2, UNK=3).
        max_len: caption length L (EOS and PAD included); the text dimension D_txt.
        z_dim: size of the shared latent.
        w_dim: size of the private latent w_txt (8-16; 0 disables it).
        embed_dim: token embedding size.
        hidden_dim: width of the encoder and decoder.
        encoder: ``gru`` (bidirectional) or ``transformer``.
        encoder_layers: encoder layers.
        decoder: ``nonautoregressive`` (default) or ``autoregressive``.
        ar_cell: ``gru`` or ``transformer`` for the autoregressive decoder.
        conditioning: ``concat`` or ``cross_attention`` for the non-autoregressive decoder.
        decoder_layers: decoder layers.
        num_heads: attention heads.
        dropout: dropout inside encoder and decoder.
        word_dropout: UNK replacement probability of the autoregressive decoder's inputs.
        embeddings: optional ``(vocab_size, E)`` initial embedding matrix (e.g. word2vec).
        freeze_embeddings: keep ``embeddings`` fixed.
        family: posterior family of q(z | x) and q(w | x): ``normal`` or ``laplace``.
        free_bits: per-dimension KL floor for the closed-form KL of w_txt (nats).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 16,
        z_dim: int = 32,
        w_dim: int = 8,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        encoder: str = "gru",
        encoder_layers: int = 1,
        decoder: str = "nonautoregressive",
        ar_cell: str = "gru",
        conditioning: str = "concat",
        decoder_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        word_dropout: float = 0.0,
        embeddings: torch.Tensor | None = None,
        freeze_embeddings: bool = False,
        family: str = "normal",
        free_bits: float = 0.0,
    ) -> None:
        super().__init__()
        _check_options("decoder", decoder, DECODERS)
        self.max_len, self.z_dim, self.w_dim, self.family = max_len, z_dim, w_dim, family
        self.data_dim = max_len
        self.encoder = CaptionEncoder(
            vocab_size, z_dim, w_dim, embed_dim, hidden_dim, encoder, encoder_layers, num_heads,
            max_len, dropout, embeddings, freeze_embeddings, family,
        )  # fmt: skip
        if decoder == "nonautoregressive":
            self.decoder = NonAutoregressiveDecoder(
                vocab_size, max_len, z_dim, w_dim, hidden_dim, conditioning, decoder_layers,
                num_heads, dropout=dropout,
            )  # fmt: skip
        else:
            self.decoder = AutoregressiveDecoder(
                vocab_size, max_len, z_dim, w_dim, embed_dim, hidden_dim, ar_cell,
                decoder_layers, num_heads, dropout, word_dropout,
            )  # fmt: skip
        self.private = FlatPrivate(w_dim, family, free_bits)

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.max_len:
            raise ValueError(f"tokens must be (B, {self.max_len}), got {tuple(tokens.shape)}")

    def expert(self, tokens: torch.Tensor) -> tuple[Distribution, Distribution | None]:
        """Shared expert q(z | x) ``(B, z_dim)`` and the private posterior q(w | x) (or None)."""
        self._check(tokens)
        return self.encoder(tokens)

    def private_mean(self, tokens: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean of w_txt, ``(B, w_dim)`` (z is unused: q(w | x) is flat)."""
        _, q_w = self.expert(tokens)
        return q_w.mean if q_w is not None else tokens.new_zeros(tokens.shape[0], 0).float()

    def log_likelihood(
        self,
        tokens: torch.Tensor,
        z: torch.Tensor,
        features: Distribution | None = None,
        *,
        posterior: bool = True,
        detach_posterior: bool = False,
    ) -> BranchTerms:
        """log p(x | z, w) over all L positions and the private density terms.

        Args:
            tokens: captions ``(B, L)``.
            z: shared samples ``(K, B, z_dim)``.
            features: q(w | x) from ``expert``; recomputed when None and ``posterior``.
            posterior: w ~ q(w | x) (own stratum) or w ~ r(w) (cross stratum).
            detach_posterior: log q(w) with detached parameters (DReG).
        """
        self._check(tokens)
        if z.dim() != 3:
            raise ValueError(f"z must be (K, B, z_dim), got {tuple(z.shape)}")
        if posterior and features is None and self.w_dim:
            _, features = self.expert(tokens)
        w, log_ratio, kl, latents = self.private.draw(
            features, z, posterior=posterior, detach_posterior=detach_posterior
        )
        return BranchTerms(self.decoder.log_prob(tokens, z, w), log_ratio, kl, latents)

    @torch.no_grad()
    def generate(
        self, z: torch.Tensor, temp: float = 1.0, *, aux_prior: bool = False, greedy: bool = True
    ) -> torch.Tensor:
        """Tokens ``(..., L)`` from z ``(..., z_dim)``; w from p(w) or r(w) with scale × temp,
        tokens greedy or sampled at ``temp``."""
        w = self.private.prior_sample(z.shape[:-1], temp, aux=aux_prior)
        return self.decoder.generate(z, w, temp, greedy)

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding from the posterior means (or from the given z) -> ``(B, L)``."""
        q_z, q_w = self.expert(tokens)
        w = q_w.mean if q_w is not None else None
        return self.decoder.generate(q_z.mean if z is None else z, w)
