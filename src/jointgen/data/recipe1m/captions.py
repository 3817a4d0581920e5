"""Recipe1M titles (and ingredients) as captions for the joint caption-image VAE.

The caption vocabulary is a pure function of the preprocessed cache, the word2vec file and the
options, so the data module, the word2vec embedding initialiser and a reloaded checkpoint all
rebuild the same one:

* ids 0..3 are the special tokens of :mod:`jointgen.data.shapes.vocab` (PAD, BOS, EOS, UNK),
  the conventions of the joint model's text branch;
* then, for ``caption=title_ingredients``, the separator word ``|`` between title and
  ingredients;
* then the words of the training captions that have a word2vec vector, most frequent first
  (ties in alphabetical order), as many as fit in ``vocab_size``;
* a vocabulary with fewer such words is padded with ``<unused0>``, ``<unused1>``... up to
  ``vocab_size``: the model's size is then known from the config alone, before any data are
  read (the way minGPT pads GPT-2's vocabulary to 50304). The data never produce those ids.

Word2vec initialisation of the caption embeddings: ``embedding_matrix`` gives the
``(vocab_size, dim)`` matrix whose word rows are the word2vec vectors; the
``jointgen.callbacks.word2vec_init.Word2VecInit`` callback copies it into the model when
training starts (``callbacks.word2vec_init`` in ``conf/experiment/joint_recipe1m.yaml``).
"""

from __future__ import annotations

import numpy as np
import torch

from jointgen.data.recipe1m.cache import SPLITS, Recipe1MCache
from jointgen.data.shapes.vocab import EOS, PAD, SPECIAL_TOKENS, UNK, Vocabulary
from jointgen.utils.checks import ConfigError

CAPTIONS = ("title", "title_ingredients")
SEP = "|"  # between the title and the ingredient phrases (caption=title_ingredients)


def check_caption_options(caption: str, vocab_size: int) -> None:
    """One-line errors for an unknown ``data.caption`` or a too small vocabulary."""
    if caption not in CAPTIONS:
        raise ConfigError(f"data.caption must be one of {CAPTIONS}, got {caption!r}")
    low = len(SPECIAL_TOKENS) + 2
    if vocab_size < low:
        raise ConfigError(f"data.caption_vocab_size must be at least {low}, got {vocab_size}")


def _train_counts(cache: Recipe1MCache, field: str, valid: str | None = None) -> np.ndarray:
    """Occurrences of each internal word id in ``field`` over the training recipes."""
    ragged = getattr(cache, field)
    train = cache.partition.array == SPLITS.index("train")
    keep = np.repeat(train, ragged.lengths())
    if valid is not None:
        keep &= np.asarray(getattr(cache, valid).values, dtype=bool)
    num_ids = len(cache.words()) + 2
    values = np.asarray(ragged.values, dtype=np.int64)[keep]
    return np.bincount(values[values < num_ids], minlength=num_ids)


def caption_vocabulary(
    cache: Recipe1MCache, vector_words: list[str], caption: str, vocab_size: int
) -> tuple[Vocabulary, np.ndarray]:
    """The caption vocabulary (see the module docstring) and the map from the cache's internal
    word ids to caption ids (UNK for words outside it).

    Args:
        cache: The preprocessed Recipe1M cache.
        vector_words: The words of the word2vec file (``load_vectors(...)[0]``).
        caption: ``title`` or ``title_ingredients``.
        vocab_size: Token ids in all, special tokens included.
    """
    check_caption_options(caption, vocab_size)
    words = cache.words()
    counts = _train_counts(cache, "title")
    if caption == "title_ingredients":
        counts += _train_counts(cache, "ingredients", "ingredient_valid")
    known = set(vector_words)
    fixed = [SEP] if caption == "title_ingredients" else []
    candidates = [
        (-int(counts[k + 2]), w, k + 2)
        for k, w in enumerate(words)
        if counts[k + 2] > 0 and w in known and w != SEP and not w.startswith("<")
    ]
    chosen = sorted(candidates)[: vocab_size - len(SPECIAL_TOKENS) - len(fixed)]
    kept = fixed + [w for _, w, _ in chosen]
    unused = [f"<unused{k}>" for k in range(vocab_size - len(SPECIAL_TOKENS) - len(kept))]
    vocab = Vocabulary(kept + unused)
    remap = np.full(len(words) + 2, UNK, dtype=np.int64)
    remap[PAD] = PAD
    for _, w, internal in chosen:
        remap[internal] = vocab.stoi[w]
    return vocab, remap


def caption_ids(
    cache: Recipe1MCache, i: int, remap: np.ndarray, caption: str, sep_id: int | None
) -> np.ndarray:
    """Caption ids of recipe ``i`` (no EOS, not truncated): the title words, then for
    ``title_ingredients`` the separator and the valid ingredient phrases."""
    ids = remap[np.asarray(cache.title[i], dtype=np.int64)]
    if caption == "title_ingredients":
        ingr = np.asarray(cache.ingredients[i], dtype=np.int64)
        ingr = ingr[np.asarray(cache.ingredient_valid[i], dtype=bool)]
        if len(ingr):
            ids = np.concatenate([ids, [sep_id], remap[ingr]])
    return ids


def pad_caption(ids: np.ndarray, max_len: int) -> torch.Tensor:
    """``ids`` truncated to ``max_len - 1``, then EOS, then PAD up to ``max_len``."""
    out = torch.full((max_len,), PAD, dtype=torch.long)
    n = min(len(ids), max_len - 1)
    out[:n] = torch.from_numpy(np.asarray(ids[:n], dtype=np.int64))
    out[n] = EOS
    return out


def embedding_matrix(
    vocab: Vocabulary, words: list[str], vectors: np.ndarray, seed: int
) -> torch.Tensor:
    """The word2vec rows of ``vocab`` as a ``(len(vocab), dim)`` float matrix.

    PAD is a zero row; the other special and ``<unused>`` rows (and words without a vector) are
    drawn from N(0, s^2), s the standard deviation of the word vectors, with ``seed``.

    Args:
        vocab: The caption vocabulary.
        words: The words of the word2vec file.
        vectors: Their ``(len(words), dim)`` vectors.
        seed: Seed of the rows without a vector.
    """
    gen = np.random.default_rng(seed)
    out = gen.normal(0.0, float(vectors.std()), (len(vocab), vectors.shape[1]))
    index = {w: r for r, w in enumerate(words)}
    for tid, w in enumerate(vocab.itos):
        if w in index:
            out[tid] = vectors[index[w]]
    out[PAD] = 0.0
    return torch.from_numpy(out.astype(np.float32))
