"""A small CNN that reads the captioned attributes off shapes images (spec §5).

One shared convolutional trunk, one linear head per attribute. It is trained on freshly generated
data (random streams the dataset splits never use), reports its held-out accuracy per attribute,
and is cached on disk under a name that hashes every training parameter. Its penultimate
features define the in-domain Fréchet distance (``jointgen.eval.frechet``).

Two input channels are added to RGB because they make the attributes linear-ish in the pooled
features: the saturation (max - min channel), which is the object's coverage since backgrounds
are grey, and the pixel coordinates (CoordConv, Liu et al. 2018, arXiv 1807.03247), so global
average pooling keeps the position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jointgen.data.shapes.attributes import AttributeSpace
from jointgen.data.shapes.generate import generate_shapes
from jointgen.eval.attributes import to_uint8_nhwc

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = "1"  # bump when the architecture or training changes the weights
_TRAIN_STREAM, _TEST_STREAM = 1000, 1001  # never used by the dataset splits (0..3)


def default_cache_dir() -> Path:
    """``$JOINTGEN_CACHE/eval`` or ``~/.cache/jointgen/eval``."""
    return Path(os.environ.get("JOINTGEN_CACHE", Path.home() / ".cache" / "jointgen")) / "eval"


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class AttributeClassifier(nn.Module):
    """CNN with one classification head per captioned attribute of a level.

    Args:
        level: dataset level, 1..6.
        num_colours: colours of the dataset, 2..8.
        position_grid: ``"quadrants"`` or ``"grid3"``.
        width: channels of the first stage; later stages use 2× and 4×.
        feature_dim: size of the penultimate feature vector.
    """

    def __init__(
        self,
        level: int,
        num_colours: int = 6,
        position_grid: str = "quadrants",
        width: int = 16,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.space = AttributeSpace(level, num_colours, position_grid)
        self.config = {
            "level": level,
            "num_colours": num_colours,
            "position_grid": position_grid,
            "width": width,
            "feature_dim": feature_dim,
        }
        w = width
        self.convs = nn.Sequential(
            _block(6, w),
            _block(w, 2 * w, stride=2),
            _block(2 * w, 2 * w),
            _block(2 * w, 4 * w, stride=2),
            _block(4 * w, 4 * w),
        )
        # average pooling measures areas (size), max pooling detects local patterns (shape)
        self.project = nn.Sequential(nn.Linear(8 * w, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(feature_dim, k) for k in self.space.cardinalities)
        self.num_features = feature_dim  # read by torchmetrics' FID for custom feature modules

    @property
    def level(self) -> int:
        return self.space.level

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float [N, 3, H, W] -> normalised RGB, saturation, x, y channels."""
        # follow the weights' dtype: torchmetrics' set_dtype(float64) converts them
        dtype = self.heads[0].weight.dtype
        x = images.to(dtype) / 255.0 if images.dtype == torch.uint8 else images.to(dtype)
        sat = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
        n, _, h, w = x.shape
        grid = dict(device=x.device, dtype=dtype)
        ys = torch.linspace(-1.0, 1.0, h, **grid).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, **grid).view(1, 1, 1, w).expand(n, 1, h, w)
        return torch.cat([2.0 * x - 1.0, 4.0 * sat, xs, ys], dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] of images [N, 3, H, W]."""
        h = self.convs(self._inputs(images))
        return self.project(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every attribute head, each [N, cardinality]."""
        h = self.features(images)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Attribute indices int64 [N, A] in the dataset's ``attrs`` layout.

        Args:
            images: [N, H, W, 3] or [N, 3, H, W], uint8 or float in [0, 1].
            batch_size: images per forward pass.
        """
        was_training = self.training
        self.eval()
        x = _as_nchw(images)
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(x), batch_size):
            logits = self(x[start : start + batch_size].to(device))
            out.append(torch.stack([lg.argmax(1) for lg in logits], dim=1).cpu())
        self.train(was_training)
        return torch.cat(out).numpy().astype(np.int64)


def _as_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 tensor [N, 3, H, W] from any layout ``to_uint8_nhwc`` accepts."""
    return torch.from_numpy(to_uint8_nhwc(images)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def extract_features(
    images: np.ndarray | torch.Tensor, classifier: AttributeClassifier, batch_size: int = 512
) -> torch.Tensor:
    """Penultimate classifier features, float32 [N, feature_dim], in eval mode.

    Args:
        images: [N, H, W, 3] or [N, 3, H, W], uint8 or float in [0, 1].
        classifier: a trained ``AttributeClassifier``.
        batch_size: images per forward pass.
    """
    was_training = classifier.training
    classifier.eval()
    x = _as_nchw(images)
    device = next(classifier.parameters()).device
    feats = [
        classifier.features(x[s : s + batch_size].to(device)).cpu()
        for s in range(0, len(x), batch_size)
    ]
    classifier.train(was_training)
    return torch.cat(feats)


# --- training -------------------------------------------------------------------------------


def _accuracy(
    model: AttributeClassifier, images: np.ndarray, attrs: np.ndarray
) -> dict[str, float]:
    pred = model.predict(images)
    return {
        name: float((pred[:, j] == attrs[:, j]).mean())
        for j, name in enumerate(model.space.attr_names)
    }


def train_attribute_classifier(
    level: int,
    image_size: int = 32,
    num_train: int = 20000,
    epochs: int = 5,
    seed: int = 0,
    *,
    num_test: int = 2000,
    num_colours: int = 6,
    position_grid: str = "quadrants",
    width: int = 16,
    feature_dim: int = 128,
    batch_size: int = 128,
    lr: float = 3e-3,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    device: str = "cpu",
) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train (or load from the cache) an attribute classifier on freshly generated images.

    Args:
        level: dataset level, 1..6.
        image_size: image side in pixels; the classifier is only valid at this size.
        num_train: generated training images.
        epochs: passes over the training images.
        seed: seed of the generated data, the initialisation and the batch order.
        num_test: generated held-out images for the reported accuracy.
        num_colours: colours of the dataset.
        position_grid: ``"quadrants"`` or ``"grid3"``.
        width: channels of the first CNN stage.
        feature_dim: penultimate feature size (the in-domain FD dimension).
        batch_size: training batch size.
        lr: peak learning rate of the one-cycle AdamW schedule.
        cache_dir: where cached weights live; ``None`` means ``default_cache_dir()``.
        use_cache: read and write the cache file; ``False`` always trains.
        device: torch device for training.

    Returns:
        The model (eval mode, on ``device``) and its held-out accuracy per attribute, plus
        ``train_seconds`` (from the run that trained it, also when loaded from the cache).
    """
    model_cfg = dict(
        level=level,
        num_colours=num_colours,
        position_grid=position_grid,
        width=width,
        feature_dim=feature_dim,
    )
    params = dict(
        model_cfg,
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        version=CLASSIFIER_VERSION,
    )
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"attr_clf_L{level}_{image_size}px_{digest}.pt"
    if use_cache and path.exists():
        state = torch.load(path, map_location=device, weights_only=True)
        model = AttributeClassifier(**state["config"]).to(device)
        model.load_state_dict(state["state_dict"])
        return model.eval(), dict(state["accuracy"])

    start = time.perf_counter()
    data_kwargs = dict(num_colours=num_colours, position_grid=position_grid, paraphrase_rate=0.0)
    train = generate_shapes(
        level, num_train, image_size, seed, stream=_TRAIN_STREAM, **data_kwargs
    )
    test = generate_shapes(level, num_test, image_size, seed, stream=_TEST_STREAM, **data_kwargs)
    torch.manual_seed(seed)
    model = AttributeClassifier(**model_cfg).to(device)
    images = _as_nchw(train["images"])
    attrs = torch.from_numpy(train["attrs"])
    steps = epochs * -(-num_train // batch_size)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=lr, total_steps=steps, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(num_train, generator=generator)
        total = 0.0
        for s in range(0, num_train, batch_size):
            idx = order[s : s + batch_size]
            logits = model(images[idx].to(device))
            target = attrs[idx].to(device)
            loss = sum(F.cross_entropy(lg, target[:, j]) for j, lg in enumerate(logits))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += loss.item() * len(idx)
        elapsed = time.perf_counter() - start
        log.info("epoch %d: loss %.4f, %.0f s", epoch, total / num_train, elapsed)
    model.eval()
    accuracy = _accuracy(model, test["images"], test["attrs"])
    accuracy["train_seconds"] = time.perf_counter() - start
    log.info("attribute classifier L%d %dpx: %s", level, image_size, accuracy)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(
            {"config": model.config, "state_dict": model.state_dict(), "accuracy": accuracy}, tmp
        )
        os.replace(tmp, path)
    return model, accuracy
