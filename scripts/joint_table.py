"""Evaluate every joint-VAE run under a folder (e.g. a multirun) and print one table.

    jointgen-train -m experiment=joint_shapes model.net.fusion=mmvae_plus,mopoe,moe,poe
    python scripts/joint_table.py logs/train/multiruns/<time> --key model.net.fusion

Runs ``jointgen-eval`` on each job's best checkpoint (results under ``<job>/eval/results``)
and prints strict coherence in both directions, joint coherence, image bits/dim and the
in-domain Fréchet distance of caption-to-image samples, as markdown (also ``<dir>/table.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from joint_ladder import _bin, _run  # noqa: E402

from jointgen.eval.report import markdown_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("root", type=Path)
    ap.add_argument("--key", action="append", default=[], help="config keys to show per run")
    ap.add_argument("--skip-eval", action="store_true", help="read existing eval results")
    args = ap.parse_args()
    rows = []
    for job in sorted(
        p.parent for p in args.root.rglob("metrics.json") if (p.parent / "checkpoints").is_dir()
    ):  # training runs only (jointgen-eval's own folders have no checkpoints)
        summary = json.loads((job / "metrics.json").read_text())
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        if not args.skip_eval:
            ckpt = summary["best_checkpoint"] or summary["last_checkpoint"]
            _run([_bin("jointgen-eval"), f"ckpt_path={ckpt}", f"hydra.run.dir={job / 'eval'}"],
                 job / "eval.log")  # fmt: skip
        r = json.loads((job / "eval" / "results" / "metrics.json").read_text())
        c = r["coherence"]
        row = {k: OmegaConf.select(cfg, k) for k in args.key}
        row |= {
            "steps": summary["global_step"],
            "c2i strict": f"{c['c2i']['strict']:.3f}",
            "i2c strict": f"{c['i2c']['strict']:.3f}",
            "joint strict": f"{c['joint']['strict']:.3f}",
            "c2i feats": f"{c['c2i']['feats']:.2f}/{int(c['c2i']['num_attributes'])}",
            "i2c feats": f"{c['i2c']['feats']:.2f}/{int(c['i2c']['num_attributes'])}",
            "image bpd": f"{summary['metrics'].get('test/bpd_img', float('nan')):.3f}",
            "FD c2i (in-domain)": f"{r.get('fd', {}).get('c2i', float('nan')):.1f}",
        }
        rows.append(row)
    table = markdown_table(rows)
    (args.root / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
