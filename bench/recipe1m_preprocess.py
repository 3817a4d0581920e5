"""Median seconds and peak RSS of `jointgen-preprocess` on a synthetic Recipe1M without images.

Generates N synthetic recipes once (JSON only), then preprocesses them ``--runs`` times, each run
in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own. The goal of issue 4 is 1M
recipes in under 10 minutes and under 4 GB peak RSS on 2 cores; measure at a modest N and
extrapolate (the report prints a linear projection by recipes and by layer1 bytes: the real
layer1.json is about 1.4 GB for 1.03M recipes, about twice the synthetic bytes per recipe).

    python bench/recipe1m_preprocess.py                        # 100k recipes, 3 runs
    python bench/recipe1m_preprocess.py --num-recipes 20000 --runs 1 --features tfidf
    python bench/recipe1m_preprocess.py --num-recipes 100000 --tile 10 --runs 1   # 1M quickly

``--tile K`` writes K copies of the generated recipes with distinct ids (generation is slower
than preprocessing); the copies share a vocabulary, so the projected memory for real text is
somewhat higher than measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL_RECIPES, REAL_LAYER1_BYTES = 1_029_720, 1.4e9

CHILD = """
import json, sys, time
from pathlib import Path
from jointgen.data.recipe1m.build import preprocess_recipe1m
from jointgen.data.recipe1m.cache import Recipe1MCache
src, rating = Path(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
meta = preprocess_recipe1m(src, src / "cache", image_dir=src / "images", verify_images="none",
                           classes_file=src / "classes1M.pkl", corpus_file=src / "corpus.txt")
t_cache = time.perf_counter() - t
t_feat = 0.0
if rating != "none":
    from jointgen.features import write_keyterms
    t = time.perf_counter()
    write_keyterms(Recipe1MCache(src / "cache"), rating=rating)
    t_feat = time.perf_counter() - t
print(json.dumps({"cache_s": t_cache, "features_s": t_feat, "kept": meta["num_recipes"]}))
"""


def tile(src: Path, k: int) -> None:
    """Replace the raw files in ``src`` by ``k`` copies with distinct recipe and image ids."""
    from jointgen.data.recipe1m.jsonstream import iter_json_array

    for name in ("layer1", "det_ingrs", "layer2"):
        path = src / f"{name}.json"
        rows = list(iter_json_array(path))
        with open(src / f"{name}.tmp", "w") as f:
            f.write("[")
            for c in range(k):
                for i, r in enumerate(rows):
                    r = dict(r, id=f"{c:x}{r['id']}")
                    if name == "layer2":
                        r["images"] = [dict(m, id=f"{c:x}{m['id']}") for m in r["images"]]
                    f.write(("\n" if c == i == 0 else ",\n") + json.dumps(r))
            f.write("\n]\n")
        (src / f"{name}.tmp").rename(path)


def run_once(src: Path, rating: str) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), rating], stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"preprocessing failed with status {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_gb"] = _child_peak_gb()
    return res


def _child_peak_gb() -> float:
    import resource

    # RUSAGE_CHILDREN holds the largest peak among waited-for children (KiB on Linux)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-recipes", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--features", default="none", help="none | tfidf | textrank: also time key terms"
    )
    p.add_argument("--workdir", default=None, help="keep the generated files here")
    p.add_argument("--tile", type=int, default=1, help="preprocess this many copies (see above)")
    a = p.parse_args()
    from jointgen.data.recipe1m.synthetic import make_recipe1m

    tmp = tempfile.TemporaryDirectory() if a.workdir is None else None
    src = Path(a.workdir or tmp.name)
    if not (src / "layer1.json").is_file():
        t = time.perf_counter()
        make_recipe1m(src, a.num_recipes, images=False)
        print(f"generated {a.num_recipes} recipes (no images) in {time.perf_counter() - t:.1f} s")
        if a.tile > 1:
            tile(src, a.tile)
    layer1_bytes = (src / "layer1.json").stat().st_size
    runs = [run_once(src, a.features) for _ in range(a.runs)]
    cache = statistics.median(r["cache_s"] for r in runs)
    feats = statistics.median(r["features_s"] for r in runs)
    total = cache + feats
    peak = max(r["peak_rss_gb"] for r in runs)
    n = a.num_recipes * a.tile
    print(
        f"recipes {n}, layer1.json {layer1_bytes / 1e6:.0f} MB, kept {runs[0]['kept']}, "
        f"{a.runs} run(s), {os.cpu_count()} CPUs"
    )
    print(
        f"median cache build   {cache:.1f} s ({n / cache:,.0f} recipes/s, "
        f"{layer1_bytes / cache / 1e6:.1f} MB/s of layer1)"
    )
    if a.features != "none":
        print(f"median key terms     {feats:.1f} s ({a.features})")
    print(f"peak RSS             {peak:.2f} GB (largest run; includes ~0.9 GB of imports)")
    by_n = total * REAL_RECIPES / n
    by_bytes = cache * REAL_LAYER1_BYTES / layer1_bytes + feats * REAL_RECIPES / n
    print(
        f"projected 1.03M real recipes: {by_n / 60:.1f} min by recipe count, "
        f"{by_bytes / 60:.1f} min by layer1 bytes (goal < 10 min)"
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
