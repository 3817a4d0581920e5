"""Cross and joint coherence of generated captions and images (spec §5, CdSprites+ §2.3).

Attributes are exact on both sides: image attributes come from ``jointgen.eval.attributes``
(analytic by default), caption attributes from the grammar's inverse parser. A caption the
parser rejects, or an image without a readable object, counts as wrong for every attribute.

Every function returns a dict of floats with the same keys:

* ``strict``: share of samples with every attribute right (CdSprites+ "Strict");
* ``feats``: mean number of right attributes per sample (CdSprites+ "Feats", out of
  ``num_attributes``);
* ``acc/<attribute>``: per-attribute accuracy;
* ``parsed``: share of captions the parser accepts (caption-side functions only);
* ``letters``: CdSprites+ "Letters" (image→caption, when the source captions are given).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from jointgen.data.shapes.attributes import AttributeSpace
from jointgen.data.shapes.grammar import parse_caption
from jointgen.eval.attributes import image_attributes
from jointgen.eval.classifier import AttributeClassifier


def _int_array(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def parse_captions(
    captions: Sequence[str], level: int, *, num_colours: int = 6, position_grid: str = "quadrants"
) -> np.ndarray:
    """Attributes of captions by the exact parser, int64 [N, A]; unparseable rows are all -1.

    Args:
        captions: caption strings (decode token ids first with ``Vocabulary.decode``).
        level: dataset level, 1..6.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    width = len(AttributeSpace(level, num_colours, position_grid).attr_names)
    out = np.full((len(captions), width), -1, dtype=np.int64)
    for i, text in enumerate(captions):
        attrs = parse_caption(
            str(text), level, num_colours=num_colours, position_grid=position_grid
        )
        if attrs is not None:
            out[i] = attrs
    return out


def attribute_agreement(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, attr_names: Sequence[str]
) -> dict[str, float]:
    """Strict, Feats and per-attribute accuracy of ``pred`` against ``target``.

    Args:
        pred: int [N, A]; -1 (unreadable) never matches.
        target: int [N, A]; -1 (e.g. an unparseable caption) never matches either.
        attr_names: the A column names.
    """
    pred, target = _int_array(pred), _int_array(target)
    if pred.shape != target.shape or pred.shape[1] != len(attr_names):
        raise ValueError(
            f"pred {pred.shape} and target {target.shape} must be [N, {len(attr_names)}]"
        )
    if len(pred) == 0:
        raise ValueError("coherence needs at least one sample")
    right = (pred == target) & (pred >= 0) & (target >= 0)
    out = {
        "strict": float(right.all(1).mean()),
        "feats": float(right.sum(1).mean()),
        "num_attributes": float(len(attr_names)),
    }
    out.update({f"acc/{name}": float(right[:, j].mean()) for j, name in enumerate(attr_names)})
    return out


def letters_accuracy(preds: Sequence[str], targets: Sequence[str]) -> float:
    """CdSprites+ "Letters": share of characters equal to the target at the same position.

    Per pair, the matches over the longer of the two strings (so missing and extra characters
    both count as wrong), averaged over pairs; two empty strings agree fully.

    Args:
        preds: generated captions.
        targets: the ground-truth captions, one per prediction.
    """
    if len(preds) != len(targets) or not preds:
        raise ValueError(
            f"need equally many preds and targets, got {len(preds)} and {len(targets)}"
        )
    scores = []
    for p, t in zip(preds, targets):
        p, t = str(p), str(t)
        longest = max(len(p), len(t))
        scores.append(1.0 if longest == 0 else sum(a == b for a, b in zip(p, t)) / longest)
    return float(np.mean(scores))


def cross_coherence_txt2img(
    images: np.ndarray | torch.Tensor,
    source_attrs: np.ndarray | torch.Tensor,
    level: int,
    *,
    method: str = "analytic",
    classifier: AttributeClassifier | None = None,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> dict[str, float]:
    """Caption→image coherence: attributes of images generated from captions vs the captions'.

    Args:
        images: generated images [N, H, W, 3] or [N, 3, H, W], uint8 or float in [0, 1].
        source_attrs: int [N, A], the attributes of the conditioning captions.
        level: dataset level, 1..6.
        method: image attribute extractor, ``"analytic"`` or ``"classifier"``.
        classifier: the trained ``AttributeClassifier`` when ``method="classifier"``.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    if method == "both":
        raise ValueError("pick one extractor for coherence: 'analytic' or 'classifier'")
    space = AttributeSpace(level, num_colours, position_grid)
    pred = image_attributes(
        images,
        level,
        method,
        classifier=classifier,
        num_colours=num_colours,
        position_grid=position_grid,
    )
    return attribute_agreement(pred, source_attrs, space.attr_names)


def cross_coherence_img2txt(
    captions: Sequence[str],
    source_attrs: np.ndarray | torch.Tensor,
    level: int,
    *,
    source_captions: Sequence[str] | None = None,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> dict[str, float]:
    """Image→caption coherence: parsed generated captions vs the source images' attributes.

    Args:
        captions: captions generated from the source images.
        source_attrs: int [N, A], ground-truth attributes of the source images.
        level: dataset level, 1..6.
        source_captions: the dataset captions of the source images; adds ``letters``.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    space = AttributeSpace(level, num_colours, position_grid)
    parsed = parse_captions(captions, level, num_colours=num_colours, position_grid=position_grid)
    out = attribute_agreement(parsed, source_attrs, space.attr_names)
    out["parsed"] = float((parsed[:, 0] >= 0).mean())
    if source_captions is not None:
        out["letters"] = letters_accuracy(captions, source_captions)
    return out


def joint_coherence(
    images: np.ndarray | torch.Tensor,
    captions: Sequence[str],
    level: int,
    *,
    method: str = "analytic",
    classifier: AttributeClassifier | None = None,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> dict[str, float]:
    """Joint coherence: jointly generated images against the parse of their captions.

    Args:
        images: images decoded from the same latent samples as ``captions``.
        captions: the jointly generated captions.
        level: dataset level, 1..6.
        method: image attribute extractor, ``"analytic"`` or ``"classifier"``.
        classifier: the trained ``AttributeClassifier`` when ``method="classifier"``.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
    """
    if method == "both":
        raise ValueError("pick one extractor for coherence: 'analytic' or 'classifier'")
    space = AttributeSpace(level, num_colours, position_grid)
    image_attrs = image_attributes(
        images,
        level,
        method,
        classifier=classifier,
        num_colours=num_colours,
        position_grid=position_grid,
    )
    parsed = parse_captions(captions, level, num_colours=num_colours, position_grid=position_grid)
    out = attribute_agreement(image_attrs, parsed, space.attr_names)
    out["parsed"] = float((parsed[:, 0] >= 0).mean())
    return out
