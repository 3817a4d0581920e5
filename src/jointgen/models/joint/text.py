"""Text branch of the joint VAE: caption encoder, non-autoregressive decoder and the branch.

Spec §3.4. The encoder embeds word tokens (optionally from a word2vec matrix), runs a
bidirectional GRU or a Transformer encoder, mean-pools the non-PAD positions and emits the shared
expert q_txt(z | x) and the private posterior q(w_txt | x) (paraphrase choice, word order).
The default decoder is non-autoregressive: learned positional queries conditioned on (z, w_txt),
by concatenation or cross-attention, give independent categorical logits per position, so it
cannot suffer autoregressive posterior collapse (the positional-query decoder of the CdSprites+
toolkit, Sejnová et al. 2022, arXiv 2209.03048). Its log-likelihood sums over all L positions,
PAD included, so the text dimension used for likelihood scaling is the fixed L. The optional
autoregressive decoder lives in ``jointgen.models.joint.text_ar``; collapse monitors in
``jointgen.models.joint.collapse``. ``TextBranch`` implements the branch interface documented in
``jointgen.models.joint.image_conv``. Only torch is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from jointgen.models.joint.branch import cat_latents
from jointgen.models.joint.distributions import Distribution, make_dist

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # as in jointgen.data.shapes.vocab
ENCODERS = ("gru", "transformer")
CONDITIONINGS = ("concat", "cross_attention")


def flatten_lead(x: torch.Tensor, tail: int) -> tuple[torch.Tensor, torch.Size]:
    """Merge the leading axes of ``x`` (all but the last ``tail``): returns (flat, lead shape)."""
    lead = x.shape[: x.dim() - tail]
    return x.reshape(-1, *x.shape[x.dim() - tail :]), lead


def token_log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log softmax(logits)[token]: ``(..., L, V), (B, L) -> (...)``."""
    log_p = logits.log_softmax(-1)
    target = tokens.expand(*log_p.shape[:-1]).unsqueeze(-1)
    return log_p.gather(-1, target).squeeze(-1).sum(-1)


def choose_tokens(logits: torch.Tensor, temp: float = 1.0, greedy: bool = True) -> torch.Tensor:
    """Argmax (greedy, or ``temp <= 0``) or a sample from softmax(logits / temp)."""
    if greedy or temp <= 0:
        return logits.argmax(-1)
    probs = (logits / temp).softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])


def pad_after_eos(tokens: torch.Tensor) -> torch.Tensor:
    """Replace everything after the first EOS by PAD."""
    seen = (tokens == EOS).long().cumsum(-1)
    after = (seen - (tokens == EOS).long()) > 0
    return tokens.masked_fill(after, PAD)


def _check_options(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# --- encoder --------------------------------------------------------------------------------


class CaptionEncoder(nn.Module):
    """Token embedding -> bidirectional GRU or Transformer -> masked mean pool -> posteriors.

    Args:
        vocab_size: number of token ids (PAD = 0).
        z_dim: size of the shared latent.
        w_dim: size of the private latent w_txt (0: none).
        embed_dim: token embedding size (ignored when ``embeddings`` is given).
        hidden_dim: GRU hidden size per direction, or the Transformer width.
        encoder: ``gru`` (bidirectional) or ``transformer``.
        num_layers: recurrent or Transformer layers.
        num_heads: attention heads (Transformer).
        max_len: caption length L (learned positions of the Transformer).
        dropout: dropout inside the encoder.
        embeddings: optional ``(vocab_size, E)`` initial embedding matrix (e.g. word2vec).
        freeze: keep ``embeddings`` fixed.
        family: posterior family, ``normal`` or ``laplace``.
    """

    def __init__(
        self,
        vocab_size: int,
        z_dim: int = 32,
        w_dim: int = 8,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        encoder: str = "gru",
        num_layers: int = 1,
        num_heads: int = 4,
        max_len: int = 16,
        dropout: float = 0.0,
        embeddings: torch.Tensor | None = None,
        freeze: bool = False,
        family: str = "normal",
    ) -> None:
        super().__init__()
        _check_options("encoder", encoder, ENCODERS)
        make_dist(family, torch.zeros(1), torch.zeros(1))  # validates the family name
        if embeddings is not None:
            if embeddings.dim() != 2 or embeddings.shape[0] != vocab_size:
                raise ValueError(f"embeddings must be ({vocab_size}, E), got {embeddings.shape}")
            embed_dim = embeddings.shape[1]
        elif freeze:
            raise ValueError("freeze=True needs an embeddings matrix")
        self.z_dim, self.w_dim, self.family, self.kind = z_dim, w_dim, family, encoder
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        if embeddings is not None:
            self.embed.weight.data.copy_(embeddings)
            self.embed.weight.requires_grad_(not freeze)
        if encoder == "gru":
            self.rnn = nn.GRU(
                embed_dim, hidden_dim, num_layers, batch_first=True, bidirectional=True,
                dropout=dropout if num_layers > 1 else 0.0,
            )  # fmt: skip
            pooled = 2 * hidden_dim
        else:
            self.in_proj = nn.Linear(embed_dim, hidden_dim)
            self.pos = nn.Parameter(torch.randn(max_len, hidden_dim))
            layer = nn.TransformerEncoderLayer(
                hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True, norm_first=True
            )
            self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
            pooled = hidden_dim
        self.head = nn.Linear(pooled, 2 * (z_dim + w_dim))

    def forward(self, tokens: torch.Tensor) -> tuple[Distribution, Distribution | None]:
        """Shared expert ``(B, z_dim)`` and private posterior ``(B, w_dim)`` (None if w_dim = 0).

        An all-PAD placeholder row is encoded like a one-token caption, so it stays finite.
        """
        real = tokens != PAD
        keep = real | ~real.any(1, keepdim=True)  # an empty row keeps every position
        lengths = real.sum(1).clamp(min=1)
        x = self.embed(tokens)
        if self.kind == "gru":
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            h = F.pad(h, (0, 0, 0, tokens.shape[1] - h.shape[1]))
        else:
            h = self.in_proj(x) + self.pos[: tokens.shape[1]]
            # attention over an empty key set gives NaN, hence ``keep`` rather than ``real``
            h = self.transformer(h, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1)
        loc_z, ls_z, loc_w, ls_w = self.head(pooled).split(
            [self.z_dim, self.z_dim, self.w_dim, self.w_dim], dim=-1
        )
        q_w = make_dist(self.family, loc_w, ls_w) if self.w_dim else None
        return make_dist(self.family, loc_z, ls_z), q_w


# --- non-autoregressive decoder -------------------------------------------------------------


class NonAutoregressiveDecoder(nn.Module):
    """Learned positional queries conditioned on (z, w) -> independent logits per position.

    Args:
        vocab_size: number of token ids.
        max_len: caption length L.
        z_dim: size of z.
        w_dim: size of w_txt (0: none).
        hidden_dim: width of the queries and of the Transformer layers.
        conditioning: ``concat`` ([query, proj(z, w)] per position, then self-attention layers)
            or ``cross_attention`` (queries attend to memory tokens made from (z, w)).
        num_layers: Transformer layers (``concat`` allows 0: a per-position MLP).
        num_heads: attention heads.
        num_memory: memory tokens for ``cross_attention``.
        dropout: dropout inside the Transformer layers.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 16,
        z_dim: int = 32,
        w_dim: int = 8,
        hidden_dim: int = 128,
        conditioning: str = "concat",
        num_layers: int = 2,
        num_heads: int = 4,
        num_memory: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_options("conditioning", conditioning, CONDITIONINGS)
        if conditioning == "cross_attention" and num_layers < 1:
            raise ValueError("cross_attention conditioning needs num_layers >= 1")
        self.max_len, self.conditioning, self.num_memory = max_len, conditioning, num_memory
        self.queries = nn.Parameter(torch.randn(max_len, hidden_dim))
        cond = z_dim + w_dim
        if conditioning == "concat":
            self.cond = nn.Linear(cond, hidden_dim)
            self.mix = nn.Sequential(
                nn.Linear(2 * hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
            )
            layer = nn.TransformerEncoderLayer(
                hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True, norm_first=True
            )
            self.layers = (
                nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
                if num_layers > 0
                else nn.Identity()
            )
        else:
            self.cond = nn.Linear(cond, num_memory * hidden_dim)
            layer = nn.TransformerDecoderLayer(
                hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True, norm_first=True
            )
            self.layers = nn.TransformerDecoder(layer, num_layers)
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, vocab_size))

    def forward(
        self, z: torch.Tensor, w: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(..., L, V)`` from z ``(..., z_dim)`` and w ``(..., w_dim)``; ``tokens`` is
        accepted for interface symmetry with the autoregressive decoder and ignored."""
        zw, lead = flatten_lead(cat_latents(z, w), 1)
        q = self.queries.expand(zw.shape[0], -1, -1)
        if self.conditioning == "concat":
            c = self.cond(zw).unsqueeze(1).expand_as(q)
            h = self.layers(self.mix(torch.cat([q, c], dim=-1)))
        else:
            memory = self.cond(zw).view(zw.shape[0], self.num_memory, -1)
            h = self.layers(q, memory)
        logits = self.out(h)
        return logits.reshape(*lead, *logits.shape[1:])

    def log_prob(
        self, tokens: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(tokens | z, w) summed over all L positions (PAD included): ``(...)``."""
        return token_log_prob(self(z, w), tokens)

    @torch.no_grad()
    def generate(
        self,
        z: torch.Tensor,
        w: torch.Tensor | None = None,
        temp: float = 1.0,
        greedy: bool = True,
    ) -> torch.Tensor:
        """Tokens ``(..., L)``: argmax or sampled per position, PAD after the first EOS."""
        return pad_after_eos(choose_tokens(self(z, w), temp, greedy))
