"""The preprocessing steps in order, shared by ``jointgen-preprocess``, ``jointgen-w2v`` and the
DataModule's ``prepare_data``: synthetic generation (synthetic config only), the cache, word2vec
and the key-term features. Each step takes the plain dicts of ``conf/data/recipe1m*.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jointgen.data.recipe1m.cache import Recipe1MCache

log = logging.getLogger(__name__)


def generate_synthetic(data_dir: str | Path, synthetic: Mapping[str, Any]) -> bool:
    """Write the synthetic raw files into ``data_dir`` unless ``layer1.json`` exists."""
    from jointgen.data.recipe1m.synthetic import make_recipe1m

    if (Path(data_dir) / "layer1.json").is_file():
        return False
    counts = make_recipe1m(data_dir, **dict(synthetic))
    log.info("synthetic Recipe1M written to %s: %s", data_dir, counts)
    return True


def build_cache(
    data_dir: str | Path,
    cache_dir: str | Path,
    image_dir: str | Path,
    image_partition_folder: bool,
    preprocess: Mapping[str, Any],
    corpus_file: str | Path,
) -> dict:
    """Stream the raw JSON into the cache and write the word2vec corpus; returns meta.json."""
    from jointgen.data.recipe1m.build import preprocess_recipe1m, summarise

    p = dict(preprocess)
    p["corpus_splits"] = tuple(p.get("corpus_splits", ("train",)))
    meta = preprocess_recipe1m(
        data_dir,
        cache_dir,
        image_dir=image_dir,
        image_partition_folder=image_partition_folder,
        corpus_file=corpus_file,
        progress=log.info,
        **p,
    )
    for line in summarise(meta):
        log.info(line)
    return meta


def build_vocab(vocab: Mapping[str, Any]) -> dict:
    """Train word2vec on ``vocab.corpus`` and write ``vocab.path`` and ``vocab.txt_path``."""
    from jointgen.data.word2vec import train_word2vec

    stats = train_word2vec(vocab["corpus"], vocab["path"], vocab.get("txt_path"), **vocab["train"])
    log.info("word2vec: %s -> %s", stats, vocab["path"])
    return stats


def build_features(cache_dir: str | Path, features: Mapping[str, Any]) -> dict:
    """Compute the weighted key-term vectors and store them in the cache."""
    from jointgen.features.keyterms import write_keyterms

    stats = write_keyterms(Recipe1MCache(cache_dir), **dict(features))
    log.info("key terms: %s", stats)
    return stats
