"""word2vec training throughput (words/s) with gensim on the synthetic Recipe1M corpus.

Generates N synthetic recipes (no images), preprocesses them to ``tokenized_text.txt`` and
trains ``jointgen.data.word2vec.train_word2vec`` with the original flags (skip-gram,
hierarchical softmax, window 10, 300 dims) except ``--epochs`` and ``--workers``. Reports the
median over ``--runs`` of corpus words x epochs / training seconds (vocabulary building
included), and projects the time for the real corpus (about 1.03M recipes x ~150 words).

    python bench/word2vec.py                          # 20k recipes, 1 epoch, 2 workers
    python bench/word2vec.py --num-recipes 50000 --epochs 2 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REAL_CORPUS_WORDS = 1_029_720 * 150  # assumption: ~150 tokens per recipe line (see docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-recipes", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vector-size", type=int, default=300)
    p.add_argument("--runs", type=int, default=1)
    a = p.parse_args()
    from jointgen.data.recipe1m.build import preprocess_recipe1m
    from jointgen.data.recipe1m.synthetic import make_recipe1m
    from jointgen.data.word2vec import train_word2vec

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        make_recipe1m(src, a.num_recipes, images=False)
        preprocess_recipe1m(
            src, src / "cache", image_dir=src, verify_images="none", corpus_file=src / "corpus.txt"
        )
        rates, stats = [], {}
        for _ in range(a.runs):
            t = time.perf_counter()
            stats = train_word2vec(
                src / "corpus.txt",
                src / "vocab.bin",
                epochs=a.epochs,
                workers=a.workers,
                vector_size=a.vector_size,
            )
            wall = time.perf_counter() - t
            rates.append(stats["words_per_second"])
        rate = statistics.median(rates)
        print(
            f"corpus {stats['corpus_words']:,} words ({a.num_recipes} recipes), vocabulary "
            f"{stats['words']}, {a.vector_size} dims, sg+hs window 10, {a.workers} workers"
        )
        print(
            f"median {rate:,.0f} words/s over {a.runs} run(s) ({a.epochs} epoch(s); last run "
            f"{wall:.1f} s including writing vocab.bin)"
        )
        hours = REAL_CORPUS_WORDS * 10 / rate / 3600
        print(
            f"projected real corpus (~{REAL_CORPUS_WORDS / 1e6:.0f}M words x 10 epochs): "
            f"{hours:.1f} h at this rate"
        )


if __name__ == "__main__":
    main()
