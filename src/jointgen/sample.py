"""`jointgen-sample ckpt_path=...`: PNG grids of prior samples at several temperatures.

With ``readjust_bn=true`` the BatchNorm statistics are re-estimated on samples at each target
temperature first (NVAE Sec. 5); the model is reloaded between temperatures so each grid starts
from the trained statistics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from jointgen import CONF_DIR
from jointgen.utils.checkpoint import model_from_checkpoint
from jointgen.utils.checks import ConfigError
from jointgen.utils.images import save_grid


def run_sample(cfg: DictConfig) -> list[Path]:
    if cfg.mode not in ("mean", "sample"):
        raise ConfigError(f"mode must be mean or sample, got {cfg.mode!r}")
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be positive, got {cfg.num_samples}")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    written = []
    for t in cfg.temperatures:
        model, _ = model_from_checkpoint(cfg.ckpt_path)
        net = model.net.to(device)
        if cfg.readjust_bn:
            net.readjust_bn(cfg.readjust_bn_iters, cfg.readjust_bn_batch, float(t))
        net.eval()
        x = net.sample(cfg.num_samples, float(t), cfg.pixel_temperature, cfg.mode)
        path = save_grid(x, out_dir / f"samples_t{float(t):g}.png", nrow=int(math.sqrt(len(x))))
        written.append(path)
        print(f"wrote {path}")
    (out_dir / "samples.json").write_text(
        json.dumps({"checkpoint": str(cfg.ckpt_path), "files": [str(p) for p in written]})
    )
    return written


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    from jointgen.cli import guarded

    guarded(run_sample)(cfg)


if __name__ == "__main__":
    main()
