"""Per-recipe weighted key-term vectors (SEJE phase I), written into the Recipe1M cache.

Key terms of a recipe = its valid detected ingredient phrases (plus phrases recovered from lines
the parser rejected) and the derived actions and utensils (:mod:`.lexicon`) found in its title
and instructions. The key-term vocabulary is taken from the train split only: candidates with
document frequency >= ``min_df``, the ``max_terms`` most frequent kept. Each recipe's terms are
rated (:mod:`.rating`) and, with ``normalise=l1``, scaled to sum to 1, so that
``f_term = sum_t w_t e_t`` is SEJE's rating-weighted mean of the term vectors (spec §9 D4).

Files added to the cache: ``keyterm_names.txt`` (one term per line, column order of the
vector), ``keyterms`` (int32 column ids) and ``keyterm_weights`` (float32), both ragged per
recipe, ``lexicon.json`` (the derived actions and utensils); ``meta.json`` gains a ``keyterms``
entry last, so an interrupted run is never mistaken for a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jointgen.data.recipe1m.cache import Recipe1MCache
from jointgen.features.lexicon import derive_lexicon, recover_phrases
from jointgen.features.rating import BertScorer, bert_relevance, idf, textrank, tfidf
from jointgen.utils.checks import ConfigError
from jointgen.utils.progress import track

RATINGS = ("tfidf", "textrank", "bert")
CHUNK_TOKENS = 1 << 24  # instruction tokens per chunk (memory bound of the feature step)
NORMS = ("l1", "none")


def _rows(ragged, n: int) -> np.ndarray:
    """Recipe (or parent-row) index of every value of a ragged field, int32."""
    return np.repeat(np.arange(n, dtype=np.int32), ragged.lengths())


def _spans(offsets: np.ndarray, chunk: int):
    """Consecutive row ranges [s0, s1) holding about ``chunk`` values each."""
    rows, s0 = len(offsets) - 1, 0
    while s0 < rows:
        s1 = int(np.searchsorted(offsets, offsets[s0] + chunk, side="right")) - 1
        s1 = min(rows, max(s1, s0 + 1))
        yield s0, s1
        s0 = s1


def write_keyterms(
    cache: Recipe1MCache,
    *,
    rating: str = "tfidf",
    max_terms: int = 8192,
    min_df: int = 5,
    action_min_count: int = 20,
    action_start_ratio: float = 0.5,
    utensil_min_count: int = 20,
    utensil_ratio: float = 0.3,
    recover_invalid: bool = True,
    normalise: str = "l1",
    textrank_window: int = 4,
    textrank_damping: float = 0.85,
    textrank_iterations: int = 30,
    bert_model: str | None = None,
    bert_batch_size: int = 32,
    bert_max_length: int = 256,
    bert_device: str = "cpu",
) -> dict:
    """Compute and store the key-term vectors of every cached recipe; returns statistics.

    Arguments are those of ``data.features`` in ``conf/data/recipe1m.yaml``.
    """
    if rating not in RATINGS:
        raise ConfigError(f"data.features.rating must be one of {RATINGS}, got {rating!r}")
    if normalise not in NORMS:
        raise ConfigError(f"data.features.normalise must be one of {NORMS}, got {normalise!r}")
    if rating == "bert" and not bert_model:
        raise ConfigError("data.features.rating=bert needs data.features.bert_model (a folder)")
    n = len(cache)
    words = cache.words()
    size = len(words) + 2
    train = cache.partition.array == 0
    n_train = int(train.sum())

    # ingredients: valid phrases, plus phrases recovered from rejected lines
    ingr = np.asarray(cache.ingredients.values, dtype=np.int64)
    valid = np.asarray(cache.ingredient_valid.values, dtype=bool)
    ingr_rec = _rows(cache.ingredients, n)
    train_phrases = np.unique(ingr[valid & train[ingr_rec]])
    recovered = {}
    if recover_invalid and (~valid).any():
        names = {words[i - 2] for i in train_phrases}
        recovered = recover_phrases(words, ingr[~valid], names)
    lut = np.arange(size, dtype=np.int64)
    ok = np.zeros(size, dtype=bool)
    if recovered:
        lut[list(recovered)] = list(recovered.values())
        ok[list(recovered)] = True
    ingr = np.where(valid, ingr, lut[ingr])
    ingr_ok = valid | ok[np.asarray(cache.ingredients.values, dtype=np.int64)]
    ingr, ingr_rec = ingr[ingr_ok], ingr_rec[ingr_ok]

    # instructions, streamed in chunks of about CHUNK_TOKENS tokens to bound memory
    sent_rec = _rows(cache.instructions, n)
    off = np.asarray(cache.sentences.offsets)
    values = cache.sentences.values

    def chunks():
        lengths = np.diff(off)
        for s0, s1 in _spans(off, CHUNK_TOKENS):
            yield np.asarray(values[off[s0] : off[s1]]), np.repeat(sent_rec[s0:s1], lengths[s0:s1])

    first_words = np.asarray(values[off[:-1][train[sent_rec]]]) if len(sent_rec) else sent_rec
    actions, utensils = derive_lexicon(
        words,
        (v[train[r]] for v, r in chunks()),
        first_words,
        train_phrases,
        action_min_count=action_min_count,
        action_start_ratio=action_start_ratio,
        utensil_min_count=utensil_min_count,
        utensil_ratio=utensil_ratio,
    )

    # term occurrences in text order: title, instructions, ingredient list
    cand = np.unique(np.concatenate([train_phrases, actions, utensils]))
    term_of = np.full(size, -1, dtype=np.int32)
    term_of[cand] = np.arange(len(cand))
    recs, terms = [], []
    streams = [
        (np.asarray(cache.title.values), _rows(cache.title, n)),
        *chunks(),
        (ingr, ingr_rec),
    ]
    for v, r in streams:
        t = term_of[v]
        m = t >= 0
        recs.append(r[m])
        terms.append(t[m])
    rec = np.concatenate(recs).astype(np.int64)
    term = np.concatenate(terms).astype(np.int64)
    del recs, terms
    order = np.argsort(rec, kind="stable")
    rec, term = rec[order], term[order]

    # vocabulary: train document frequency
    key, counts = np.unique(rec * len(cand) + term, return_counts=True)
    p_rec, p_term = key // max(1, len(cand)), key % max(1, len(cand))
    df = np.bincount(p_term[train[p_rec]], minlength=len(cand))
    eligible = np.flatnonzero(df >= min_df)
    chosen = eligible[np.lexsort((eligible, -df[eligible]))][:max_terms]
    new_of = np.full(len(cand), -1, dtype=np.int64)
    new_of[chosen] = np.arange(len(chosen))
    names = [words[int(cand[c]) - 2] for c in chosen]

    keep = new_of[p_term] >= 0
    p_rec, p_term, counts = p_rec[keep], new_of[p_term[keep]], counts[keep]
    if rating == "tfidf":
        weights = tfidf(counts, p_term, idf(df[chosen], n_train))
    elif rating == "textrank":
        weights = _textrank_all(
            rec,
            new_of[term],
            p_rec,
            p_term,
            textrank_window,
            textrank_damping,
            textrank_iterations,
        )
    else:
        scorer = BertScorer(bert_model, bert_device, bert_batch_size, bert_max_length)
        weights = _bert_all(cache, words, names, scorer, p_rec, p_term)
    if normalise == "l1":
        total = np.bincount(p_rec, weights=weights, minlength=n)
        weights = weights / np.maximum(total[p_rec], 1e-12)

    _save(cache, names, p_rec, p_term, weights, n)
    stats = {
        "rating": rating,
        "normalise": normalise,
        "num_terms": len(names),
        "candidates": len(cand),
        "actions": len(actions),
        "utensils": len(utensils),
        "recovered_lines": len(recovered),
        "recipes_without_terms": int(n - len(np.unique(p_rec))),
    }
    lexicon = {
        "actions": [words[int(i) - 2] for i in actions],
        "utensils": [words[int(i) - 2] for i in utensils],
    }
    (cache.dir / "lexicon.json").write_text(json.dumps(lexicon, indent=1))
    cache.meta["keyterms"] = stats
    (cache.dir / "meta.json").write_text(json.dumps(cache.meta, indent=1))
    return stats


def _save(cache, names, p_rec, p_term, weights, n) -> None:
    d = Path(cache.dir)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(p_rec, minlength=n))]).astype(np.int64)
    for name in ("keyterms", "keyterm_weights"):
        offsets.tofile(d / f"{name}.offsets.bin")
    p_term.astype(np.int32).tofile(d / "keyterms.bin")
    weights.astype(np.float32).tofile(d / "keyterm_weights.bin")
    (d / "keyterm_names.txt").write_text("".join(t + "\n" for t in names), encoding="utf-8")


def _textrank_all(rec, seq_term, p_rec, p_term, window, damping, iterations) -> np.ndarray:
    """TextRank weight of each (recipe, term) pair; pairs are sorted by recipe, then term."""
    keep = seq_term >= 0
    rec, seq_term = rec[keep], seq_term[keep]
    bounds = np.searchsorted(rec, np.arange(p_rec.max() + 2 if len(p_rec) else 1))
    weights = np.empty(len(p_rec))
    pb = np.searchsorted(p_rec, np.arange(p_rec.max() + 2 if len(p_rec) else 1))
    for r in track(np.unique(p_rec), "TextRank term weights"):
        terms, scores = textrank(seq_term[bounds[r] : bounds[r + 1]], window, damping, iterations)
        # the pair slice of recipe r lists the same sorted distinct terms
        weights[pb[r] : pb[r + 1]] = scores[np.searchsorted(terms, p_term[pb[r] : pb[r + 1]])]
    return weights


def _bert_all(cache, words, names, scorer, p_rec, p_term, chunk: int = 1024) -> np.ndarray:
    """BERT relevance of each (recipe, term) pair, recipes embedded ``chunk`` at a time."""
    term_emb = scorer.embed([t.replace("_", " ") for t in names])
    weights = np.empty(len(p_rec))
    pb = np.searchsorted(p_rec, np.arange(len(cache) + 1))
    vocab = np.array(["<pad>", "<unk>", *words], dtype=object)
    for a in track(range(0, len(cache), chunk), "BERT term weights (chunks)"):
        b = min(len(cache), a + chunk)
        texts = []
        for i in range(a, b):
            parts = [cache.title[i], *cache.recipe_sentences(i)]
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            texts.append(" ".join(vocab[ids]).replace("_", " "))
        doc = scorer.embed(texts)
        sl = slice(pb[a], pb[b])
        weights[sl] = bert_relevance(term_emb[p_term[sl]], doc[p_rec[sl] - a])
    return weights
