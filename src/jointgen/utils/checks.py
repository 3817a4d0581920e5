"""Checks run before any work starts: each failure is one line naming the key and value."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A user-facing configuration error (printed as one line by the CLI)."""


class DataFormatError(ConfigError):
    """A damaged or malformed dataset file; the message names the file and the key, value or
    position. A :class:`ConfigError`, so the console scripts print it as one line."""


def check_hardware(cfg: DictConfig) -> None:
    t = cfg.trainer
    acc, prec = str(t.get("accelerator", "cpu")), str(t.get("precision", "32-true"))
    if prec in ("16-mixed", "16", "16-true") and acc == "cpu":
        raise ConfigError(
            f"trainer.precision={prec} (precision=fp16) needs a GPU; on CPU use precision=bf16 "
            "or precision=fp32"
        )
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={acc} but no CUDA GPU is visible; use hardware=cpu or "
            "hardware=ddp_cpu"
        )
    devices = t.get("devices", 1)
    if isinstance(devices, int) and devices == 0:
        raise ConfigError("trainer.devices must be positive or -1, got 0")


def check_model_data(net, datamodule) -> None:
    """The network must be built for the images (and captions) the data module yields."""
    branches = getattr(net, "branches", None)
    if branches is not None and "img" in branches:  # the joint VAE: check both branches
        _check_joint(branches, datamodule)
        return
    shape = getattr(datamodule, "image_shape", None)
    if shape is None or not hasattr(net, "in_channels"):
        return
    c, h, w = shape
    if c != net.in_channels:
        raise ConfigError(
            f"model.net.in_channels={net.in_channels} but the data has {c} channel(s)"
        )
    if h != net.image_size or w != net.image_size:
        raise ConfigError(f"model.net.image_size={net.image_size} but the data images are {h}x{w}")
    binary = bool(getattr(datamodule, "binary", False))
    if binary != (net.decoder_dist == "bernoulli"):
        want = "bernoulli" if binary else "dmol"
        raise ConfigError(
            f"model.net.decoder_dist={net.decoder_dist} does not fit this data; use {want}"
        )
    bits = getattr(datamodule, "num_bits", None)
    if bits is not None and not binary and bits != net.num_bits:
        raise ConfigError(f"model.net.num_x_bits={net.num_bits} but the data has {bits} bits")


def _check_joint(branches, datamodule) -> None:
    img, txt = branches["img"], branches["txt"]
    shape = getattr(datamodule, "image_shape", None)
    if shape is not None:
        c, h, _ = shape
        size = getattr(img, "image_size", None)
        if size is not None and (h != size or c != img.channels):
            raise ConfigError(
                f"model.net.image is built for {img.channels}x{size}x{size} images but the "
                f"data has {c}x{h}x{h}"
            )
    vocab = getattr(datamodule, "vocab", None)
    emb = txt.encoder.embed.num_embeddings if hasattr(txt.encoder, "embed") else None
    if vocab is not None and emb is not None and emb != len(vocab):
        raise ConfigError(
            f"model.net.text.vocab_size={emb} but the data vocabulary has {len(vocab)} tokens"
        )


# --- whole-config validation (before anything is built) -----------------------------------

_PRECISIONS = {
    "32-true", "32", "64-true", "64", "16-mixed", "16", "bf16-mixed", "bf16", "16-true",
    "bf16-true", "transformer-engine", "transformer-engine-float16",
}  # fmt: skip
_ACCELERATORS = {"cpu", "gpu", "cuda", "mps", "tpu", "auto"}


def check_config(cfg: DictConfig, root: str = "train") -> None:
    """Validate a composed ``jointgen-train`` config; the first problem raises a one-line
    :class:`ConfigError` naming the key and its value.

    Covers unknown top-level keys (``+typo=1`` or a misspelt key in an experiment file; the
    known ones are those of ``conf/<root>.yaml`` and its groups), sizes and counts, trainer
    precision/accelerator/devices combinations, resume settings and the callback and logger
    nodes. Nothing is built and no file is read except ``conf/<root>.yaml``.
    """
    check_top_level_keys(cfg, root)
    check_hardware(cfg)
    from jointgen.utils.sweeps import check_hydra_launcher  # imports this module

    check_hydra_launcher(cfg)  # hydra/launcher=submitit_slurm vs trainer nodes and devices
    _check_trainer(cfg.trainer)
    _check_data(cfg.get("data"))
    if not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")
    resume = cfg.get("resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"resume must be null, auto or a path, got {resume!r}")
    lr = OmegaConf.select(cfg, "model.optimizer.lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"model.optimizer.lr must be positive, got {lr!r}")
    for group in ("callbacks", "logger"):
        node = cfg.get(group)
        for name, sub in (node or {}).items():
            if sub is not None and not (isinstance(sub, DictConfig) and "_target_" in sub):
                raise ConfigError(f"{group}.{name} must be a node with a _target_, got {sub!r}")


def check_top_level_keys(cfg: DictConfig, root: str = "train") -> None:
    """Every top-level key must be declared by ``conf/<root>.yaml`` (its keys or groups)."""
    from jointgen import CONF_DIR

    primary = Path(CONF_DIR) / f"{root}.yaml"
    if not primary.is_file():
        return
    raw = OmegaConf.load(primary)
    known = {str(k) for k in raw if k != "defaults"} | {"hydra"}
    for entry in raw.get("defaults", []):
        if isinstance(entry, (dict, DictConfig)):
            known |= {str(k).split("@")[0].split("/")[-1] for k in entry}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(
            f"unknown top-level key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )


def _check_trainer(t: DictConfig) -> None:
    prec, acc = str(t.get("precision", "32-true")), str(t.get("accelerator", "auto"))
    if prec not in _PRECISIONS:
        raise ConfigError(
            f"trainer.precision={prec} is not a Lightning precision; use precision=fp32, "
            "precision=bf16 or precision=fp16"
        )
    if acc not in _ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={acc} must be one of {sorted(_ACCELERATORS)}")
    if t.get("sync_batchnorm") and acc == "cpu":
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is GPU-only); "
            "set it to false with hardware=cpu or hardware=ddp_cpu"
        )
    if prec.startswith("bf16") and acc in ("gpu", "cuda") and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"trainer.precision={prec} but this GPU has no bf16; use fp16")
    devices = t.get("devices", 1)
    if isinstance(devices, int) and devices < -1:
        raise ConfigError(f"trainer.devices must be positive or -1, got {devices}")
    for key, low in (("num_nodes", 1), ("log_every_n_steps", 1), ("accumulate_grad_batches", 1)):
        _at_least(f"trainer.{key}", t.get(key), low)
    for key in ("max_epochs", "max_steps"):
        _at_least(f"trainer.{key}", t.get(key), -1)
    clip = t.get("gradient_clip_val")
    if clip is not None and not (isinstance(clip, (int, float)) and clip >= 0):
        raise ConfigError(f"trainer.gradient_clip_val must be >= 0 or null, got {clip!r}")


def _check_data(d: DictConfig | None) -> None:
    if d is None:
        return
    _at_least("data.batch_size", d.get("batch_size"), 1)
    _at_least("data.num_workers", d.get("num_workers"), 0)


def _at_least(key: str, value, low: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        rule = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"{key} must be {rule}, got {value!r}")
