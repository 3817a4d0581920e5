"""Key-term rating (SEJE phase I): TF-IDF, TextRank or a BERT-family model.

* **tfidf**: ``w(t, d) = tf(t, d) * idf(t)`` with ``tf`` the number of occurrences of term t in
  recipe d (title, instructions and ingredient list) and the smoothed
  ``idf(t) = ln((1 + N) / (1 + df(t))) + 1`` over the N train recipes (scikit-learn's default).
* **textrank**: PageRank over a recipe's term co-occurrence graph (Mihalcea & Tarau, 2004):
  terms within ``window`` positions of each other in the recipe's term sequence are linked,
  edge weight = number of co-occurrences.
* **bert**: KeyBERT-style relevance, ``(1 + cos(e_t, e_d)) / 2`` between the mean-pooled
  embedding of the term alone and of the recipe text, from a local model folder
  (``transformers``; nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def idf(df: np.ndarray, num_docs: int) -> np.ndarray:
    """Smoothed inverse document frequency ``ln((1 + N) / (1 + df)) + 1``."""
    return np.log((1.0 + num_docs) / (1.0 + np.asarray(df, dtype=np.float64))) + 1.0


def tfidf(counts: np.ndarray, terms: np.ndarray, idf_values: np.ndarray) -> np.ndarray:
    """TF-IDF weights of (term, count) pairs."""
    return counts.astype(np.float64) * idf_values[terms]


def textrank(
    sequence: np.ndarray, window: int, damping: float, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """TextRank scores of the distinct terms of one recipe.

    Args:
        sequence: The recipe's term indices in text order (repeats allowed).
        window: Terms fewer than ``window`` positions apart are linked.
        damping: PageRank damping factor.
        iterations: Power iterations.

    Returns:
        ``(terms, scores)``: the distinct terms (sorted) and their PageRank scores (sum 1).
    """
    terms, seq = np.unique(sequence, return_inverse=True)
    n = len(terms)
    if n <= 1:
        return terms, np.ones(n)
    adj = np.zeros((n, n))
    for gap in range(1, max(2, window)):
        a, b = seq[:-gap], seq[gap:]
        keep = a != b
        np.add.at(adj, (a[keep], b[keep]), 1.0)
    adj += adj.T
    out = adj.sum(1)
    # a term with no neighbour spreads its score uniformly (dangling node)
    trans = np.where(out[:, None] > 0, adj / np.maximum(out[:, None], 1e-12), 1.0 / n)
    p = np.full(n, 1.0 / n)
    for _ in range(iterations):
        p = (1.0 - damping) / n + damping * (trans.T @ p)
    return terms, p / p.sum()


class BertScorer:
    """Mean-pooled embeddings from a local BERT-family model.

    Args:
        model_path: Folder written by ``save_pretrained`` (model and tokenizer).
        device: Torch device string.
        batch_size: Texts per forward pass.
        max_length: Tokens per text (longer texts are truncated).
    """

    def __init__(self, model_path: str | Path, device: str, batch_size: int, max_length: int):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"data.features.bert_model: no model folder at {path} (save one with "
                "save_pretrained; nothing is downloaded)"
            )
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised mean-pooled last hidden states, float32 [len(texts), H]."""
        torch = self.torch
        out = []
        with torch.inference_mode():
            for a in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[a : a + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                h = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def bert_relevance(term_emb: np.ndarray, doc_emb: np.ndarray) -> np.ndarray:
    """``(1 + cos) / 2`` between matched rows of term and document embeddings."""
    return (1.0 + np.sum(term_emb * doc_emb, axis=-1)) / 2.0
