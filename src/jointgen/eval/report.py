"""Writing evaluation results: JSON, markdown tables and the CdSprites+ leaderboard format.

The leaderboard follows spec §2.3 (Sejnová et al., arXiv 2209.03048): Strict and Letters in %
as ``mean (sd)`` over seeds, Feats as ``mean/number of attributes`` without sd, and "–" for
Feats at level 1, where there is only one attribute. Inputs are the dicts returned by
``jointgen.eval.coherence`` (``strict``, ``feats``, ``num_attributes``, ``letters``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DASH = "–"
LEADERBOARD_COLUMNS = (
    "Level",
    "Model",
    "Txt→Img Strict",
    "Txt→Img Feats",
    "Img→Txt Strict",
    "Img→Txt Feats",
    "Img→Txt Letters",
    "Joint Strict",
    "Joint Feats",
)
Metrics = Mapping[str, float] | Sequence[Mapping[str, float]] | None


def _seeds(metrics: Metrics) -> list[Mapping[str, float]]:
    if metrics is None:
        return []
    return [metrics] if isinstance(metrics, Mapping) else list(metrics)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_percent(values: Sequence[float]) -> str:
    """Fractions as a rounded percentage, ``"47 (14)"`` over seeds or ``"47"`` for one."""
    if len(values) == 0:
        return DASH
    mean, sd = mean_sd(values)
    text = f"{100 * mean:.0f}"
    return f"{text} ({100 * sd:.0f})" if len(values) > 1 else text


def format_feats(values: Sequence[float], num_attributes: int) -> str:
    """Mean number of right attributes as ``"1.3/3"``; ``"–"`` with a single attribute."""
    if len(values) == 0 or num_attributes <= 1:
        return DASH
    return f"{mean_sd(values)[0]:.1f}/{num_attributes}"


def leaderboard_row(
    level: int,
    model: str,
    txt2img: Metrics = None,
    img2txt: Metrics = None,
    joint: Metrics = None,
) -> dict[str, str]:
    """One CdSprites+-style leaderboard row.

    Args:
        level: dataset level.
        model: model name for the row.
        txt2img: ``cross_coherence_txt2img`` result, or a list of them (one per seed).
        img2txt: ``cross_coherence_img2txt`` result(s); ``letters`` needs the source captions.
        joint: ``joint_coherence`` result(s).

    Returns:
        Column name -> cell text, in ``LEADERBOARD_COLUMNS`` order; missing results are "–".
    """
    row = {"Level": str(level), "Model": model}
    for prefix, metrics in (("Txt→Img", txt2img), ("Img→Txt", img2txt), ("Joint", joint)):
        seeds = _seeds(metrics)
        count = int(seeds[0]["num_attributes"]) if seeds else 0
        row[f"{prefix} Strict"] = format_percent([m["strict"] for m in seeds])
        row[f"{prefix} Feats"] = format_feats([m["feats"] for m in seeds], count)
        if prefix == "Img→Txt":
            letters = [m["letters"] for m in seeds if "letters" in m]
            row["Img→Txt Letters"] = format_percent(letters if len(letters) == len(seeds) else [])
    return {column: row[column] for column in LEADERBOARD_COLUMNS}


def markdown_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None
) -> str:
    """A GitHub markdown table; ``columns`` defaults to the keys of the first row."""
    if not rows:
        raise ValueError("a table needs at least one row")
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, DASH)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def leaderboard_table(rows: Sequence[Mapping[str, str]]) -> str:
    """Markdown leaderboard of ``leaderboard_row`` results."""
    return markdown_table(rows, LEADERBOARD_COLUMNS)


def flatten(results: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Nested dicts as one level with slash-joined keys (``txt2img/acc/shape``)."""
    out = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


def write_results(
    results: Mapping[str, object],
    out_dir: str | os.PathLike = "results",
    name: str = "eval",
    leaderboard: Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Path]:
    """Write ``<name>.json`` (the nested results) and ``<name>.md`` under ``out_dir``.

    The markdown holds the leaderboard when rows are given, then a metric/value table of the
    flattened results (floats with 4 significant digits).

    Args:
        results: nested dict of metrics (floats, ints, strings such as the FD label).
        out_dir: output directory, created when missing.
        name: file stem.
        leaderboard: ``leaderboard_row`` results to put first in the markdown.

    Returns:
        ``{"json": path, "markdown": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=2, sort_keys=True) + "\n")
    parts = [f"# {name}\n"]
    if leaderboard:
        parts.append(leaderboard_table(leaderboard))
    flat = flatten(results)
    if flat:
        rows = [
            {"metric": k, "value": f"{v:.4g}" if isinstance(v, float) else str(v)}
            for k, v in flat.items()
        ]
        parts.append(markdown_table(rows))
    paths["markdown"].write_text("\n".join(parts))
    return paths
