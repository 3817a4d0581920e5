"""`jointgen-sample ckpt_path=...`: sample grids from a trained checkpoint.

NVAE checkpoints: PNG grids of prior samples at several temperatures (``pixel_mode`` picks the
decoder mean or a pixel sample). With ``readjust_bn=true`` the BatchNorm statistics are
re-estimated on samples at each target temperature first (NVAE Sec. 5); the model is reloaded
between temperatures so each grid starts from the trained statistics.

Joint caption-image VAE checkpoints: ``mode=joint|caption_to_image|image_to_caption|reconstruct``
writes one captioned PNG grid per temperature (``<mode>_t<t>.png``; captions green when every
attribute checks out, red otherwise) and ``captions.jsonl``, one record per sample (see
``jointgen.generate.annotate``). Sources are the first ``num_samples`` pairs of ``split``, or the
``captions`` given on the command line for ``caption_to_image``. Data without attributes
(Recipe1M titles) get plain grids and records without checks, the vocabulary of the data module,
and the first complete pairs of ``split`` as sources.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from jointgen import CONF_DIR
from jointgen.generate import (
    MODES,
    annotate,
    caption_records,
    generate,
    is_joint_config,
    render_samples,
)
from jointgen.utils.checkpoint import model_from_checkpoint
from jointgen.utils.checks import ConfigError
from jointgen.utils.images import save_grid
from jointgen.utils.runtime import print_outputs


def _device(cfg: DictConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(cfg.device)


def run_sample(cfg: DictConfig) -> list[Path]:
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be positive, got {cfg.num_samples}")
    if cfg.mode not in MODES:
        hint = " (the NVAE decoder mean/sample switch is now pixel_mode)"
        hint = hint if cfg.mode in ("mean", "sample") else ""
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}{hint}")
    model, train_cfg = model_from_checkpoint(cfg.ckpt_path)
    out_dir = Path(cfg.paths.output_dir)
    if is_joint_config(train_cfg):
        written = sample_joint(cfg, model, train_cfg, out_dir)
    else:
        if cfg.mode != "joint":
            raise ConfigError(f"mode={cfg.mode} needs a joint caption-image checkpoint; "
                              "image models draw prior samples (mode=joint)")  # fmt: skip
        written = sample_prior(cfg, model, out_dir)
    index = out_dir / "samples.json"
    index.write_text(
        json.dumps({"checkpoint": str(cfg.ckpt_path), "files": [str(p) for p in written]})
    )
    files = {p.stem: p for p in written} | {"index": index}
    print_outputs(files, title="Sampling finished")
    return written


def sample_prior(cfg: DictConfig, model, out_dir: Path) -> list[Path]:
    """NVAE prior samples, one grid per temperature (optionally after BN re-adjustment)."""
    if cfg.pixel_mode not in ("mean", "sample"):
        raise ConfigError(f"pixel_mode must be mean or sample, got {cfg.pixel_mode!r}")
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    written = []
    for t in cfg.temperatures:
        # a fresh copy, so BN re-adjustment at one temperature does not carry over
        model, _ = model_from_checkpoint(cfg.ckpt_path)
        net = model.net.to(device)
        if cfg.readjust_bn:
            net.readjust_bn(cfg.readjust_bn_iters, cfg.readjust_bn_batch, float(t))
        net.eval()
        x = net.sample(cfg.num_samples, float(t), cfg.pixel_temperature, cfg.pixel_mode)
        path = save_grid(x, out_dir / f"samples_t{float(t):g}.png", nrow=int(math.sqrt(len(x))))
        written.append(path)
        print(f"wrote {path}")
    return written


def _datamodule(cfg: DictConfig, train_cfg):
    return instantiate(OmegaConf.merge(train_cfg.data, cfg.get("data") or {}))


def _first_pairs(dm, split: str, n: int) -> dict:
    """The first ``n`` samples of ``split`` that have both an image and a caption."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be one of train, val, test for this data, got {split!r}")
    try:
        return dm.dataset(split).pairs(n)
    except ValueError as e:
        raise ConfigError(f"split={split}: {e}") from None


def _sources(cfg: DictConfig, train_cfg, n: int, dm=None) -> dict:
    """Source captions/images for the cross modes: CLI captions or the data split."""
    if cfg.mode == "joint":
        return {}
    if cfg.captions:
        if cfg.mode != "caption_to_image":
            raise ConfigError("captions=[...] works with mode=caption_to_image only")
        return {"captions": [str(c) for c in cfg.captions][:n]}
    dm = dm or _datamodule(cfg, train_cfg)
    if not hasattr(dm, "space"):  # data without attributes (Recipe1M): the first full pairs
        return _first_pairs(dm, cfg.split, n)
    dm.setup("test")
    if cfg.split not in dm.datasets:
        raise ConfigError(f"split must be one of {sorted(dm.datasets)}, got {cfg.split!r}")
    ds = dm.datasets[cfg.split]
    return {"tokens": ds.tokens[:n], "images": ds.images[:n], "attrs": ds.attrs[:n]}


def sample_joint(cfg: DictConfig, model, train_cfg, out_dir: Path) -> list[Path]:
    """Captioned grids per temperature and ``captions.jsonl`` for a joint checkpoint."""
    from jointgen.data.shapes.attributes import AttributeSpace

    d = train_cfg.data
    dm = vocab = space = None
    if OmegaConf.select(d, "level") is not None:  # captioned shapes: attributes are checked
        space = AttributeSpace(int(d.level), int(d.num_colours), str(d.position_grid))
    else:  # other caption data (Recipe1M): the vocabulary comes from the data module
        dm = _datamodule(cfg, train_cfg)
        vocab = dm.vocab
    model.to(_device(cfg))
    n = int(cfg.num_samples)
    sources = _sources(cfg, train_cfg, n, dm)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, records = [], []
    for t in cfg.temperatures:
        torch.manual_seed(cfg.seed)  # the same noise at every temperature: comparable grids
        res = generate(model, cfg.mode, n, float(t), greedy=cfg.greedy, vocab=vocab, **sources)
        recs = annotate(res, space) if space is not None else caption_records(res)
        records += recs
        checked = recs if space is not None else None
        path = render_samples(res, checked, out_dir / f"{cfg.mode}_t{float(t):g}.png")
        written.append(path)
        if space is not None:
            strict = sum(r["strict"] for r in recs) / len(recs)
            print(f"wrote {path} (strict coherence {strict:.3f})")
        else:
            print(f"wrote {path}")
    jsonl = out_dir / "captions.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {jsonl}")
    return [*written, jsonl]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    from jointgen.cli import guarded

    guarded(run_sample)(cfg)


if __name__ == "__main__":
    main()
