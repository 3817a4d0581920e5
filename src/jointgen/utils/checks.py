"""Checks run before any work starts: each failure is one line naming the key and value."""

from __future__ import annotations

import torch
from omegaconf import DictConfig


class ConfigError(ValueError):
    """A user-facing configuration error (printed as one line by the CLI)."""


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
