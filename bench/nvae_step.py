"""Median seconds per NVAE training step and peak memory, for named configs.

Each config runs in a fresh subprocess so its peak RSS is its own. The step is the full NVAE
update: forward, balanced KL, spectral + BN regularisers, backward and AdaMax.

    python bench/nvae_step.py                     # tiny and small configs
    python bench/nvae_step.py --configs cifar10 --steps 5 --warmup 1   # slow on CPU
    python bench/nvae_step.py --channels-last --recompute --checkpoint
    python bench/nvae_step.py --repeat 3          # alternate runs, report the median run

Memory: ``peak RSS`` is the process maximum (``ru_maxrss``). ``import torch`` alone is about
0.5 GB with a CUDA build (0.21 GB with the CPU-only wheel), so for tiny configs ``growth``
matters more: the peak minus the RSS measured after imports, model and optimizer construction
(what the training step itself adds). ``torch_rss_gb`` in the JSON output is the RSS right after
``import torch``; constructing a torch.optim optimizer imports torch._dynamo (and sympy), about
70 MB more, before the first step.

Reference implementation on a 2-core CPU (spec nvae.md section 7): tiny 0.157 s/step and
0.52 GB max RSS; CIFAR-10 at batch 2 about 11.4 s/step (first iteration 86 s) and 7.5 GB.
See bench/README.md for measured figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
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
        dict(
            in_channels=1,
            decoder_dist="bernoulli",
            num_channels=16,
            num_latent_scales=2,
            num_groups_per_scale=2,
        ),
        8,
    ),
    "cifar10": (dict(num_channels=128, num_groups_per_scale=30, num_nf=1), 2),
}
REFERENCE = {"tiny": (0.157, 0.52), "cifar10": (11.4, 7.5)}  # s/step, GB max RSS (spec 7)
OPTIONS = ("channels_last", "recompute", "checkpoint", "compile", "foreach", "malloc_tune")


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux), to spot a loaded machine."""
    try:
        with open("/proc/stat") as f:
            t = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(t[:8]) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _tune_malloc() -> None:
    # glibc returns freed heap memory to the OS and maps large blocks afresh, so every step
    # page-faults its activations back in; fixed thresholds keep that memory in the process
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD


def run_one(name: str, steps: int, warmup: int, opts: dict) -> dict:
    if opts["malloc_tune"]:
        _tune_malloc()
    import torch

    torch_gb = _rss_gb()  # the interpreter plus ``import torch``
    from jointgen.models.nvae import NVAE
    from jointgen.models.nvae.objectives import (
        SpectralRegularizer,
        balance_alphas,
        balanced_kl,
        bn_loss,
    )

    torch.manual_seed(0)
    kwargs, batch = CONFIGS[name]
    kwargs = dict(
        kwargs,
        recompute_bn_swish=opts["recompute"],
        checkpoint_cells=opts["checkpoint"],
        channels_last=opts["channels_last"],
    )
    net = NVAE(**kwargs)
    sr = SpectralRegularizer(net)
    alphas = balance_alphas(net.groups)
    opt = torch.optim.Adamax(
        net.parameters(), lr=1e-3, eps=1e-3, weight_decay=3e-4, foreach=opts["foreach"] or None
    )
    fwd = torch.compile(net) if opts["compile"] else net
    c, s = net.in_channels, net.image_size
    x = torch.rand(batch, c, s, s)
    x = x.round() if net.decoder_dist == "bernoulli" else torch.round(x * 255) / 255
    base_gb = _rss_gb()

    def training_loss():
        # like NVAEModule.training_step: the forward's outputs (pixel distribution, per-group
        # records) go out of scope when the loss is returned, before backward runs
        out = fwd(x)
        recon = -net.log_likelihood(out, x)
        kl, _ = balanced_kl(out.kl, alphas, 0.5)
        return (recon + 0.5 * kl).mean() + 1e-2 * sr(net) + 1e-2 * bn_loss(net)

    def step():
        loss = training_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = []
    busy0, own0, wall0 = _busy_s(), sum(os.times()[:2]), time.perf_counter()
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # CPU time other processes took during the run, as a share of the machine: results from
    # runs with more than a few percent are not comparable (rerun them on a quiet machine)
    other = None
    if busy0 is not None:
        wall = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        other = max(0.0, (_busy_s() - busy0) - (sum(os.times()[:2]) - own0)) / wall
    return {
        "config": name,
        "batch": batch,
        "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "s_per_step_median": round(statistics.median(times[warmup:]), 4),
        "s_per_step_min": round(min(times[warmup:]), 4),
        "first_step_s": round(times[0], 3),
        "peak_rss_gb": round(peak_gb, 3),
        "torch_rss_gb": round(torch_gb, 3),
        "base_rss_gb": round(base_gb, 3),
        "growth_gb": round(peak_gb - base_gb, 3),
        "other_load": None if other is None else round(other, 3),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **opts,
    }


def main() -> None:
    fmt = argparse.RawTextHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["tiny", "tiny_nf1", "tiny16", "binary"],
        choices=sorted(CONFIGS),
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="runs per config; the median is shown")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory layout")
    ap.add_argument("--recompute", action="store_true", help="recompute BN+Swish in backward")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing per cell")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network")
    ap.add_argument("--foreach", action="store_true", help="multi-tensor AdaMax (foreach=True)")
    ap.add_argument(
        "--malloc-tune",
        action="store_true",
        help="keep freed memory in the process (glibc mallopt)",
    )
    ap.add_argument("--json", help="append one JSON line per run to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    opts = {k: getattr(a, k) for k in OPTIONS}
    if a.child:
        print(json.dumps(run_one(a.child, a.steps, a.warmup, opts)))
        return
    flags = [f"--{k.replace('_', '-')}" for k, v in opts.items() if v]
    print(f"options: {' '.join(flags) or '(defaults)'}")
    for name in a.configs:
        runs = []
        for _ in range(a.repeat):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--steps",
                str(a.steps),
                "--warmup",
                str(a.warmup),
                *flags,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                print(f"{name}: failed\n{res.stderr[-2000:]}")
                break
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
        if not runs:
            continue
        r = sorted(runs, key=lambda r: r["s_per_step_median"])[len(runs) // 2]
        line = (
            f"{r['config']:<9} batch {r['batch']:<2} params {r['params_M']:>8.3f}M  "
            f"median {r['s_per_step_median']:.4f} s/step (min {r['s_per_step_min']:.4f}, "
            f"first {r['first_step_s']:.2f})  peak RSS {r['peak_rss_gb']:.3f} GB  "
            f"growth {r['growth_gb']:.3f} GB"
        )
        if r["other_load"] is not None and r["other_load"] > 0.05:
            line += f"  [machine {100 * r['other_load']:.0f}% busy elsewhere: rerun]"
        if name in REFERENCE:
            ref_s, ref_gb = REFERENCE[name]
            line += (
                f"  | vs ref: {ref_s / r['s_per_step_median']:.2f}x faster, "
                f"{r['peak_rss_gb'] / ref_gb:.2f}x RSS"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
