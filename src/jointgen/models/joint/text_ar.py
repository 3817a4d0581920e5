"""Optional autoregressive caption decoder of the joint VAE (spec §3.4).

A GRU or causal Transformer language model conditioned on (z, w_txt), which are injected as the
initial state (the GRU's initial hidden state; a prefix position of the Transformer) AND at every
step (concatenated to the GRU input; added to the Transformer input). Trained with teacher
forcing; word dropout (Bowman et al. 2016, arXiv 1511.06349) replaces decoder inputs by UNK with
probability p, one of the safeguards against posterior collapse (with KL warm-up and free bits;
He et al. 2019, arXiv 1901.05534, on the failure mode). Decoding is greedy or sampled with a
temperature. Like every jointgen decoder it accepts leading sample axes ``(K, B, ...)``.
Only torch is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from jointgen.models.joint.branch import cat_latents
from jointgen.models.joint.text import (
    BOS,
    PAD,
    UNK,
    _check_options,
    choose_tokens,
    flatten_lead,
    pad_after_eos,
    token_log_prob,
)

CELLS = ("gru", "transformer")


def word_dropout(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each decoder input token other than BOS and PAD by UNK with probability ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"word dropout must be in [0, 1], got {p}")
    if p == 0.0:
        return inputs
    eligible = (inputs != BOS) & (inputs != PAD)
    drop = (torch.rand(inputs.shape, device=inputs.device) < p) & eligible
    return inputs.masked_fill(drop, UNK)


class AutoregressiveDecoder(nn.Module):
    """GRU or causal-Transformer caption decoder conditioned on (z, w) at every step.

    Args:
        vocab_size: number of token ids.
        max_len: caption length L.
        z_dim: size of z.
        w_dim: size of w_txt (0: none).
        embed_dim: token embedding size.
        hidden_dim: GRU hidden size or Transformer width.
        cell: ``gru`` or ``transformer`` (causal).
        num_layers: recurrent or Transformer layers.
        num_heads: attention heads (Transformer).
        dropout: dropout between layers.
        word_dropout: probability of replacing an input token by UNK while training.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 16,
        z_dim: int = 32,
        w_dim: int = 8,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        cell: str = "gru",
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.0,
        word_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_options("cell", cell, CELLS)
        if not 0.0 <= word_dropout <= 1.0:
            raise ValueError(f"word_dropout must be in [0, 1], got {word_dropout}")
        self.max_len, self.cell, self.num_layers = max_len, cell, num_layers
        self.hidden_dim, self.word_dropout = hidden_dim, word_dropout
        cond = z_dim + w_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.step_cond = nn.Linear(cond, embed_dim)  # injected at every step
        if cell == "gru":
            self.init = nn.Linear(cond, num_layers * hidden_dim)  # initial state
            self.rnn = nn.GRU(
                2 * embed_dim, hidden_dim, num_layers, batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,
            )  # fmt: skip
        else:
            self.init = nn.Linear(cond, hidden_dim)  # prefix position 0
            self.in_proj = nn.Linear(embed_dim, hidden_dim)
            self.pos = nn.Parameter(torch.randn(max_len + 1, hidden_dim))
            layer = nn.TransformerEncoderLayer(
                hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True, norm_first=True
            )
            self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(hidden_dim, vocab_size)

    # --- one pass over given inputs -------------------------------------------------------

    def _initial(self, zw: torch.Tensor) -> torch.Tensor:
        if self.cell == "gru":
            h0 = torch.tanh(self.init(zw)).view(-1, self.num_layers, self.hidden_dim)
            return h0.transpose(0, 1).contiguous()
        return self.init(zw).unsqueeze(1)

    def _run(self, inputs: torch.Tensor, zw: torch.Tensor, state: torch.Tensor):
        """Hidden states for ``inputs (N, T)``; the GRU returns its new state, the Transformer
        recomputes the whole prefix (``state`` is the prefix position)."""
        e = self.embed(inputs)
        c = self.step_cond(zw).unsqueeze(1).expand_as(e)
        if self.cell == "gru":
            return self.rnn(torch.cat([e, c], dim=-1), state)
        h = torch.cat([state, self.in_proj(e + c)], dim=1)
        h = h + self.pos[: h.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device)
        h = self.transformer(h, mask=causal, is_causal=True)
        return h[:, 1:], state

    def forward(
        self, z: torch.Tensor, w: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits ``(..., L, V)`` for targets ``tokens (B, L)``.

        Inputs are [BOS, tokens[:-1]], with word dropout while training.
        """
        if tokens is None:
            raise ValueError("the autoregressive decoder needs tokens for teacher forcing")
        zw, lead = flatten_lead(cat_latents(z, w), 1)
        targets = tokens.expand(*lead, tokens.shape[-1]).reshape(zw.shape[0], -1)
        bos = torch.full_like(targets[:, :1], BOS)
        inputs = torch.cat([bos, targets[:, :-1]], dim=1)
        if self.training:
            inputs = word_dropout(inputs, self.word_dropout)
        h, _ = self._run(inputs, zw, self._initial(zw))
        logits = self.out(h)
        return logits.reshape(*lead, *logits.shape[1:])

    def log_prob(
        self, tokens: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(tokens | z, w) summed over all L positions (PAD included): ``(...)``."""
        return token_log_prob(self(z, w, tokens), tokens)

    # --- decoding -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        z: torch.Tensor,
        w: torch.Tensor | None = None,
        temp: float = 1.0,
        greedy: bool = True,
    ) -> torch.Tensor:
        """Tokens ``(..., L)`` decoded step by step (greedy or sampled at ``temp``), PAD after
        the first EOS."""
        zw, lead = flatten_lead(cat_latents(z, w), 1)
        state = self._initial(zw)
        inputs = torch.full((zw.shape[0], 1), BOS, dtype=torch.long, device=zw.device)
        out = []
        for _ in range(self.max_len):
            if self.cell == "gru":
                h, state = self._run(inputs[:, -1:], zw, state)
            else:
                h, _ = self._run(inputs, zw, state)
            token = choose_tokens(self.out(h[:, -1]), temp, greedy)
            out.append(token)
            inputs = torch.cat([inputs, token.unsqueeze(1)], dim=1)
        tokens = pad_after_eos(torch.stack(out, dim=1))
        return tokens.reshape(*lead, self.max_len)
