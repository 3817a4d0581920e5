"""SEJE recipe side: word embedding, instruction, ingredient, title and key-term encoders.

Paper: Xie, Liu et al., SEJE, ACM TOIS 40(4), 2022, arXiv 2110.11592 (code: git-disl/SEJE);
instruction LSTM and ingredient bi-LSTM after Salvador et al., im2recipe, CVPR 2017. Spec
``seje.md`` §2.1, §2.2, D3 (trainable sentence encoder, since skip-instructions cannot be
regenerated), D4 (key-term vector), D11 (optional ingredient branch).

Word ids follow the data contract: 0 = PAD, 1 = UNK, id ``i >= 2`` is row ``i - 2`` of the
word2vec file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

RNNS = {"lstm": nn.LSTM, "gru": nn.GRU}
KEYTERM_MODES = ("word2vec", "linear", "none")


def word_embedding(
    vocab_size: int, dim: int, vectors: Tensor | None = None, freeze: bool = False
) -> nn.Embedding:
    """``nn.Embedding`` with PAD row 0 fixed at zero; rows ``2..`` from word2vec when given."""
    emb = nn.Embedding(vocab_size, dim, padding_idx=0)
    nn.init.normal_(emb.weight, std=0.1)
    with torch.no_grad():
        emb.weight[0].zero_()
        if vectors is not None:
            if vectors.shape != (vocab_size - 2, dim):
                raise ValueError(
                    f"word vectors are {tuple(vectors.shape)}, expected ({vocab_size - 2}, {dim})"
                    " (model.net.word_dim must equal the word2vec size)"
                )
            emb.weight[2:] = vectors
    emb.weight.requires_grad_(not freeze)
    return emb


def last_state(rnn: nn.Module, x: Tensor, lengths: Tensor, bidirectional: bool = False) -> Tensor:
    """Final hidden state(s) of ``rnn`` over padded ``x`` ``(B, T, D)`` packed by ``lengths``.

    Lengths are clamped to >= 1: a recipe without instructions (or an empty sentence) reads one
    padding step instead of crashing ``pack_padded_sequence`` (spec §8.8).
    """
    lengths = lengths.clamp(1, x.shape[1]).cpu()
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    _, h = rnn(packed)
    if isinstance(h, tuple):  # LSTM: (h, c)
        h = h[0]
    if bidirectional:
        return torch.cat([h[-2], h[-1]], 1)
    return h[-1]


class SentenceEncoder(nn.Module):
    """Trainable instruction-sentence encoder: word vectors -> bi-RNN -> [h_fwd ; h_bwd].

    Replaces the 1024-d skip-instruction vectors (D3: 512 units per direction -> 1024).
    Results are not comparable with the paper's, which used skip-thought vectors.
    """

    def __init__(self, word_dim: int = 300, hidden: int = 512, rnn: str = "lstm") -> None:
        super().__init__()
        self.rnn = RNNS[rnn](word_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, words: Tensor, lengths: Tensor, embedding: nn.Embedding) -> Tensor:
        """``words`` ``(B, S, W)`` ids, ``lengths`` ``(B, S)`` -> ``(B, S, out_dim)``."""
        b, s, w = words.shape
        flat, flat_len = words.reshape(b * s, w), lengths.reshape(b * s)
        out = torch.zeros(b * s, self.out_dim, device=words.device)
        real = (flat_len > 0).nonzero().squeeze(1)  # padding sentences stay zero vectors
        if real.numel():
            h = last_state(self.rnn, embedding(flat[real]), flat_len[real], bidirectional=True)
            out = out.to(h.dtype).index_copy(0, real, h)
        return out.reshape(b, s, self.out_dim)


class InstructionEncoder(nn.Module):
    """LSTM(sentence_dim -> hidden) over the sentence vectors; the last valid hidden state."""

    def __init__(self, sentence_dim: int = 1024, hidden: int = 1024) -> None:
        super().__init__()
        self.rnn = nn.LSTM(sentence_dim, hidden, batch_first=True)
        self.out_dim = hidden

    def forward(self, sentences: Tensor, num_sentences: Tensor) -> Tensor:
        return last_state(self.rnn, sentences, num_sentences)


class SequenceEncoder(nn.Module):
    """Bi-RNN over word vectors (im2recipe's ingredient encoder: bi-LSTM, 300 per direction)."""

    def __init__(self, word_dim: int = 300, hidden: int = 300, rnn: str = "lstm") -> None:
        super().__init__()
        self.rnn = RNNS[rnn](word_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, ids: Tensor, lengths: Tensor, embedding: nn.Embedding) -> Tensor:
        return last_state(self.rnn, embedding(ids), lengths, bidirectional=True)


class KeyTermEncoder(nn.Module):
    """Key-term branch: the SEJE phase-I weighted term vector -> Linear -> LeakyReLU(0.02).

    ``word2vec`` (SEJE): f_term = sum_t w_t e_t over the key terms' word vectors (a weighted
    mean when the data normalises the weights), then Linear(word_dim -> out). ``linear``: a
    Linear over the raw ``V_kt`` weights (a learned term embedding instead of word2vec).

    Args:
        num_keyterms: ``V_kt``.
        out_dim: Output size (1024).
        mode: ``word2vec`` | ``linear``.
        word_dim: Word-vector size (``word2vec`` mode).
        keyterm_word_ids: ``(V_kt,)`` word id of each key term (``word2vec`` mode; UNK = 1 when
            word2vec has no vector for it).
    """

    def __init__(
        self,
        num_keyterms: int,
        out_dim: int = 1024,
        mode: str = "word2vec",
        word_dim: int = 300,
        keyterm_word_ids: Tensor | None = None,
    ) -> None:
        super().__init__()
        if mode not in KEYTERM_MODES[:2]:
            raise ValueError(f"keyterm_encoder must be one of {KEYTERM_MODES}, got {mode!r}")
        self.mode = mode
        if mode == "word2vec":
            ids = keyterm_word_ids
            if ids is None:
                ids = torch.ones(num_keyterms, dtype=torch.long)  # filled by configure
            if ids.shape != (num_keyterms,):
                raise ValueError(
                    f"keyterm_word_ids has {ids.shape[0]} entries, not {num_keyterms}"
                )
            self.register_buffer("word_ids", ids.long().clone())
        in_dim = word_dim if mode == "word2vec" else num_keyterms
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LeakyReLU(0.02))
        self.out_dim = out_dim

    def forward(self, keyterms: Tensor, embedding: nn.Embedding) -> Tensor:
        if self.mode == "word2vec":
            # UNK terms carry no word2vec meaning: their weight is dropped, not the UNK row
            vecs = embedding(self.word_ids) * (self.word_ids > 1).unsqueeze(1).to(keyterms.dtype)
            keyterms = keyterms @ vecs
        return self.proj(keyterms)


class RecipeEncoder(nn.Module):
    """Recipe embedding: [instructions ; key terms ; (ingredients) ; (title)] -> Linear -> BN1d
    -> LeakyReLU(0.02) -> L2 norm (spec §2.1; the optional branches are the im2recipe ablation).

    Args:
        vocab_size: Word ids (word2vec rows + 2).
        num_keyterms: ``V_kt``.
        embed_dim: Joint-space size (1024).
        word_dim: Word-vector size (300).
        word_vectors: ``(vocab_size - 2, word_dim)`` word2vec rows, or None (random init).
        freeze_words: Keep the word vectors fixed.
        instr_source: ``trainable`` (words -> sentence encoder), ``precomputed`` (batch key
            ``sentence_vectors``, e.g. skip-instructions from the official LMDBs) or ``auto``
            (precomputed when the batch carries them).
        sentence_hidden / sentence_rnn: Trainable sentence encoder, per direction.
        sentence_dim: Size of precomputed sentence vectors (1024).
        instr_hidden: Instruction LSTM size (1024).
        keyterm_encoder: ``word2vec`` | ``linear`` | ``none``.
        keyterm_word_ids: See :class:`KeyTermEncoder`.
        ingredient_hidden: Ingredient bi-LSTM per direction (300); 0 = no ingredient branch.
        title_hidden: Title bi-LSTM per direction; 0 = no title branch.
    """

    def __init__(
        self,
        vocab_size: int,
        num_keyterms: int,
        embed_dim: int = 1024,
        word_dim: int = 300,
        word_vectors: Tensor | None = None,
        freeze_words: bool = False,
        instr_source: str = "auto",
        sentence_hidden: int = 512,
        sentence_rnn: str = "lstm",
        sentence_dim: int = 1024,
        instr_hidden: int = 1024,
        keyterm_encoder: str = "word2vec",
        keyterm_word_ids: Tensor | None = None,
        ingredient_hidden: int = 0,
        title_hidden: int = 0,
    ) -> None:
        super().__init__()
        if instr_source not in ("auto", "trainable", "precomputed"):
            raise ValueError(f"instr_source must be auto|trainable|precomputed: {instr_source!r}")
        if keyterm_encoder not in KEYTERM_MODES:
            raise ValueError(f"keyterm_encoder must be one of {KEYTERM_MODES}")
        self.instr_source = instr_source
        self.words = word_embedding(vocab_size, word_dim, word_vectors, freeze_words)
        self.sentences = None
        if instr_source != "precomputed":
            self.sentences = SentenceEncoder(word_dim, sentence_hidden, sentence_rnn)
        sent_dim = self.sentences.out_dim if self.sentences is not None else sentence_dim
        if instr_source == "auto" and sent_dim != sentence_dim:
            self.sentence_adapter = nn.Linear(sentence_dim, sent_dim)  # precomputed -> same LSTM
        self.instructions = InstructionEncoder(sent_dim, instr_hidden)
        self.sentence_dim = sentence_dim
        parts = [instr_hidden]
        self.keyterms = None
        if keyterm_encoder != "none":
            self.keyterms = KeyTermEncoder(
                num_keyterms, embed_dim, keyterm_encoder, word_dim, keyterm_word_ids
            )
            parts.append(embed_dim)
        self.ingredients = (
            SequenceEncoder(word_dim, ingredient_hidden) if ingredient_hidden else None
        )
        self.title = SequenceEncoder(word_dim, title_hidden) if title_hidden else None
        parts += [m.out_dim for m in (self.ingredients, self.title) if m is not None]
        self.head = nn.Sequential(
            nn.Linear(sum(parts), embed_dim), nn.BatchNorm1d(embed_dim), nn.LeakyReLU(0.02)
        )

    def encode_instructions(self, batch: dict) -> Tensor:
        pre = batch.get("sentence_vectors")
        if self.instr_source == "precomputed" and pre is None:
            raise KeyError("instr_source=precomputed but the batch has no sentence_vectors")
        if pre is not None and self.instr_source != "trainable":
            if pre.shape[-1] != self.sentence_dim:
                raise ValueError(
                    f"sentence_vectors are {pre.shape[-1]}-d, not {self.sentence_dim}"
                )
            if hasattr(self, "sentence_adapter"):
                pre = self.sentence_adapter(pre)
            sents = pre
        else:
            sents = self.sentences(batch["instructions"], batch["instruction_lengths"], self.words)
        return self.instructions(sents, batch["num_instructions"])

    def forward(self, batch: dict) -> Tensor:
        parts = [self.encode_instructions(batch)]
        if self.keyterms is not None and "f_term" in batch and self.keyterms.mode == "word2vec":
            parts.append(self.keyterms.proj(batch["f_term"].float()))  # SEJE's precomputed f_term
        elif self.keyterms is not None:
            parts.append(self.keyterms(batch["keyterms"].float(), self.words))
        if self.ingredients is not None:
            parts.append(
                self.ingredients(batch["ingredients"], batch["num_ingredients"], self.words)
            )
        if self.title is not None:
            parts.append(self.title(batch["title"], batch["title_length"], self.words))
        h = torch.cat([p.float() for p in parts], 1)
        return nn.functional.normalize(self.head(h).float(), dim=1)
