"""`jointgen-collect <multirun dir>`: one table of overrides and metrics for a Hydra multirun.

Every job folder of a sweep (basic or Optuna) holds ``.hydra/overrides.yaml`` (the job's
command-line overrides), ``.hydra/config.yaml`` (its ``optimized_metric``) and, once the job
finished, ``metrics.json`` (written by :func:`jointgen.train.run_train`). A job without
``metrics.json`` is listed as ``failed`` (it raised, or is still running). The Optuna sweeper
also writes ``optimization_results.yaml`` with the best parameters, which becomes the table's
header note. Columns: the job number, its status, the overrides that differ between jobs, the
optimized metric (as ``objective``) and the metrics matching ``--metrics``.

Example::

    jointgen-collect logs/train/multiruns/2026-11-29_02-05-16          # results.csv, results.md
    jointgen-collect <dir> --metrics 'val/*' 'test/bpd' --sort objective

Python::

    from jointgen.collect import collect
    res = collect("logs/train/multiruns/2026-11-29_02-05-16")
    res.columns, res.rows, res.best   # rows are dicts; best is the best finished row
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_METRICS = ("val/*", "test/*")
EXCLUDE = ("*/kl_group/*", "*/kl_balance_coeff/*")  # per-group NVAE curves: too many columns
# metric names that get better upwards (used when the sweep does not say its direction)
MAXIMIZE_HINTS = ("score", "r1", "r5", "r10", "recall", "acc", "coherence", "bleu", "chrf")


@dataclass
class SweepResults:
    """A multirun's table: ``rows`` (dicts keyed by ``columns``), the best finished row."""

    sweep_dir: Path
    columns: list[str]
    rows: list[dict]
    objective: str | None = None
    direction: str = "minimize"
    best: dict | None = None
    optuna: dict = field(default_factory=dict)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        w.writerows({c: _cell(r.get(c)) for c in self.columns} for r in self.rows)
        return buf.getvalue()

    def to_markdown(self) -> str:
        lines = [f"# Sweep {self.sweep_dir.name}", ""]
        done = sum(r["status"] == "done" for r in self.rows)
        head = f"{len(self.rows)} jobs, {done} finished."
        lines.append(f"{head} Objective: `{self.objective}` ({self.direction}).")
        if self.best is not None:
            lines.append(
                f"Best: job {self.best['job']}, objective {_cell(self.best['objective'])}."
            )
        if self.optuna:
            lines.append(f"Optuna best parameters: `{self.optuna.get('best_params')}`.")
        lines += ["", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for r in self.rows:
            lines.append("| " + " | ".join(_cell(r.get(c)) for c in self.columns) + " |")
        return "\n".join(lines) + "\n"

    def write(self, prefix: Path | None = None) -> tuple[Path, Path]:
        """Write ``<prefix>.csv`` and ``<prefix>.md`` (default ``<sweep dir>/results``)."""
        prefix = Path(prefix) if prefix else self.sweep_dir / "results"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = prefix.with_suffix(".csv"), prefix.with_suffix(".md")
        csv_path.write_text(self.to_csv())
        md_path.write_text(self.to_markdown())
        return csv_path, md_path


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _parse_value(s: str):
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def _job_key(path: Path):
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job folders under ``sweep_dir``: those holding ``.hydra/overrides.yaml``."""
    jobs = [p.parent.parent for p in Path(sweep_dir).rglob(".hydra/overrides.yaml")]
    return sorted(set(jobs), key=_job_key)


def _read_job(job: Path) -> dict:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    over = {}
    for o in overrides:
        key, _, value = str(o).partition("=")
        over[key.lstrip("+")] = _parse_value(value)
    cfg_file = job / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    mfile = job / "metrics.json"
    summary = json.loads(mfile.read_text()) if mfile.is_file() else None
    return {
        "overrides": over,
        "objective_name": (cfg or {}).get("optimized_metric"),
        "summary": summary,
    }


def _direction(sweep_dir: Path, jobs: list[Path], objective: str | None) -> str:
    for job in jobs:
        hfile = job / ".hydra" / "hydra.yaml"
        if hfile.is_file():
            sweeper = (yaml.safe_load(hfile.read_text()) or {}).get("hydra", {}).get("sweeper", {})
            d = sweeper.get("direction")
            if isinstance(d, str) and d in ("minimize", "maximize"):
                return d
            break
    name = (objective or "").lower()
    return "maximize" if any(h in name for h in MAXIMIZE_HINTS) else "minimize"


def collect(
    sweep_dir: str | Path,
    metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
    all_overrides: bool = False,
    sort: str | None = None,
) -> SweepResults:
    """Read a multirun folder into a :class:`SweepResults` table.

    Args:
        sweep_dir: the multirun folder (``hydra.sweep.dir``).
        metrics: glob patterns of the metric names to include (besides the objective).
        all_overrides: list every override, not only those that differ between jobs.
        sort: a column to sort the rows by (best first for ``objective``); None keeps job order.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no multirun folder at {sweep_dir}")
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no job folders (*/.hydra/overrides.yaml) under {sweep_dir}")
    read = [(job, _read_job(job)) for job in jobs]

    keys: list[str] = []
    for _, r in read:
        keys += [k for k in r["overrides"] if k not in keys]
    if not all_overrides:  # only what the sweep varied
        keys = [k for k in keys if len({repr(r["overrides"].get(k)) for _, r in read}) > 1]
    names = sorted(
        {
            m
            for _, r in read
            for m in ((r["summary"] or {}).get("metrics") or {})
            if any(fnmatch.fnmatch(m, p) for p in metrics)
            and not any(fnmatch.fnmatch(m, p) for p in EXCLUDE)
        }
    )
    objective = next((r["objective_name"] for _, r in read if r["objective_name"]), None)
    names = [m for m in names if m != objective]

    rows = []
    for job, r in read:
        got = (r["summary"] or {}).get("metrics") or {}
        row = {"job": job.relative_to(sweep_dir).as_posix()}
        row["status"] = "done" if r["summary"] is not None else "failed"
        row.update({k: r["overrides"].get(k) for k in keys})
        row["objective"] = got.get(r["objective_name"]) if r["objective_name"] else None
        row.update({m: got.get(m) for m in names})
        rows.append(row)

    direction = _direction(sweep_dir, jobs, objective)
    sign = -1.0 if direction == "maximize" else 1.0
    scored = [
        r for r in rows if isinstance(r["objective"], float) and math.isfinite(r["objective"])
    ]
    best = min(scored, key=lambda r: sign * r["objective"]) if scored else None
    if sort:
        s = sign if sort == "objective" else 1.0
        rows.sort(key=lambda r: (r.get(sort) is None, s * r[sort] if _num(r.get(sort)) else 0))

    opt_file = sweep_dir / "optimization_results.yaml"
    optuna = yaml.safe_load(opt_file.read_text()) if opt_file.is_file() else {}
    columns = ["job", "status", *keys, "objective", *names]
    return SweepResults(sweep_dir, columns, rows, objective, direction, best, optuna or {})


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="jointgen-collect",
        description="Collect a Hydra multirun folder into one table (CSV and markdown) of "
        "overrides and metrics.",
    )
    p.add_argument("sweep_dir", help="the multirun folder, e.g. logs/train/multiruns/<time>")
    p.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        help="glob patterns of metric names to include (default: val/* test/*)",
    )
    p.add_argument("--all-overrides", action="store_true", help="also list constant overrides")
    p.add_argument("--sort", default=None, help="sort by this column (objective: best first)")
    p.add_argument("--out", default=None, help="output prefix (default: <sweep_dir>/results)")
    args = p.parse_args(argv)
    try:
        res = collect(args.sweep_dir, args.metrics, args.all_overrides, args.sort)
    except FileNotFoundError as e:
        p.exit(2, f"error: {e}\n")
    csv_path, md_path = res.write(Path(args.out) if args.out else None)
    print(res.to_markdown())
    print(f"wrote {csv_path}\nwrote {md_path}")


if __name__ == "__main__":
    main()
