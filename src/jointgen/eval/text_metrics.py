"""Caption quality on the captioned shapes (spec §5): exact match, token accuracy, BLEU-4 and
perplexity.

A scene has many correct captions (templates, synonyms, determiners), so exact match and BLEU
score a caption against the *whole* paraphrase set of its ground-truth attributes
(``grammar.paraphrases``), never against the single caption the dataset happened to draw.
Token accuracy is the exception: it compares token ids position by position with one reference
(teacher-forced reconstructions). Perplexity is exp of the mean per-token NLL in nats.

BLEU against hundreds of paraphrases per caption is slow in torchmetrics (it counts the n-grams
of every reference for every prediction), so each prediction gets only the references that
decide its statistics: for each of its n-grams one reference with the largest count, plus the
reference of closest length. ``BLEUScore`` then returns exactly the full-set value.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.text import BLEUScore

from jointgen.data.shapes.attributes import AttributeSpace
from jointgen.data.shapes.grammar import normalise, paraphrases
from jointgen.data.shapes.vocab import PAD


@lru_cache(maxsize=8192)
def _references(attrs: tuple[int, ...], space: AttributeSpace) -> tuple[str, ...]:
    return tuple(paraphrases(attrs, space))


@lru_cache(maxsize=8192)
def _ngram_index(attrs: tuple[int, ...], space: AttributeSpace) -> tuple[dict, tuple[int, ...]]:
    """n-gram -> (largest count in any paraphrase, first paraphrase with it); lengths."""
    best: dict[tuple[str, ...], tuple[int, int]] = {}
    lengths = []
    for index, ref in enumerate(_references(attrs, space)):
        words = ref.split()
        lengths.append(len(words))
        for gram, count in _ngrams(words).items():
            if count > best.get(gram, (0, 0))[0]:
                best[gram] = (count, index)
    return best, tuple(lengths)


def _ngrams(words: list[str], order: int = 4) -> Counter:
    return Counter(
        tuple(words[i : i + n]) for n in range(1, order + 1) for i in range(len(words) - n + 1)
    )


def _deciding_references(pred: str, attrs: tuple[int, ...], space: AttributeSpace) -> list[str]:
    """The paraphrases that fix ``pred``'s clipped counts and closest reference length."""
    refs = _references(attrs, space)
    best, lengths = _ngram_index(attrs, space)
    words = pred.split()
    keep = {best[gram][1] for gram in _ngrams(words) if gram in best}
    # torchmetrics takes the first reference of minimal length difference; keeping the original
    # order below makes it pick the same one
    diffs = [abs(len(words) - n) for n in lengths]
    keep.add(diffs.index(min(diffs)))
    return [refs[i] for i in sorted(keep)]


def reference_sets(
    attrs: np.ndarray | torch.Tensor,
    level: int,
    *,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> list[tuple[str, ...]]:
    """The full paraphrase set of every attribute row (cached per distinct row).

    Args:
        attrs: int [N, A] ground-truth attributes.
        level: dataset level, 1..6.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    space = AttributeSpace(level, num_colours, position_grid)
    rows = np.asarray(torch.as_tensor(attrs).cpu(), dtype=np.int64).tolist()
    return [_references(tuple(row), space) for row in rows]


def exact_match(
    preds: Sequence[str],
    attrs: np.ndarray | torch.Tensor,
    level: int,
    *,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> float:
    """Share of captions that equal one of the paraphrases of their ground-truth attributes.

    Args:
        preds: generated captions; case, sentence punctuation and spacing are normalised.
        attrs: int [N, A] ground-truth attributes.
        level: dataset level, 1..6.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    refs = reference_sets(attrs, level, num_colours=num_colours, position_grid=position_grid)
    if len(preds) != len(refs) or not refs:
        raise ValueError(f"need one caption per attribute row, got {len(preds)} and {len(refs)}")
    return float(np.mean([normalise(str(p)) in r for p, r in zip(preds, refs)]))


def token_accuracy(
    pred_tokens: np.ndarray | torch.Tensor,
    target_tokens: np.ndarray | torch.Tensor,
    pad: int = PAD,
) -> float:
    """Share of target positions (EOS included, PAD excluded) whose token id is predicted.

    Args:
        pred_tokens: int [N, L'] predicted ids; a shorter prediction is padded with ``pad``.
        target_tokens: int [N, L] reference ids.
        pad: the padding id.
    """
    pred = torch.as_tensor(pred_tokens).long().cpu()
    target = torch.as_tensor(target_tokens).long().cpu()
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"batch sizes differ: {pred.shape[0]} and {target.shape[0]}")
    length = target.shape[1]
    pred = F.pad(pred[:, :length], (0, max(0, length - pred.shape[1])), value=pad)
    mask = target != pad
    if not mask.any():
        raise ValueError("target_tokens hold no non-pad token")
    return float(((pred == target) & mask).sum() / mask.sum())


def bleu4(
    preds: Sequence[str],
    attrs: np.ndarray | torch.Tensor,
    level: int,
    *,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> float:
    """Corpus BLEU-4 (torchmetrics ``BLEUScore``) with every paraphrase as a reference.

    Unsmoothed, as in the usual corpus BLEU: a corpus without any 4-gram in the predictions
    (e.g. only level-1 canonical captions, "a circle") scores 0.

    Args:
        preds: generated captions (normalised like ``exact_match``).
        attrs: int [N, A] ground-truth attributes.
        level: dataset level, 1..6.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    space = AttributeSpace(level, num_colours, position_grid)
    rows = np.asarray(torch.as_tensor(attrs).cpu(), dtype=np.int64).tolist()
    if len(preds) != len(rows) or not rows:
        raise ValueError(f"need one caption per attribute row, got {len(preds)} and {len(rows)}")
    preds = [normalise(str(p)) for p in preds]
    targets = [_deciding_references(p, tuple(r), space) for p, r in zip(preds, rows)]
    metric = BLEUScore(n_gram=4)
    metric.update(preds, targets)
    return float(metric.compute())


def token_nll(
    logits: torch.Tensor, targets: torch.Tensor, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood in nats and the mask of scored tokens.

    Args:
        logits: [N, L, V] next-token logits aligned with ``targets``.
        targets: int [N, L] token ids; ``pad`` positions are not scored (EOS is).
        pad: the padding id.

    Returns:
        ``nll`` [N, L] (zero at pad) and ``mask`` [N, L] bool.
    """
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets.long(), reduction="none")
    mask = targets != pad
    return nll * mask, mask


def caption_perplexity(
    nll: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None
) -> dict[str, float]:
    """Perplexity from per-token NLL: exp of the mean nats per scored token.

    Args:
        nll: per-token NLL in nats, any shape (e.g. [N, L] from ``token_nll``).
        mask: bool of the same shape selecting the scored tokens; ``None`` scores all.

    Returns:
        ``nats_per_token`` and ``perplexity``.
    """
    nll = torch.as_tensor(nll, dtype=torch.float64)
    mask = torch.ones_like(nll, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    count = int(mask.sum())
    if count == 0:
        raise ValueError("no token to score")
    nats = float(nll[mask].sum() / count)
    return {"nats_per_token": nats, "perplexity": math.exp(nats)}


def caption_metrics(
    preds: Sequence[str],
    attrs: np.ndarray | torch.Tensor,
    level: int,
    *,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> dict[str, float]:
    """``exact_match`` and ``bleu4`` together, against the paraphrase sets of ``attrs``.

    Args:
        preds: generated captions.
        attrs: int [N, A] ground-truth attributes.
        level: dataset level, 1..6.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    kwargs = dict(num_colours=num_colours, position_grid=position_grid)
    return {
        "exact_match": exact_match(preds, attrs, level, **kwargs),
        "bleu4": bleu4(preds, attrs, level, **kwargs),
    }
