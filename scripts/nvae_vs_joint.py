"""Compare the image-only NVAE with the joint VAE of the same image branch (issue 3).

Reads a multirun of ``jointgen-train -m experiment=nvae_vs_joint``, and for each job reports
test bits/dim (importance-weighted, as logged after training: ``test/bpd`` for the NVAE,
``test/bpd_img`` for the joint model, whose image bound integrates over the shared latent) and
the in-domain Fréchet distance of prior samples to the test images, on the features of the
suite's own attribute classifier (not comparable to Inception FID).

    python scripts/nvae_vs_joint.py logs/train/multiruns/<time> [--num-samples 1000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from jointgen.eval import FD_LABEL, frechet_distance, markdown_table, train_attribute_classifier
from jointgen.utils.checkpoint import model_from_checkpoint


def _samples(module, n: int, temp: float, batch: int = 250) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return torch.cat(
            [module.sample_images(min(batch, n - i), temp) for i in range(0, n, batch)]
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("multirun", type=Path)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()

    rows = []
    for job in sorted(p for p in args.multirun.iterdir() if (p / "metrics.json").is_file()):
        summary = json.loads((job / "metrics.json").read_text())
        module, cfg = model_from_checkpoint(
            summary["best_checkpoint"] or summary["last_checkpoint"]
        )
        joint = cfg.model._target_.endswith("JointLitModule")
        datamodule = instantiate(cfg.data)
        datamodule.setup("test")
        real = datamodule.datasets["test"].images
        level, size = cfg.data.level, cfg.data.image_size
        classifier, acc = train_attribute_classifier(level, image_size=size)
        worst = min(v for k, v in acc.items() if k != "train_seconds")
        fake = _samples(module, args.num_samples, args.temperature)
        fd = frechet_distance(real, fake, classifier)["in_domain_fd"]
        m = summary["metrics"]
        rows.append(
            {
                "model": "joint VAE (NVAE image branch)" if joint else "NVAE (image only)",
                "params": f"{sum(p.numel() for p in module.parameters()) / 1e6:.3f}M",
                "steps": summary["global_step"],
                "test bits/dim": f"{m['test/bpd_img' if joint else 'test/bpd']:.3f}",
                "in-domain FD (prior samples)": f"{fd:.2f}",
                "classifier acc (worst attribute)": f"{worst:.4f}",
            }
        )
        print(OmegaConf.to_yaml({"job": str(job), **rows[-1]}), flush=True)
    table = markdown_table(rows)
    (args.multirun / "nvae_vs_joint.md").write_text(table + f"\nFD: {FD_LABEL}\n")
    print(table)


if __name__ == "__main__":
    main()
