"""Cross-modal retrieval evaluation for Recipe1M: MedR and R@K over random bags (SEJE issue 4).

Protocol (im2recipe, Salvador et al., CVPR 2017; kept by SEJE, ACME, H-T; spec ``seje.md`` §6):

* the pool holds one image embedding and one recipe embedding per test recipe, sorted together
  by recipe id (H-T's rule, so the bags do not depend on extraction order);
* ``n_bags`` bags of ``N`` pool indices are drawn without replacement from a dedicated
  ``random.Random(seed)`` (seed 1234); bag ``b`` is the ``b``-th draw;
* in a bag each image queries the ``N`` recipes (i2r) and each recipe the ``N`` images (r2i);
  rank = 1 + the number of gallery items *strictly* closer than the true match (ties favour it);
* per bag MedR = ``np.median`` of the ``N`` ranks (for even ``N`` the mean of the two middle
  ranks, so 4.5 occurs; ``torch.median`` would take the lower one), R@K = % of ranks <= K;
  reported values are means over bags.

The ranking is vectorised: one ``N x N`` distance matrix per bag from a matmul (``torch``
threads), whose entries are compared with its diagonal row-wise (i2r) and column-wise (r2i), so
both directions come from the same numbers. A 10k x 10k bag costs one 10k x 1024 x 10k matmul
instead of the reference's 10^8 Python-level comparisons.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

log = logging.getLogger(__name__)

DIRECTIONS = ("i2r", "r2i")
METRICS = ("euclidean", "cosine", "dot")


# --- bags and ranks ------------------------------------------------------------------------


def bag_indices(pool_size: int, bag_size: int, n_bags: int, seed: int = 1234) -> np.ndarray:
    """Indices of ``n_bags`` bags of ``bag_size`` pool items, each drawn without replacement.

    Args:
        pool_size: Number of items in the (id-sorted) pool.
        bag_size: ``N``; must not exceed ``pool_size``.
        n_bags: Number of bags.
        seed: Seed of the dedicated RNG (global RNG states are left untouched).

    Returns:
        int64 array ``(n_bags, bag_size)``.
    """
    if bag_size > pool_size:
        raise ValueError(f"bag size {bag_size} exceeds the pool of {pool_size} items")
    rng = random.Random(seed)
    return np.array(
        [rng.sample(range(pool_size), bag_size) for _ in range(n_bags)], dtype=np.int64
    ).reshape(n_bags, bag_size)


def distance_matrix(img: Tensor, rec: Tensor, metric: str = "euclidean") -> Tensor:
    """``D[i, j]``: dissimilarity of image ``i`` and recipe ``j`` (smaller = closer).

    ``euclidean`` returns squared distances (same order as distances); ``cosine`` and ``dot``
    return negated similarities. float32 at least, whatever the input dtype.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    img, rec = img.float(), rec.float()
    if metric == "cosine":
        img = torch.nn.functional.normalize(img, dim=1)
        rec = torch.nn.functional.normalize(rec, dim=1)
    if metric == "euclidean":
        sq_i = img.pow(2).sum(1, keepdim=True)
        sq_r = rec.pow(2).sum(1).unsqueeze(0)
        return torch.addmm(sq_i + sq_r, img, rec.T, alpha=-2.0)
    return -(img @ rec.T)


def pair_ranks(
    img: Tensor, rec: Tensor, metric: str = "euclidean", chunk: int = 2048
) -> tuple[Tensor, Tensor]:
    """Ranks of the true matches for aligned ``img[i] <-> rec[i]`` (1 = best).

    Args:
        img: ``(N, D)`` image embeddings.
        rec: ``(N, D)`` recipe embeddings of the same items, same order.
        metric: ``euclidean`` (SEJE), ``cosine`` or ``dot``.
        chunk: Rows compared at a time (bounds the boolean temporaries to ``chunk x N``).

    Returns:
        ``(ranks_i2r, ranks_r2i)``, int64 ``(N,)`` each.
    """
    if img.shape != rec.shape or img.dim() != 2:
        raise ValueError(f"need two (N, D) tensors of equal shape, got {img.shape}, {rec.shape}")
    d = distance_matrix(img, rec, metric)
    diag = d.diagonal().clone()
    n = d.shape[0]
    i2r = torch.empty(n, dtype=torch.long, device=d.device)
    r2i = torch.zeros(n, dtype=torch.long, device=d.device)
    for s in range(0, n, chunk):
        block = d[s : s + chunk]
        # the diagonal entry itself is never strictly smaller than itself
        i2r[s : s + chunk] = (block < diag[s : s + chunk, None]).sum(1, dtype=torch.int32)
        r2i += (block < diag[None, :]).sum(0, dtype=torch.int32)
    return i2r + 1, r2i + 1


def rank_summary(ranks: Tensor | np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """MedR (numpy median semantics) and R@K in % of one or more bags of ranks.

    Args:
        ranks: ``(N,)`` ranks of one bag, or ``(n_bags, N)``; statistics are computed per bag
            and averaged over bags.
        ks: Recall cut-offs.
    """
    r = np.atleast_2d(torch.as_tensor(ranks).cpu().numpy())
    out = {"medr": float(np.median(r, axis=1).mean())}
    for k in ks:
        out[f"r{k}"] = float((r <= k).mean(axis=1).mean() * 100.0)
    return out


def size_label(n: int) -> str:
    """``1000 -> '1k'``, ``10000 -> '10k'``, ``500 -> '500'``."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def retrieval_metrics(
    img: Tensor,
    rec: Tensor,
    bag_sizes: Sequence[int] = (1000, 10000),
    n_bags: int | Sequence[int] = 10,
    seed: int = 1234,
    ks: Sequence[int] = (1, 5, 10),
    metric: str = "euclidean",
    directions: Sequence[str] = DIRECTIONS,
) -> dict[str, float]:
    """MedR and R@K in both directions for each bag size, averaged over bags.

    The pool must already be in its canonical order (sorted by recipe id). A bag size larger
    than the pool is capped at the pool size with a warning (the reference crashed instead).

    Args:
        img: ``(P, D)`` image embeddings of the pool.
        rec: ``(P, D)`` recipe embeddings, aligned with ``img``.
        bag_sizes: ``N`` values (1k and 10k in the papers).
        n_bags: Bags per size; one int for all sizes or one per size (T-Food: 10 and 5).
        seed: Seed of the bag RNG; each size restarts from it.
        ks: Recall cut-offs.
        metric: ``euclidean``, ``cosine`` or ``dot``.
        directions: Subset of ``("i2r", "r2i")``.

    Returns:
        Flat dict with keys ``{stat}_{direction}_{size}``, e.g. ``medr_i2r_1k``, ``r5_r2i_10k``,
        plus ``bags_{size}`` and ``n_{size}`` (the bag size actually used).
    """
    pool = img.shape[0]
    if rec.shape[0] != pool:
        raise ValueError(f"{pool} image but {rec.shape[0]} recipe embeddings")
    if pool < 2:
        raise ValueError(f"retrieval needs at least 2 items, got {pool}")
    bags = [n_bags] * len(bag_sizes) if isinstance(n_bags, int) else list(n_bags)
    if len(bags) != len(bag_sizes):
        raise ValueError(f"n_bags {n_bags} does not match bag_sizes {bag_sizes}")
    out: dict[str, float] = {}
    for size, nb in zip(bag_sizes, bags):
        label = size_label(size)
        n = min(size, pool)
        if n < size:
            log.warning("retrieval: bag size %d capped at the pool size %d", size, pool)
        ranks = {d: [] for d in DIRECTIONS}
        for idx in bag_indices(pool, n, nb, seed):
            sel = torch.from_numpy(idx).to(img.device)
            i2r, r2i = pair_ranks(img[sel], rec[sel], metric)
            ranks["i2r"].append(i2r)
            ranks["r2i"].append(r2i)
        for d in directions:
            for stat, v in rank_summary(torch.stack(ranks[d]), ks).items():
                out[f"{stat}_{d}_{label}"] = v
        out[f"bags_{label}"] = float(nb)
        out[f"n_{label}"] = float(n)
    return out


# --- ids as tensors (for DDP gathering) ----------------------------------------------------


def encode_ids(ids: Sequence[str], width: int) -> Tensor:
    """ASCII ids -> ``(len(ids), width)`` int64 codes, zero-padded (gatherable across ranks)."""
    out = torch.zeros(len(ids), width, dtype=torch.long)
    for i, s in enumerate(ids):
        b = s.encode("utf-8")
        if len(b) > width or b"\0" in b:
            raise ValueError(f"id {s!r} is longer than max_id_len={width} bytes or contains NUL")
        out[i, : len(b)] = torch.tensor(list(b), dtype=torch.long)
    return out


def decode_ids(codes: Tensor) -> list[str]:
    """Inverse of :func:`encode_ids`."""
    return [bytes(c for c in row if c).decode("utf-8") for row in codes.cpu().tolist()]


def sort_pool(img: Tensor, rec: Tensor, ids: list[str]) -> tuple[Tensor, Tensor, list[str]]:
    """Sort the pool by id and drop repeated ids (DDP samplers pad with repeated items)."""
    order, seen = [], set()
    for i in sorted(range(len(ids)), key=ids.__getitem__):
        if ids[i] not in seen:
            seen.add(ids[i])
            order.append(i)
    sel = torch.tensor(order, dtype=torch.long, device=img.device)
    return img[sel], rec[sel], [ids[i] for i in order]


# --- torchmetrics wrapper ------------------------------------------------------------------


class RecipeRetrieval(Metric):
    """Recipe1M retrieval metric: MedR and R@K, both directions, over seeded bags.

    States are the embeddings (and id codes), gathered with ``dist_reduce_fx="cat"``, so under
    DDP every rank ranks the whole pool; ids are encoded as byte codes so they travel with the
    embeddings, and repeated ids (padding added by distributed samplers) are dropped.

    Args:
        bag_sizes: ``N`` values, e.g. ``(1000,)`` for validation, ``(1000, 10000)`` for test.
        n_bags: Bags per size (int or one per size).
        seed: Bag RNG seed (1234).
        ks: Recall cut-offs.
        metric: ``euclidean`` (SEJE), ``cosine`` or ``dot``.
        max_id_len: Byte width of the id codes (Recipe1M ids have 10 characters).
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        bag_sizes: Sequence[int] = (1000, 10000),
        n_bags: int | Sequence[int] = 10,
        seed: int = 1234,
        ks: Sequence[int] = (1, 5, 10),
        metric: str = "euclidean",
        max_id_len: int = 32,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.bag_sizes, self.n_bags, self.seed = tuple(bag_sizes), n_bags, seed
        self.ks, self.metric, self.max_id_len = tuple(ks), metric, max_id_len
        self.add_state("img", default=[], dist_reduce_fx="cat")
        self.add_state("rec", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, img: Tensor, rec: Tensor, ids: Sequence[str] | None = None) -> None:
        """Add a batch of aligned embeddings (and their recipe ids)."""
        if img.shape != rec.shape:
            raise ValueError(f"image {tuple(img.shape)} and recipe {tuple(rec.shape)} differ")
        if ids is not None and len(ids) != img.shape[0]:
            raise ValueError(f"{len(ids)} ids for {img.shape[0]} embeddings")
        if (ids is None) != (len(self.ids) == 0) and len(self.img) > 0:
            raise ValueError("give ids with every update or with none")
        self.img.append(img.detach().float())
        self.rec.append(rec.detach().float())
        if ids is not None:
            self.ids.append(encode_ids(ids, self.max_id_len).to(img.device))

    def pool(self) -> tuple[Tensor, Tensor, list[str] | None]:
        """The (synced) pool in canonical order: sorted by id, duplicates dropped."""
        img, rec = dim_zero_cat(self.img), dim_zero_cat(self.rec)
        if isinstance(self.ids, list) and len(self.ids) == 0:
            return img, rec, None
        return sort_pool(img, rec, decode_ids(dim_zero_cat(self.ids)))

    def compute(self) -> dict[str, Tensor]:
        img, rec, _ = self.pool()
        res = retrieval_metrics(
            img, rec, self.bag_sizes, self.n_bags, self.seed, self.ks, self.metric
        )
        return {k: torch.tensor(v) for k, v in res.items()}


# --- reporting -----------------------------------------------------------------------------


def format_table(results: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> str:
    """A plain-text table of :func:`retrieval_metrics` output, one row per size and direction."""
    sizes = sorted(
        {k.split("_")[-1] for k in results if k.startswith("medr_")},
        key=lambda s: results.get(f"n_{s}", 0),
    )
    head = f"{'N':>6} {'bags':>4} {'dir':>4} {'MedR':>7}" + "".join(f" {f'R@{k}':>6}" for k in ks)
    lines = [head, "-" * len(head)]
    for s in sizes:
        for d in DIRECTIONS:
            if f"medr_{d}_{s}" not in results:
                continue
            row = f"{s:>6} {int(results.get(f'bags_{s}', 0)):>4} {d:>4}"
            row += f" {results[f'medr_{d}_{s}']:7.2f}"
            row += "".join(f" {results[f'r{k}_{d}_{s}']:6.1f}" for k in ks)
            lines.append(row)
    return "\n".join(lines) + "\n"
