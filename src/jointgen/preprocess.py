"""`jointgen-preprocess data=recipe1m`: raw Recipe1M JSON -> cache, word2vec corpus, key terms.

    jointgen-preprocess data=recipe1m paths.data_dir=/datasets            # everything
    jointgen-preprocess data=recipe1m stage=features data.features.rating=textrank
    jointgen-preprocess data=recipe1m_synthetic stage=synthetic           # generate only

Then train the word vectors with `jointgen-w2v data=recipe1m`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from jointgen import CONF_DIR
from jointgen.utils.checks import ConfigError

log = logging.getLogger(__name__)
STAGES = ("all", "cache", "features", "synthetic")


def run_preprocess(cfg: DictConfig) -> dict:
    """Run the requested stages; returns {"cache": meta or None, "features": stats or None}."""
    from jointgen.data.recipe1m import pipeline
    from jointgen.data.recipe1m.cache import Recipe1MCache

    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    d = OmegaConf.to_container(cfg.data, resolve=True)
    cache_dir = Path(d["cache_dir"])
    out: dict = {"cache": None, "features": None}
    if d.get("synthetic"):
        pipeline.generate_synthetic(d["data_dir"], d["synthetic"])
    elif cfg.stage == "synthetic":
        raise ConfigError(
            "stage=synthetic needs a data config with data.synthetic (data=recipe1m_synthetic)"
        )
    if cfg.stage in ("all", "cache"):
        if (cache_dir / "meta.json").is_file() and not cfg.overwrite:
            print(f"cache exists: {cache_dir} (overwrite=true rebuilds it)")
        else:
            meta = pipeline.build_cache(
                d["data_dir"],
                cache_dir,
                d["image_dir"],
                d["image_partition_folder"],
                d["preprocess"],
                d["vocab"]["corpus"],
            )
            out["cache"] = meta  # its report was logged line by line
            print(f"cache: {cache_dir}\ncorpus: {d['vocab']['corpus']}")
    if cfg.stage in ("all", "features"):
        cache = Recipe1MCache(cache_dir)
        if cache.has_keyterms() and not cfg.overwrite and out["cache"] is None:
            print(f"key terms exist in {cache_dir} (overwrite=true recomputes them)")
        else:
            out["features"] = pipeline.build_features(cache_dir, d["features"])
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="preprocess")
def main(cfg: DictConfig) -> None:
    from jointgen.cli import guarded

    guarded(run_preprocess)(cfg)


if __name__ == "__main__":
    main()
