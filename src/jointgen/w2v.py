"""`jointgen-w2v data=recipe1m`: train word2vec on the preprocessed corpus (gensim).

    jointgen-w2v data=recipe1m                       # original flags: sg, hs, window 10, 300-d
    jointgen-w2v data=recipe1m data.vocab.train.workers=8
    jointgen-w2v data=recipe1m check=/path/vocab.bin # validate any C-format file

Writes ``data.vocab.path`` (C binary, ``</s>`` first) and ``data.vocab.txt_path``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from jointgen import CONF_DIR


def run_w2v(cfg: DictConfig) -> dict:
    """Train (or, with ``check=PATH``, load and summarise) the word vectors."""
    from jointgen.data.recipe1m import pipeline
    from jointgen.data.word2vec import load_vectors

    vocab = OmegaConf.to_container(cfg.data.vocab, resolve=True)
    if cfg.get("check"):
        words, vectors = load_vectors(cfg.check)
        print(f"{cfg.check}: {len(words)} words x {vectors.shape[1]} dims, first {words[:5]}")
        return {"words": len(words), "dim": int(vectors.shape[1])}
    if Path(vocab["path"]).is_file() and not cfg.overwrite:
        words, vectors = load_vectors(vocab["path"])
        shape = f"{len(words)} words x {vectors.shape[1]}"
        print(f"{vocab['path']} exists ({shape}); overwrite=true retrains")
        return {"words": len(words), "dim": int(vectors.shape[1])}
    stats = pipeline.build_vocab(vocab)
    print(
        f"word2vec: {stats['words']} words x {stats['dim']} dims from {stats['corpus_words']} "
        f"corpus words in {stats['seconds']} s ({stats['words_per_second']} words/s)"
    )
    print(f"wrote {vocab['path']} and {vocab.get('txt_path')}")
    return stats


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="w2v")
def main(cfg: DictConfig) -> None:
    from jointgen.cli import guarded

    guarded(run_w2v)(cfg)


if __name__ == "__main__":
    main()
