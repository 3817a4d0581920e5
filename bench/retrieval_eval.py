"""Wall time and peak memory of the Recipe1M retrieval evaluation (10k x 10 bags, both ways).

The pool mimics the Recipe1M test split: 51,304 aligned image/recipe pairs of 1024-d
L2-normalised embeddings that share a latent (so ranks look like a trained model's, MedR a
few tens at 10k), evaluated with :func:`jointgen.eval.retrieval.retrieval_metrics` exactly as
``jointgen-eval`` does (sorting excluded). The reference ranks with a pure-Python loop: about
3 s per 1k bag and roughly one hour for 10k x 10 bags in one direction (spec seje.md §6).

    python bench/retrieval_eval.py                          # 10k x 10 bags, 2 threads, 3 runs
    python bench/retrieval_eval.py --precision fp32         # float32 screening instead
    python bench/retrieval_eval.py --sizes 1000 --repeats 5
    python bench/retrieval_eval.py --threads 16 --device cuda --precision fp32

Ranks are exact whatever ``--precision`` (``auto`` picks the bfloat16 screen on CPUs with
native bfloat16); the last line reports which share of the off-diagonal entries the screen left
ambiguous and re-checked in float32, in float64 and exactly, and checks that the precisions
agree when ``--compare`` is given.

Memory: ``peak RSS`` is the process maximum (``ru_maxrss``, includes ~0.5 GB for importing a
CUDA build of torch); ``growth`` is the peak minus the RSS after building the pool. The load
average is printed with the timings: other jobs on the machine inflate them.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=51304, help="pool size (Recipe1M test: 51,304)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000])
    p.add_argument("--bags", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--noise", type=float, default=3.2, help="modality noise (3.2: 10k MedR ~ 20)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16_checked"])
    p.add_argument(
        "--compare", action="store_true", help="also run fp32 once and check identical results"
    )
    args = p.parse_args()

    import torch

    from jointgen.eval.retrieval import format_table, retrieval_metrics

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.pool, args.dim, generator=g)
    img = z + args.noise * torch.randn(args.pool, args.dim, generator=g)
    rec = z + args.noise * torch.randn(args.pool, args.dim, generator=g)
    img = torch.nn.functional.normalize(img, dim=1).to(args.device)
    rec = torch.nn.functional.normalize(rec, dim=1).to(args.device)
    del z
    base = _rss_gb()
    load0 = os.getloadavg()[0]
    times, res, stats = [], None, {}
    for r in range(args.repeats):
        st: dict[str, int] = {}
        t0 = time.perf_counter()
        res = retrieval_metrics(
            img, rec, bag_sizes=args.sizes, n_bags=args.bags, precision=args.precision, stats=st
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if r == 0:
            stats = st
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load1 = os.getloadavg()[0]
    print(format_table(res), end="")
    sizes = "+".join(f"{s}" for s in args.sizes)
    print(
        f"pool {args.pool} x {args.dim}, N={sizes}, {args.bags} bags, both directions, "
        f"{args.threads} thread(s), {args.device}, precision {args.precision}"
    )
    print(
        f"median {statistics.median(times):.2f} s over {args.repeats} runs "
        f"(min {min(times):.2f}, max {max(times):.2f}); "
        f"peak RSS {peak:.2f} GB, growth {peak - base:.2f} GB; "
        f"load avg {load0:.1f} -> {load1:.1f}"
    )
    n = max(stats.get("entries", 0), 1)
    print(
        f"screen: {stats.get('ambiguous', 0) / (2 * n):.3%} of the {2 * n:,} comparisons "
        "(i2r and r2i) inside the error band"
    )
    print(
        f"re-checked: {stats.get('f32', 0) / n:.3%} of {n:,} entries in float32, "
        f"{stats.get('f64', 0) / n:.4%} in float64, {stats.get('exact', 0)} exactly; "
        f"{stats.get('escalated', 0)} block(s) re-screened"
    )
    if args.compare:
        ref = retrieval_metrics(img, rec, bag_sizes=args.sizes, n_bags=args.bags, precision="fp32")
        print(f"identical to precision=fp32: {ref == res}")


if __name__ == "__main__":
    main()
