"""Writing checkpoints atomically, loading them safely (weights_only=True), rebuilding models."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

from jointgen.utils.checks import ConfigError


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error for a missing/bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ConfigError(f"cannot load checkpoint {path} safely: {str(e).splitlines()[0]}") from e
    if "jointgen_config" not in ckpt:
        raise ConfigError(f"{path} has no jointgen_config: was it written by jointgen-train?")
    return ckpt


def model_from_checkpoint(path: str | Path):
    """Rebuild the LightningModule stored in ``path``; returns (module, config dict)."""
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(ckpt["jointgen_config"])
    model = instantiate(cfg.model)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, cfg


# --- atomic checkpoint writes -------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it.

    ``os.replace`` is atomic on POSIX and Windows, so a reader (or ``resume=auto`` after a
    SIGKILL or power loss) sees either the previous complete file or the new complete file,
    never a truncated one. Lightning's own writer truncates the target first. Temporary files
    are hidden (``.<name>.tmp-<pid>``) and never end in ``.ckpt``; leftovers of a killed
    writer are removed the next time the same checkpoint name is written. Remote paths
    (``s3://`` and the like) fall back to Lightning's writer.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Always ``weights_only=True`` (Lightning passes None, which it turns into False for
        URLs): a checkpoint from elsewhere cannot run code when a run resumes or tests."""
        if weights_only is False:
            raise ConfigError(f"refusing to load {path} with weights_only=False")
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **kwargs)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save(obj, path)`` via temp file + fsync + ``os.replace`` (+ fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # makes the rename itself durable
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a writer that was killed mid-write


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
