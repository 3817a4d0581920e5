"""The difficulty ladder: train and evaluate the joint VAE at shapes levels 1-6.

Runs ``jointgen-train experiment=joint_shapes data.level=L`` then ``jointgen-eval`` on the
best checkpoint for every level, and prints a table shaped like the CdSprites+ leaderboard
(spec joint_vae.md §2.3; Sejnova et al., arXiv 2209.03048) with our rows next to theirs.

    python scripts/joint_ladder.py                                # levels 1-6, default settings
    python scripts/joint_ladder.py --levels 1 2 3 --seeds 0 1 2 -- trainer.max_epochs=3
    python scripts/joint_ladder.py --out logs/ladder --skip-train   # re-evaluate existing runs
    python scripts/joint_ladder.py --eval joint.frechet=false -- trainer.max_epochs=2

Everything after ``--`` is passed to ``jointgen-train`` as Hydra overrides. The table goes to
stdout and to ``<out>/ladder.md``; per-level JSON to ``<out>/level_<L>_seed_<S>/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from jointgen.eval.report import leaderboard_row, leaderboard_table

# best model per level on the CdSprites+ leaderboard (strict %, spec §2.3), for reference rows
CDSPRITES_BEST = {
    1: ("MVAE/MMVAE (best)", "52", "64", "17"),
    2: ("MVAE/MMVAE (best)", "18", "55", "3"),
    3: ("MVAE/MMVAE (best)", "8", "59", "1"),
    4: ("MVAE/MMVAE (best)", "3", "1", "0"),
    5: ("MVAE/MMVAE (best)", "0", "0", "0"),
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"command failed ({proc.returncode}), see {log}:\n" + "\n".join(tail))


def run_level(
    level: int,
    seed: int,
    out: Path,
    overrides: list[str],
    skip_train: bool,
    eval_overrides: list[str] = (),
) -> dict:
    run_dir = out / f"level_{level}_seed_{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not skip_train:
        _run(
            [_bin("jointgen-train"), "experiment=joint_shapes", f"data.level={level}",
             f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides],
            run_dir / "train.log",
        )  # fmt: skip
    summary = json.loads((run_dir / "metrics.json").read_text())
    ckpt = summary["best_checkpoint"] or summary["last_checkpoint"]
    eval_dir = run_dir / "eval"
    _run(
        [_bin("jointgen-eval"), f"ckpt_path={ckpt}", f"hydra.run.dir={eval_dir}", *eval_overrides],
        run_dir / "eval.log",
    )
    return json.loads((eval_dir / "results" / "metrics.json").read_text())


def _coherence(results: dict, key: str) -> dict:
    """The coherence dict of one direction from ``jointgen-eval``'s JSON."""
    return results["coherence"][key]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("logs/ladder"))
    ap.add_argument("--model-name", default="jointgen MMVAE+ (ours)")
    ap.add_argument("--skip-train", action="store_true", help="evaluate existing runs only")
    ap.add_argument(
        "--eval",
        nargs="*",
        default=[],
        help="overrides for jointgen-eval, e.g. joint.frechet=false (skips training the FD "
        "classifier of every level)",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for jointgen-train (after --)")
    args = ap.parse_args()

    rows = []
    for level in args.levels:
        per_seed = [
            run_level(level, s, args.out, args.overrides, args.skip_train, args.eval)
            for s in args.seeds
        ]
        rows.append(
            leaderboard_row(
                level,
                args.model_name,
                txt2img=[_coherence(r, "c2i") for r in per_seed],
                img2txt=[_coherence(r, "i2c") for r in per_seed],
                joint=[_coherence(r, "joint") for r in per_seed],
            )
        )
        if level in CDSPRITES_BEST:
            name, t2i, i2t, joint = CDSPRITES_BEST[level]
            ref = dict.fromkeys(rows[-1], "–")
            ref.update({"Level": str(level), "Model": f"CdSprites+ {name}"})
            ref.update({"Txt→Img Strict": t2i, "Img→Txt Strict": i2t, "Joint Strict": joint})
            rows.append(ref)
        table = leaderboard_table(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ladder.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
