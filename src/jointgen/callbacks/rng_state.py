"""Saves and restores every RNG stream in checkpoints, so a resumed run draws the same
shuffles, latent samples and augmentations as an uninterrupted one."""

from __future__ import annotations

import random

import numpy as np
import torch
from lightning.pytorch import Callback


class RNGState(Callback):
    """Python, numpy, torch CPU and CUDA generator states in ``checkpoint["rng_states"]``."""

    def state_dict(self) -> dict:
        st = {
            "python": list(_to_list(random.getstate())),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def load_state_dict(self, state: dict) -> None:
        random.setstate(_to_tuple(state["python"]))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # a tensor and plain numbers: loadable with torch.load(weights_only=True)
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _to_list(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _to_tuple(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
