"""Median seconds per NVAE training step and peak memory, for named configs.

Each config runs in a fresh subprocess so its peak RSS is its own. The step is the full NVAE
update: forward, balanced KL, spectral + BN regularisers, backward and AdaMax.

    python bench/nvae_step.py                     # tiny and small configs
    python bench/nvae_step.py --configs cifar10   # full CIFAR-10 model at batch 2 (slow on CPU)
    python bench/nvae_step.py --recompute --channels-last --compile

Reference implementation on a 2-core CPU (spec nvae.md section 7): tiny 0.157 s/step and
0.52 GB max RSS; CIFAR-10 at batch 2 about 11.4 s/step and 7.5 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # 32x32, C=16, 1 scale, 2 groups, batch 8, no flows: the reference's tiny benchmark
    "tiny": (dict(num_channels=16, image_size=32, num_groups_per_scale=2), 8),
    "tiny_nf1": (dict(num_channels=16, image_size=32, num_groups_per_scale=2, num_nf=1), 8),
    "tiny16": (dict(num_channels=16, image_size=16, num_groups_per_scale=2), 8),
    "binary": (
        dict(in_channels=1, decoder_dist="bernoulli", num_channels=16, num_latent_scales=2,
             num_groups_per_scale=2),
        8,
    ),
    "cifar10": (dict(num_channels=128, num_groups_per_scale=30, num_nf=1), 2),
}


def run_one(name: str, steps: int, warmup: int, opts: dict) -> dict:
    import torch

    from jointgen.models.nvae import NVAE
    from jointgen.models.nvae.objectives import (
        SpectralRegularizer,
        balance_alphas,
        balanced_kl,
        bn_loss,
    )

    torch.manual_seed(0)
    kwargs, batch = CONFIGS[name]
    kwargs = dict(kwargs, recompute_bn_swish=opts["recompute"],
                  checkpoint_cells=opts["checkpoint"], channels_last=opts["channels_last"])
    net = NVAE(**kwargs)
    sr = SpectralRegularizer(net)
    alphas = balance_alphas(net.groups)
    opt = torch.optim.Adamax(net.parameters(), lr=1e-3, eps=1e-3, weight_decay=3e-4)
    fwd = torch.compile(net) if opts["compile"] else net
    c, s = net.in_channels, net.image_size
    x = torch.rand(batch, c, s, s)
    x = x.round() if net.decoder_dist == "bernoulli" else torch.round(x * 255) / 255

    def step():
        out = fwd(x)
        recon = -net.log_likelihood(out, x)
        kl, _ = balanced_kl(out.kl, alphas, 0.5)
        loss = (recon + 0.5 * kl).mean() + 1e-2 * sr(net) + 1e-2 * bn_loss(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "config": name,
        "batch": batch,
        "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "s_per_step_median": round(statistics.median(times), 4),
        "s_per_step_min": round(min(times), 4),
        "peak_rss_gb": round(rss_gb, 3),
        "threads": torch.get_num_threads(),
        **opts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "tiny_nf1", "tiny16", "binary"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--recompute", action="store_true", help="recompute BN+Swish in backward")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing per cell")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    opts = dict(recompute=a.recompute, checkpoint=a.checkpoint, channels_last=a.channels_last,
                compile=a.compile)
    if a.child:
        print(json.dumps(run_one(a.child, a.steps, a.warmup, opts)))
        return
    for name in a.configs:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(a.steps),
               "--warmup", str(a.warmup)]
        cmd += [f"--{k.replace('_', '-')}" for k, v in opts.items() if v]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"{r['config']:<9} batch {r['batch']:<2} params {r['params_M']:>8.3f}M  "
            f"median {r['s_per_step_median']:.4f} s/step  (min {r['s_per_step_min']:.4f})  "
            f"peak RSS {r['peak_rss_gb']:.3f} GB"
        )


if __name__ == "__main__":
    main()
