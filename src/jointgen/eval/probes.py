"""Linear probes on latent codes (spec §5): which factors does a latent space expose linearly?

Logistic regression per captioned attribute, trained on a small labelled subset (500 samples
by default, the MoPoE convention) and scored on held-out samples; ridge regression R² for the
continuous private nuisances of the ``private`` array (rotation, radius, shifts, stroke,
texture phase and angle, brightness), and logistic accuracy for the categorical texture type.
Expected on a well-factored joint model: the shared latent predicts the captioned attributes,
the private image latent predicts rotation and texture.

Everything is full-batch and float64 on the CPU (LBFGS for the logistic fits, the closed form
for ridge), so a probe gives the same number on every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CATEGORICAL_PRIVATE = ("texture",)  # index columns of ``private``; the rest are continuous


def _as_float64(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().to(torch.float64)
    return x.reshape(len(x), -1)


def _split(num: int, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < num_train < num:
        raise ValueError(f"num_train must be in 1..{num - 1} for {num} samples, got {num_train}")
    order = np.random.default_rng(seed).permutation(num)
    return order[:num_train], order[num_train:]


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def logistic_probe(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    *,
    weight_decay: float = 1e-2,
    max_iter: int = 200,
) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression.

    Args:
        train_x: [N, D] features (flattened when higher-dimensional); standardised on train.
        train_y: int [N] labels.
        test_x: [M, D] features.
        test_y: int [M] labels.
        weight_decay: L2 penalty on the weights (mean loss + ``weight_decay`` · ||W||²).
        max_iter: LBFGS iterations.
    """
    x, xt = _standardise(_as_float64(train_x), _as_float64(test_x))
    y = torch.as_tensor(train_y).long().cpu()
    yt = torch.as_tensor(test_y).long().cpu()
    classes = int(max(y.max(), yt.max())) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optim.step(closure)
    with torch.no_grad():
        return float(((xt @ weight + bias).argmax(1) == yt).double().mean())


def ridge_r2(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    *,
    alpha: float = 1.0,
) -> float:
    """Held-out R² of a closed-form ridge regression (1 is perfect, 0 predicts the mean).

    Args:
        train_x: [N, D] features; standardised on train.
        train_y: [N] targets.
        test_x: [M, D] features.
        test_y: [M] targets.
        alpha: L2 penalty on the (standardised) weights.
    """
    x, xt = _standardise(_as_float64(train_x), _as_float64(test_x))
    y, yt = _as_float64(train_y)[:, 0], _as_float64(test_y)[:, 0]
    y_mean = y.mean()
    gram = x.T @ x + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, x.T @ (y - y_mean))
    residual = yt - (xt @ weight + y_mean)
    total = (yt - yt.mean()).pow(2).sum().clamp_min(1e-12)
    return float(1.0 - residual.pow(2).sum() / total)


def probe_attributes(
    latents: np.ndarray | torch.Tensor,
    attrs: np.ndarray | torch.Tensor,
    attr_names: Sequence[str],
    *,
    num_train: int = 500,
    seed: int = 0,
    weight_decay: float = 1e-2,
) -> dict[str, float]:
    """Logistic-probe accuracy of every captioned attribute from latent codes.

    Args:
        latents: [N, D] codes, e.g. posterior means of the shared latent.
        attrs: int [N, A] ground-truth attributes.
        attr_names: the A column names.
        num_train: labelled samples per probe; the remaining N - num_train are the test set.
        seed: seed of the train/test split.
        weight_decay: L2 penalty of the logistic regression.

    Returns:
        ``probe/<attribute>`` test accuracy and ``chance/<attribute>`` (majority class share
        of the test set) for each attribute.
    """
    attrs = np.asarray(torch.as_tensor(attrs).cpu(), dtype=np.int64)
    x = _as_float64(latents)
    if len(x) != len(attrs) or attrs.shape[1] != len(attr_names):
        raise ValueError(f"latents {tuple(x.shape)} and attrs {attrs.shape} do not match")
    train, test = _split(len(x), num_train, seed)
    out = {}
    for j, name in enumerate(attr_names):
        y = attrs[:, j]
        out[f"probe/{name}"] = logistic_probe(
            x[train], y[train], x[test], y[test], weight_decay=weight_decay
        )
        out[f"chance/{name}"] = float(np.bincount(y[test]).max() / len(test))
    return out


def probe_private(
    latents: np.ndarray | torch.Tensor,
    private: np.ndarray | torch.Tensor,
    private_names: Sequence[str],
    *,
    num_train: int = 500,
    seed: int = 0,
    alpha: float = 1.0,
    weight_decay: float = 1e-2,
) -> dict[str, float]:
    """How well latent codes predict the private nuisances of the ``private`` array.

    Args:
        latents: [N, D] codes, e.g. posterior means of the private image latent.
        private: [N, P] nuisance values (``generate_shapes(...)["private"]``).
        private_names: the P column names (``generate_shapes(...)["private_names"]``).
        num_train: training samples per probe; the rest are the test set.
        seed: seed of the train/test split.
        alpha: ridge penalty of the continuous probes.
        weight_decay: L2 penalty of the categorical (logistic) probes.

    Returns:
        ``r2/<name>`` for continuous columns, ``probe/<name>`` accuracy for categorical ones.
    """
    private = _as_float64(private)
    x = _as_float64(latents)
    if len(x) != len(private) or private.shape[1] != len(private_names):
        raise ValueError(f"latents {tuple(x.shape)} and private {tuple(private.shape)} differ")
    train, test = _split(len(x), num_train, seed)
    out = {}
    for j, name in enumerate(private_names):
        y = private[:, j]
        if str(name) in CATEGORICAL_PRIVATE:
            y = y.round().long()
            out[f"probe/{name}"] = logistic_probe(
                x[train], y[train], x[test], y[test], weight_decay=weight_decay
            )
        else:
            out[f"r2/{name}"] = ridge_r2(x[train], y[train], x[test], y[test], alpha=alpha)
    return out
