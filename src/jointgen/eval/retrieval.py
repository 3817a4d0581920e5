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

Ranks are exact: the comparisons are decided in exact arithmetic on the float32 embeddings, so
they do not depend on how a matmul is blocked or threaded, and i2r and r2i come from the same
numbers. A bag is processed in row blocks (no ``N x N`` matrix): a fast matmul screens each
block and every entry is counted only where a rigorous error bound decides it; the few entries
near a threshold are re-checked in float32, float64, and exactly if still tied (see the comment
above ``PRECISIONS``). On CPUs with native bfloat16 the screen is a bfloat16 matmul, twice as
fast as float32; a 10k bag costs about one 10k x 1024 x 10k bfloat16 matmul instead of the
reference's 10^8 Python-level comparisons. :func:`retrieval_metrics` re-checks only the queries
whose rank can still move MedR or an R@K (:meth:`_ExactRanker.run`); its numbers are those of
the exact ranks.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
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


def _as_metric_inputs(img: Tensor, rec: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Both sides as float32 (at least), L2-normalised for ``cosine``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    img, rec = img.float(), rec.float()
    if metric == "cosine":
        img = torch.nn.functional.normalize(img, dim=1)
        rec = torch.nn.functional.normalize(rec, dim=1)
    return img, rec


def distance_matrix(img: Tensor, rec: Tensor, metric: str = "euclidean") -> Tensor:
    """``D[i, j]``: dissimilarity of image ``i`` and recipe ``j`` (smaller = closer).

    ``euclidean`` returns squared distances (same order as distances); ``cosine`` and ``dot``
    return negated similarities. float32 at least, whatever the input dtype.
    """
    img, rec = _as_metric_inputs(img, rec, metric)
    if metric == "euclidean":
        sq_i = img.pow(2).sum(1, keepdim=True)
        sq_r = rec.pow(2).sum(1).unsqueeze(0)
        return torch.addmm(sq_i + sq_r, img, rec.T, alpha=-2.0)
    return -(img @ rec.T)


# --- exact ranks ---------------------------------------------------------------------------
#
# What is computed. For aligned pairs (a_i, b_i) the score of image i and recipe j is
# s_ij = a_i.b_j - e_i - c_j, with e_i = |a_i|^2 / 2 and c_j = |b_j|^2 / 2 for ``euclidean``
# (s_ij = -d_ij^2 / 2) and e = c = 0 for ``dot`` and ``cosine`` (after normalising in float32).
# rank_i2r(i) = 1 + #{j != i : s_ij > s_ii} and rank_r2i(j) = 1 + #{i != j : s_ij > s_jj}, the
# comparisons taken in exact real arithmetic on the float32 inputs. So the ranks do not depend on
# how a matmul is blocked, threaded or vectorised, and both directions see the same numbers.
#
# How. Row blocks of the score matrix are screened with a fast matmul whose error is bounded
# rigorously (below); an entry is counted only when its computed value is farther from the
# threshold (the exact s_ii for i2r, s_jj for r2i) than the bound. The diagonal is excluded
# explicitly. The few entries inside the band are re-checked with float32 dot products (bound
# gamma_D |a||b|), then float64 ones, and any still undecided (ties) exactly: equal vectors are
# ties, otherwise math.fsum of the exactly representable float64 products decides the sign.
#
# Screening bound, per entry, in score units. The operands are rounded to the screening type
# (a = a^ + ra, b = b^ + rb), the norm terms and a centre kappa enter the same matmul as extra
# columns (e and c split into exactly representable limbs), and the matmul accumulates in
# float32 (bfloat16 and float32 screens; checked once per process for bfloat16) or float64:
#   |out - (s_ij - kappa)| <= |ra_i||b_j| + |a^_i||rb_j|        (input rounding, Cauchy-Schwarz)
#       + gamma_K (|a^_i||b^_j| + e_i + c_j + |kappa|)              (accumulation, any order)
#       + limb residuals + float64 errors of e, c
#       + 2^-120 K (1 + max|a| + max|b|)                             (subnormals, flushed or not)
# gamma_K = K u / (1 - K u), u = 2^-24 (2^-53 for float64). The bfloat16 output rounding is
# monotone, so comparing the rounded output with thresholds rounded outwards to bfloat16 is exact;
# the centre kappa keeps outputs near the thresholds small, where bfloat16 steps are fine. Every
# block also checks that its diagonal lies inside its own band (the exact value is known there).

PRECISIONS = ("auto", "fp32", "bf16_checked")

_U32 = 2.0**-24
_U64 = 2.0**-53
_SAFETY = 1.0 + 2.0**-10  # widens every screening band a little beyond the proven bound
_ESCALATE = 0.08  # re-screen a block more precisely when more of its entries are ambiguous
_BF16_MIN_N = 256  # "auto" screens smaller bags in float32 (no gain from bfloat16 there)
_PAIR_CHUNK = 2048  # pairs per float64 / exact re-check step
_ROWS = 1024  # rows per step of the per-row float64 sums


def _gamma(k: int, u: float) -> float:
    """Higham's gamma_k: relative bound of a k-term dot product in unit roundoff ``u``."""
    return k * u / (1.0 - k * u)


def _fp32_matmul_unit(device: torch.device) -> float:
    """Unit roundoff of the operands inside a float32 matmul (0: exact float32 operands).

    TF32 or bfloat16 internals (``torch.set_float32_matmul_precision``, ``allow_tf32`` and the
    newer ``fp32_precision`` switches) round the operands; the bound then covers a whole
    bfloat16 step (rounding to nearest or truncating).
    """
    reduced = torch.get_float32_matmul_precision() != "highest"
    for mod in (getattr(torch.backends, "mkldnn", None), getattr(torch.backends, "cuda", None)):
        mm = getattr(mod, "matmul", None)
        if getattr(mm, "fp32_precision", "none") not in ("none", "ieee"):
            reduced = True
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        reduced = True
    return 2.0**-7 if reduced else 0.0


_BF16_STATE: dict[str, bool] = {}


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _bf16_matmul_accumulates_in_fp32() -> bool:
    """Whether CPU bfloat16 matmuls stay within the float32-accumulation bound (cached).

    All-positive operands make accumulation errors add up: a kernel that accumulated in
    bfloat16 would miss the bound by orders of magnitude. Several row counts are tried, since
    small ones may take a different kernel.
    """
    if "ok" not in _BF16_STATE:
        g = torch.Generator().manual_seed(0)
        ok = True
        for m, k, sign in ((1, 2064, 1.0), (5, 1040, 1.0), (64, 2064, 1.0), (64, 1040, -1.0)):
            x = torch.rand(m, k, generator=g).to(torch.bfloat16)
            y = (torch.rand(96, k, generator=g) - (0.5 if sign < 0 else 0.0)).to(torch.bfloat16)
            out = torch.mm(x, y.T).double()
            ref = x.double() @ y.double().T
            mag = x.double().abs() @ y.double().abs().T
            bound = _gamma(k, _U32) * mag + 2.0**-8 * (ref.abs() + _gamma(k, _U32) * mag)
            ok &= bool(((out - ref).abs() <= bound * _SAFETY + 1e-30).all())
        _BF16_STATE["ok"] = ok
    return _BF16_STATE["ok"]


def _resolve_precision(precision: str, device: torch.device, n: int) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16_checked":
        if device.type != "cpu":
            raise ValueError("precision='bf16_checked' is for CPU; use 'fp32' on accelerators")
        if not _bf16_matmul_accumulates_in_fp32():
            raise RuntimeError("this CPU's bfloat16 matmul does not accumulate in float32")
        return precision
    if precision == "auto":
        fast = device.type == "cpu" and n >= _BF16_MIN_N and _cpu_has_native_bf16()
        return "bf16_checked" if fast and _bf16_matmul_accumulates_in_fp32() else "fp32"
    return precision


def _step(x: Tensor, up: bool) -> Tensor:
    """The next representable value of ``x`` (float32 or bfloat16) towards +inf or -inf."""
    return torch.nextafter(x, torch.full_like(x, float("inf") if up else float("-inf")))


def _round_out(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """float64 ``x`` rounded to a value of ``dtype`` that is >= x (``up``) or <= x.

    Returned as float32 (float64 for a float64 ``dtype``) for the comparisons.
    """
    if dtype == torch.float64:
        return x.clone()
    y = x.to(dtype)
    for _ in range(4):  # one step suffices (double rounding is within one step); stay safe
        bad = (y.double() < x) if up else (y.double() > x)
        if not bool(bad.any()):
            break
        y = torch.where(bad, _step(y, up), y)
    return y.float()


def _limbs(x: Tensor, dtype: torch.dtype, n: int) -> tuple[Tensor, Tensor]:
    """``x`` (float64) as ``n`` values of ``dtype`` summing to it up to the returned residual."""
    parts, r = [], x.clone()
    for _ in range(n):
        p = r.to(dtype)
        parts.append(p)
        r = r - p.double()
    return torch.stack(parts, 1), r.abs()


class _Screen:
    """Operands, thresholds and bands of one screening precision (``bf16``, ``fp32``, ``fp64``)."""

    def __init__(self, rk: _ExactRanker, name: str) -> None:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[name]
        self.name, self.dtype = name, dt
        self.cmp_dtype = torch.float64 if name == "fp64" else torch.float32
        n, d, dev = rk.n, rk.d, rk.a.device
        euclid = rk.metric == "euclidean"
        n_limbs = {"bf16": 3, "fp32": 2, "fp64": 1}[name]
        u_acc = _U64 if name == "fp64" else _U32
        # centre (bfloat16 only): a representable value near the typical threshold
        kappa = float(rk.sd.median().to(dt)) if name == "bf16" else 0.0
        extra = (2 * n_limbs if euclid else 0) + (1 if kappa else 0)
        k = -(-(d + extra) // 16) * 16
        self.A = torch.empty(n, k, dtype=dt, device=dev)
        self.Bt = torch.empty(rk.npad, k, dtype=dt, device=dev)
        self.A[:, :d] = rk.a
        self.Bt[:n, :d] = rk.b
        self.A[:, d:] = 0
        self.Bt[:n, d:] = 0
        self.Bt[n:] = 0

        if name == "bf16":  # rounding residuals (exact in float32) and rounded norms
            up = 1 + 2 * _gamma(d + 2, _U32)  # float32 norms rounded up to bounds
            ra, rb, nah, nbh = (torch.empty(n, device=dev) for _ in range(4))
            for r in range(0, n, _ROWS):
                sl = slice(r, r + _ROWS)
                ah, bh = self.A[sl, :d].float(), self.Bt[:n][sl, :d].float()
                nah[sl], nbh[sl] = _norms(ah), _norms(bh)
                ra[sl], rb[sl] = _norms(rk.a[sl] - ah), _norms(rk.b[sl] - bh)
            ra, rb, nah, nbh = (v.double() * up for v in (ra, rb, nah, nbh))
        else:
            u_in = _fp32_matmul_unit(dev) if name == "fp32" else 0.0
            ra, rb = u_in * rk.na, u_in * rk.nb
            nah, nbh = rk.na * (1 + u_in), rk.nb * (1 + u_in)

        res_e = res_c = torch.zeros(n, dtype=torch.float64, device=dev)
        col = d
        if euclid:
            le, res_e = _limbs(rk.e, dt, n_limbs)
            lc, res_c = _limbs(rk.c, dt, n_limbs)
            self.A[:, col : col + n_limbs] = -le
            self.Bt[:n, col : col + n_limbs] = 1
            col += n_limbs
            self.A[:, col : col + n_limbs] = 1
            self.Bt[:n, col : col + n_limbs] = -lc
            col += n_limbs
        if kappa:
            self.A[:, col] = -kappa
            self.Bt[:n, col] = 1

        # the bound, maximised over the other index: one band per row (i2r), one per column (r2i)
        g_k, g64 = _gamma(k, u_acc), rk.g64
        # underflow: flushed subnormal operands (|x_k| < 2^-126, times the other norm), flushed
        # or gradual-underflow products and sums; no float64 underflow for float32 data
        tiny = 2.0**-1000 if name == "fp64" else 2.0**-120
        eta = tiny * k * (1 + float(rk.na.max()) + float(rk.nb.max()))
        lim = 1.01  # sum of |limbs| <= 1.01 x (e or c)
        row = (
            ra * rk.nb.max()
            + nah * rb.max()
            + g_k * (nah * nbh.max() + lim * rk.e + lim * rk.c.max() + abs(kappa))
            + res_e
            + res_c.max()
            + 2 * g64 * (rk.e + rk.c.max())
            + rk.eps
        )
        col_b = (
            ra.max() * rk.nb
            + nah.max() * rb
            + g_k * (nah.max() * nbh + lim * rk.e.max() + lim * rk.c + abs(kappa))
            + res_e.max()
            + res_c
            + 2 * g64 * (rk.e.max() + rk.c)
            + rk.eps
        )
        row, col_b = row * _SAFETY + eta, col_b * _SAFETY + eta
        self.kappa, self.tol_r, self.tol_c = kappa, row, col_b
        t = rk.sd - kappa  # exact-score thresholds in output units
        self.lo_r = _round_out(t - row, dt, up=False)
        self.hi_r = _round_out(t + row, dt, up=True)
        pad = rk.npad - n
        self.lo_c = torch.nn.functional.pad(_round_out(t - col_b, dt, up=False), (0, pad))
        self.hi_c = torch.nn.functional.pad(_round_out(t + col_b, dt, up=True), (0, pad))


def _norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def _dots64(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot products of float64 rows."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def _sampled_dots(rows: Tensor, cols: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """``rows[r[p]] . cols[c[p]]`` for each p in the operands' dtype, as one sampled matmul.

    The pattern is a CSR matrix over ``rows``, so each row is read once and dotted with the
    (cached) ``cols`` it pairs with; the CPU kernel accumulates each dot in the operand dtype.
    """
    order = torch.argsort(r * cols.shape[0] + c)
    ro, co = r[order], c[order]
    crow = torch.zeros(rows.shape[0] + 1, dtype=torch.long, device=r.device)
    crow[1:] = torch.bincount(ro, minlength=rows.shape[0]).cumsum(0)
    vals = torch.zeros(len(co), dtype=rows.dtype, device=r.device)
    shape = (rows.shape[0], cols.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(crow, co, vals, shape, check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, rows, cols.T, beta=0.0).values()
    out = torch.empty_like(vals)
    out[order] = dots
    return out


def _copies(x: Tensor) -> Tensor | None:
    """Ids of groups of equal rows (same id => same vector), or None when no row repeats.

    Rows are hashed exactly (integer arithmetic on the bits of up to 64 columns) and the
    candidates compared in full, so collapsed or duplicated embeddings cost one pass.
    """
    n, d = x.shape
    cols = x.view(torch.int32)[:, :: max(1, d // 64)][:, :64].long()
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randint(1, 2**31, (cols.shape[1],), generator=g).to(x.device)
    _, inv, counts = torch.unique((cols * w).sum(1), return_inverse=True, return_counts=True)
    if bool((counts == 1).all()):
        return None
    idx = torch.arange(n, device=x.device)
    first = torch.full((len(counts),), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inv, idx, "amin")
    rep = first[inv]
    cand = (counts[inv] > 1).nonzero().flatten()
    same = torch.zeros(n, dtype=torch.bool, device=x.device)
    for p in range(0, len(cand), _PAIR_CHUNK):
        c = cand[p : p + _PAIR_CHUNK]
        same[c] = (x[c] == x[rep[c]]).all(1)
    gid = torch.where(same, rep, idx)
    return gid if bool((gid != idx).any()) else None


def _needed(surely: Tensor, ambiguous: Tensor, ks: Sequence[int]) -> Tensor:
    """Queries whose rank interval [surely + 1, surely + ambiguous + 1] can change a statistic.

    That is: it straddles a recall cut-off K (rank <= K undecided), or it meets the window
    [k-th smallest lower bound, k'-th smallest upper bound] that holds numpy's middle order
    statistics k = (n - 1) // 2 and k' = n // 2.
    """
    lo, hi = surely + 1, surely + ambiguous + 1
    open_ = hi > lo
    n = len(lo)
    w_lo = lo.sort().values[(n - 1) // 2]
    w_hi = hi.sort().values[n // 2]
    need = (lo <= w_hi) & (hi >= w_lo)
    for k in ks:
        need |= (lo <= k) & (hi > k)
    return need & open_


class _ExactRanker:
    """Exact i2r and r2i ranks of aligned float32 embeddings, screened block by block."""

    def __init__(self, a: Tensor, b: Tensor, metric: str, precision: str, chunk: int) -> None:
        self.a, self.b, self.metric = a, b, metric
        self.n, self.d = a.shape
        n, d, dev = self.n, self.d, a.device
        euclid = metric == "euclidean"
        self.g64 = _gamma(d + 8, _U64)
        # float64 (error <= g64 x magnitude): true-match dot products, squared norms
        self.gd, sq_a, sq_b = (torch.empty(n, dtype=torch.float64, device=dev) for _ in "abc")
        for r in range(0, n, _ROWS):
            sl = slice(r, r + _ROWS)
            a64, b64 = a[sl].double(), b[sl].double()  # float32 products are exact in float64
            self.gd[sl] = _dots64(a64, b64)
            sq_a[sl], sq_b[sl] = _dots64(a64, a64), _dots64(b64, b64)
        if not bool(torch.isfinite(sq_a + sq_b).all()):  # any inf or NaN coordinate shows here
            raise ValueError("retrieval: embeddings contain NaN or inf")
        # norms rounded up: they only enter error bounds
        self.na, self.nb = (x.sqrt() * (1 + 4 * self.g64) for x in (sq_a, sq_b))
        zero = torch.zeros_like(sq_a)
        self.e, self.c = (0.5 * sq_a, 0.5 * sq_b) if euclid else (zero, zero)
        self.sd = self.gd - self.e - self.c  # exact-score threshold of each pair
        # float64 error of sd (and of e, c, gd separately), doubled for the final subtraction
        self.eps = 4 * self.g64 * (self.na * self.nb + self.e + self.c)
        # re-check tables: c, s_ii + e_i and the i2r band per row; e, s_jj + c_j and the r2i band
        # per column. A dot of float32 rows errs by <= gamma_D |a||b| (float32 accumulation,
        # plus reduced-precision operands if allowed, plus underflow), float64: gamma_D(f64);
        # the tables and the subtractions add their own rounding (float32: 3 x 2^-24 x sizes).
        sdr, sdc = self.gd - self.c, self.gd - self.e
        u_in = _fp32_matmul_unit(dev)
        g32, eta32 = _gamma(d, _U32) + 3 * u_in, 2 * (d + 1) * 2.0**-126
        self.tol32 = self._tables(sdr, sdc, g32, eta32, f32=True)
        self.tol64 = self._tables(sdr, sdc, self.g64, 2 * (d + 1) * 2.0**-1022, f32=False)
        self.gid_a, self.gid_b = _copies(a), _copies(b)

        # column padding: a multiple of 8 bytes per mask row, in groups of <= 255 words
        words = max(1, -(-n // 8))
        self.groups = -(-words // 255)
        self.group_len = -(-words // self.groups)
        self.npad = 8 * self.groups * self.group_len
        self.words = self.npad // 8  # packed flag words per row
        self.levels = ["bf16", "fp32", "fp64"] if precision == "bf16_checked" else ["fp32", "fp64"]
        self.screens: dict[str, _Screen] = {}
        n_blocks = max(1, -(-n // max(1, chunk)))
        self.bounds = [round(i * n / n_blocks) for i in range(n_blocks + 1)]
        bmax = max(e - s for s, e in zip(self.bounds, self.bounds[1:]))
        self.x32 = torch.empty(bmax, self.npad, device=dev)
        self.masks = torch.zeros(4, bmax, self.npad, dtype=torch.bool, device=dev)
        self.i2r = torch.zeros(n, dtype=torch.long, device=dev)
        self.r2i = torch.zeros(n, dtype=torch.long, device=dev)
        # entries screened, flagged ambiguous, re-checked in float32 / float64 / exactly
        self.stats = dict(entries=n * (n - 1), ambiguous=0, f32=0, f64=0, exact=0, escalated=0)
        self.buf64: Tensor | None = None
        self.defer = False
        self.pending: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self.amb_r = torch.zeros(n, dtype=torch.long, device=dev)
        self.amb_c = torch.zeros(n, dtype=torch.long, device=dev)

    def _tables(
        self, sdr: Tensor, sdc: Tensor, gamma: float, eta: float, f32: bool
    ) -> tuple[Tensor, ...]:
        """(c, s_ii + e_i, i2r band, e, s_jj + c_j, r2i band) for :meth:`_decide`."""
        rel = (2.0**-20 if f32 else 0.0) + 4 * self.g64  # table and subtraction rounding
        na_max, nb_max = self.na.max(), self.nb.max()
        tol_r = (gamma + rel) * self.na * nb_max + rel * (self.c.max() + sdr.abs())
        tol_c = (gamma + rel) * na_max * self.nb + rel * (self.e.max() + sdc.abs())
        tol_r = (tol_r + self.eps + eta) * _SAFETY
        tol_c = (tol_c + self.eps + eta) * _SAFETY
        tabs = (self.c, sdr, tol_r, self.e, sdc, tol_c)
        return tuple(t.float() for t in tabs) if f32 else tabs

    def screen(self, name: str) -> _Screen:
        if name not in self.screens:
            self.screens[name] = _Screen(self, name)
        return self.screens[name]

    def run(self, ks: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Exact ranks (``ks=None``), or ranks exact enough for MedR and R@K at ``ks``.

        With ``ks`` the ambiguous entries are only kept while screening; afterwards every rank
        is known to lie in [surely closer + 1, surely closer + ambiguous + 1], and only the
        queries whose interval straddles a cut-off K or meets the median window are resolved.
        The others keep their lower bound, which leaves numpy's median and every R@K unchanged:
        their interval lies entirely on one side of each cut-off and of both middle order
        statistics, in the true and in the returned ranks alike.
        """
        self.defer = ks is not None
        first = 0  # a bag is homogeneous: once a block needed a finer screen, start there
        for s, e in zip(self.bounds, self.bounds[1:]):
            for lv in range(first, len(self.levels)):
                if self.block(s, e, self.levels[lv]):
                    break
                self.stats["escalated"] += 1
                first = lv + 1
        if self.defer and self.pending:
            need_r = _needed(self.i2r, self.amb_r, ks)
            need_c = _needed(self.r2i, self.amb_c, ks)
            pad = self.npad - self.n
            need_c = torch.nn.functional.pad(need_c, (0, pad)).view(torch.int64)  # as flag words
            for level, parts in self.pending.items():
                words, wr, wc = (torch.cat(t) for t in zip(*parts))
                wr = wr * need_r[words // self.words]  # keep the words of needed rows
                wc = wc & need_c[words % self.words]  # and the flags of needed columns
                keep = ((wr | wc) != 0).nonzero().squeeze(1)
                if len(keep):
                    gi, jj, fr, fc = self._expand(words[keep], wr[keep], wc[keep])
                    self.resolve(gi, jj, fr, fc, level, None)
        return self.i2r + 1, self.r2i + 1

    # -- one row block -------------------------------------------------------------------

    def block(self, s: int, e: int, level: str) -> bool:
        """Screen rows ``s:e``; False (nothing counted) when too many entries are ambiguous."""
        sc, bs, n = self.screen(level), e - s, self.n
        out = torch.mm(sc.A[s:e], sc.Bt.T)
        if sc.cmp_dtype == torch.float32:
            x = self.x32[:bs]
            x.copy_(out)
        else:
            x = out
        del out
        diag = x[:, s:e].diagonal()
        inside = (diag >= sc.lo_r[s:e]) & (diag <= sc.hi_r[s:e])
        inside &= (diag >= sc.lo_c[s:e]) & (diag <= sc.hi_c[s:e])
        if not bool(inside.all()):
            raise RuntimeError(
                f"retrieval: the {level} screening bound failed on the diagonal of rows {s}:{e}"
                " (matmul less accurate than assumed); please report with your torch build"
            )
        diag.fill_(float("-inf"))  # the true match is never counted
        if self.npad > n:
            x[:, n:].fill_(float("-inf"))
        m = self.masks[:, :bs]
        torch.gt(x, sc.hi_r[s:e, None], out=m[0])  # surely closer (i2r)
        torch.ge(x, sc.lo_r[s:e, None], out=m[1])  # possibly closer (i2r)
        torch.gt(x, sc.hi_c[None, :], out=m[2])  # surely closer (r2i)
        torch.ge(x, sc.lo_c[None, :], out=m[3])  # possibly closer (r2i)
        if self.gid_b is not None:  # a copy of the true recipe ties with it: never closer
            tie = self.gid_b[s:e, None] == self.gid_b[None, :]
            m[0, :, :n] &= ~tie
            m[1, :, :n] &= ~tie
        if self.gid_a is not None:  # a copy of the true image ties with it
            tie = self.gid_a[s:e, None] == self.gid_a[None, :]
            m[2, :, :n] &= ~tie
            m[3, :, :n] &= ~tie
        w = self.masks[:, :bs].view(torch.int64)  # 8 flags per word
        amb_r = w[1] ^ w[0]  # inside the i2r band
        amb_c = w[3] ^ w[2]  # inside the r2i band
        n_r, n_c = self._swar_rows(amb_r), self._swar_cols(amb_c)[:n]
        n_amb = int(n_r.sum()) + int(n_c.sum())
        if level != self.levels[-1] and n_amb > 2 * _ESCALATE * bs * n:
            return False
        self.i2r[s:e] += self._swar_rows(w[0])
        self.r2i += self._swar_cols(w[2])[:n]
        self.stats["ambiguous"] += n_amb
        if not n_amb:
            return True
        words = (amb_r | amb_c).view(-1).nonzero().squeeze(1)
        wr, wc = amb_r.view(-1)[words], amb_c.view(-1)[words]
        if self.defer:  # keep the flagged words; resolve what the statistics need at the end
            self.amb_r[s:e] += n_r
            self.amb_c += n_c
            self.pending.setdefault(level, []).append((words + s * self.words, wr, wc))
        else:
            gi, jj, fr, fc = self._expand(words + s * self.words, wr, wc)
            self.resolve(gi, jj, fr, fc, level, (s, bs))
        return True

    def _swar_rows(self, w: Tensor) -> Tensor:
        """Row sums of the packed flags: byte lanes of <= 255 words never carry."""
        bs = w.shape[0]
        lanes = w.view(bs, self.groups, self.group_len).sum(-1)
        return lanes.view(torch.uint8).view(bs, -1).sum(-1)

    def _swar_cols(self, w: Tensor) -> Tensor:
        acc = torch.zeros(w.shape[1] * 8, dtype=torch.long, device=w.device)
        for r in range(0, w.shape[0], 255):
            acc += w[r : r + 255].sum(0).view(torch.uint8)
        return acc

    def _expand(self, words: Tensor, wr: Tensor, wc: Tensor) -> tuple[Tensor, ...]:
        """Flagged words -> (row, column, ambiguous for i2r, ambiguous for r2i) per entry.

        ``words``: flat word indices in the bag's (n, npad / 8) packed flags; ``wr``, ``wc``
        their i2r and r2i flag words (byte k of a word is column 8 x word + k).
        """
        br, bc = wr.view(torch.uint8), wc.view(torch.uint8)
        sel = (br | bc).nonzero().squeeze(1)
        word = words[sel >> 3]
        rows = word // self.words
        cols = (word - rows * self.words) * 8 + (sel & 7)
        return rows, cols, br[sel].bool(), bc[sel].bool()

    # -- re-checks -----------------------------------------------------------------------

    def resolve(
        self,
        gi: Tensor,
        jj: Tensor,
        fr: Tensor,
        fc: Tensor,
        level: str,
        rows: tuple[int, int] | None,
    ) -> None:
        """Decide the flagged entries (gi, jj) and add the closer ones to the counts.

        ``rows``: (first, count) of the row block they all come from (its rows stay cached).
        """
        if level == "bf16":  # float32 dot products, each recipe row read once
            if rows is None:
                g = _sampled_dots(self.b, self.a, jj, gi)
            else:
                g = _sampled_dots(self.b, self.a[rows[0] : rows[0] + rows[1]], jj, gi - rows[0])
            self.stats["f32"] += len(g)
            fr, fc = self._decide(gi, jj, fr, fc, g, self.tol32)
            keep = fr | fc
            gi, jj, fr, fc = gi[keep], jj[keep], fr[keep], fc[keep]
        if level != "fp64" and len(gi):  # float64 dot products of the few left
            for p in range(0, len(gi), _PAIR_CHUNK):
                sl = slice(p, p + _PAIR_CHUNK)
                fr[sl], fc[sl] = self._decide64(gi[sl], jj[sl], fr[sl], fc[sl])
            keep = fr | fc
            gi, jj, fr, fc = gi[keep], jj[keep], fr[keep], fc[keep]
        if len(gi):
            self.stats["exact"] += len(gi)
            self._exact(gi, jj, fr, fc)

    def _decide64(self, gi: Tensor, jj: Tensor, fr: Tensor, fc: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_decide` with float64 dot products, the rows converted into reused buffers."""
        ui, inv_i = torch.unique(gi, return_inverse=True)
        uj, inv_j = torch.unique(jj, return_inverse=True)
        if self.buf64 is None:
            self.buf64 = torch.empty(2, _PAIR_CHUNK, self.d, dtype=torch.float64, device=gi.device)
        ra, rb = self.buf64[0, : len(ui)], self.buf64[1, : len(uj)]
        ra.copy_(self.a[ui])
        rb.copy_(self.b[uj])
        g = _sampled_dots(rb, ra, inv_j, inv_i)
        self.stats["f64"] += len(g)
        return self._decide(gi, jj, fr, fc, g, self.tol64)

    def _decide(
        self,
        gi: Tensor,
        jj: Tensor,
        fr: Tensor,
        fc: Tensor,
        g: Tensor,
        tabs: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor]:
        """Count the flagged entries whose dot ``g`` clears the re-check band.

        ``g`` has the dtype of the tables ``tabs`` (float32 or float64), whose tolerances cover
        the dot product's error bound and the rounding of everything below. Returns the flags
        (i2r, r2i) of the entries still undecided.
        """
        c, sdr, tol_r, e, sdc, tol_c = tabs
        # i2r: s_ij - s_ii = g_ij - c_j - (g_ii - c_i)
        v = g - c[jj] - sdr[gi]
        done_r = v.abs() > tol_r[gi]
        self.i2r += torch.bincount(gi[fr & done_r & (v > 0)], minlength=self.n)
        # r2i: s_ij - s_jj = g_ij - e_i - (g_jj - e_j)
        v = g - e[gi] - sdc[jj]
        done_c = v.abs() > tol_c[jj]
        self.r2i += torch.bincount(jj[fc & done_c & (v > 0)], minlength=self.n)
        return fr & ~done_r, fc & ~done_c

    def _add(self, gi: Tensor, jj: Tensor, closer_r: Tensor, closer_c: Tensor) -> None:
        self.i2r += torch.bincount(gi[closer_r], minlength=self.n)
        self.r2i += torch.bincount(jj[closer_c], minlength=self.n)

    def _exact(self, gi: Tensor, jj: Tensor, fr: Tensor, fc: Tensor) -> None:
        """Exact signs: equal vectors tie; else fsum of exact float64 products (fp32 x fp32)."""
        euclid = self.metric == "euclidean"
        closer_r = torch.zeros_like(fr)
        closer_c = torch.zeros_like(fc)
        for p in range(0, len(gi), _PAIR_CHUNK):
            sl = slice(p, p + _PAIR_CHUNK)
            i, j = gi[sl], jj[sl]
            need_r = fr[sl] & ~(self.b[j] == self.b[i]).all(1)  # equal recipes: s_ij == s_ii
            need_c = fc[sl] & ~(self.a[i] == self.a[j]).all(1)  # equal images: s_ij == s_jj
            for q in need_r.nonzero().flatten().tolist():
                closer_r[p + q] = self._fsum_sign(int(i[q]), int(j[q]), True, euclid) > 0
            for q in need_c.nonzero().flatten().tolist():
                closer_c[p + q] = self._fsum_sign(int(i[q]), int(j[q]), False, euclid) > 0
        self._add(gi, jj, closer_r, closer_c)

    def _fsum_sign(self, i: int, j: int, i2r: bool, euclid: bool) -> float:
        """Correctly rounded s_ij - s_ii (i2r) or s_ij - s_jj (r2i); its sign is exact."""
        ai = self.a[i].double().cpu().numpy()
        bj = self.b[j].double().cpu().numpy()
        if i2r:  # (a_i.b_j - c_j) - (a_i.b_i - c_i)
            bi = self.b[i].double().cpu().numpy()
            terms = [ai * bj, -(ai * bi)]
            if euclid:
                terms += [-(bj * bj) / 2, (bi * bi) / 2]
        else:  # (a_i.b_j - e_i) - (a_j.b_j - e_j)
            aj = self.a[j].double().cpu().numpy()
            terms = [ai * bj, -(aj * bj)]
            if euclid:
                terms += [-(ai * ai) / 2, (aj * aj) / 2]
        return math.fsum(np.concatenate(terms).tolist())


def pair_ranks(
    img: Tensor,
    rec: Tensor,
    metric: str = "euclidean",
    chunk: int = 1024,
    precision: str = "auto",
    stats: dict[str, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Ranks of the true matches for aligned ``img[i] <-> rec[i]`` (1 = best), exact.

    rank = 1 + the number of gallery items strictly closer than the true match, decided in
    exact arithmetic on the float32 embeddings (see the comment above :class:`_Screen`), so the
    result does not depend on blocking, threads or the screening precision.

    Args:
        img: ``(N, D)`` image embeddings.
        rec: ``(N, D)`` recipe embeddings of the same items, same order.
        metric: ``euclidean`` (SEJE), ``cosine`` or ``dot``.
        chunk: Query rows screened at a time (memory ~ ``chunk x N`` floats).
        precision: Screening matmul: ``fp32``; ``bf16_checked`` (CPU: bfloat16 matmul,
            twice as fast, certified by its error bound, ambiguous entries re-checked);
            ``auto`` (``bf16_checked`` on CPUs with native bfloat16 and bags of 256+, else
            ``fp32``). All give identical ranks.
        stats: Optional dict; adds the counts of off-diagonal ``entries``, of comparisons
            (two per entry: i2r and r2i) the screen left ``ambiguous``, of entries re-checked
            in float32 (``f32``), float64 (``f64``) and ``exact``-ly, and of blocks re-screened
            more precisely (``escalated``).

    Returns:
        ``(ranks_i2r, ranks_r2i)``, int64 ``(N,)`` each.
    """
    return _ranks(img, rec, metric, chunk, precision, stats, None)


def _ranks(
    img: Tensor,
    rec: Tensor,
    metric: str,
    chunk: int,
    precision: str,
    stats: dict[str, int] | None,
    ks: Sequence[int] | None,
) -> tuple[Tensor, Tensor]:
    """:func:`pair_ranks`, or with ``ks`` ranks that give the same MedR and R@K (cheaper)."""
    if img.shape != rec.shape or img.dim() != 2:
        raise ValueError(f"need two (N, D) tensors of equal shape, got {img.shape}, {rec.shape}")
    a, b = (t.contiguous() for t in _as_metric_inputs(img, rec, metric))
    if a.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=a.device)
        return empty, empty.clone()
    prec = _resolve_precision(precision, a.device, a.shape[0])
    ranker = _ExactRanker(a, b, metric, prec, chunk)
    ranks = ranker.run(ks)
    if stats is not None:
        for key, v in ranker.stats.items():
            stats[key] = stats.get(key, 0) + v
    return ranks


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
    precision: str = "auto",
    stats: dict[str, int] | None = None,
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
        precision: Screening matmul of :func:`pair_ranks` (the ranks do not depend on it).
        stats: Optional dict that accumulates :func:`pair_ranks` re-check counters.

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
            # ranks exact where MedR or R@K depend on them (see _ExactRanker.run)
            i2r, r2i = _ranks(img[sel], rec[sel], metric, 1024, precision, stats, ks)
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
        precision: Screening matmul of :func:`pair_ranks` (the ranks do not depend on it).
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
        precision: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.bag_sizes, self.n_bags, self.seed = tuple(bag_sizes), n_bags, seed
        self.ks, self.metric, self.max_id_len = tuple(ks), metric, max_id_len
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
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
            img,
            rec,
            self.bag_sizes,
            self.n_bags,
            self.seed,
            self.ks,
            self.metric,
            precision=self.precision,
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
