"""Recipe1M retrieval metrics: ranks, MedR, R@K, bags, the torchmetrics wrapper under DDP."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jointgen.eval.retrieval import (
    RecipeRetrieval,
    _bf16_matmul_accumulates_in_fp32,
    _ExactRanker,
    _needed,
    bag_indices,
    decode_ids,
    distance_matrix,
    encode_ids,
    format_table,
    pair_ranks,
    rank_summary,
    retrieval_metrics,
    size_label,
)


def _pairs(n: int, d: int = 16, noise: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    img = torch.nn.functional.normalize(z + noise * torch.randn(n, d, generator=g), dim=1)
    rec = torch.nn.functional.normalize(z + noise * torch.randn(n, d, generator=g), dim=1)
    return img, rec


def _brute_ranks(img: np.ndarray, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query at a time, float64, as the reference's loop (strictly closer items count)."""
    n = len(img)
    i2r, r2i = np.zeros(n, int), np.zeros(n, int)
    for q in range(n):
        d = np.linalg.norm(rec - img[q], axis=1)
        i2r[q] = 1 + int((d < d[q]).sum())
        d = np.linalg.norm(img - rec[q], axis=1)
        r2i[q] = 1 + int((d < d[q]).sum())
    return i2r, r2i


class TestRanks:
    @pytest.mark.parametrize("chunk", [7, 2048])
    def test_against_brute_force(self, chunk):
        img, rec = _pairs(60)
        i2r, r2i = pair_ranks(img, rec, chunk=chunk)
        ref_i2r, ref_r2i = _brute_ranks(img.double().numpy(), rec.double().numpy())
        np.testing.assert_array_equal(i2r.numpy(), ref_i2r)
        np.testing.assert_array_equal(r2i.numpy(), ref_r2i)
        assert not np.array_equal(ref_i2r, ref_r2i)  # the two directions really differ

    def test_ties_favour_the_match(self):
        # integer coordinates: every distance is exact, so equal distances are real ties
        img = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
        rec = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
        rec_dup = torch.cat([rec[:1], rec[:1]])  # gallery item 1 duplicates item 0
        i2r, r2i = pair_ranks(img[:2], rec_dup)
        assert i2r.tolist() == [1, 1]  # image 0: item 1 ties with the match -> rank 1
        assert r2i.tolist() == [1, 2]  # recipe 1 is closer to image 0 than to image 1
        i2r, _ = pair_ranks(img, rec)
        assert i2r.tolist() == [1, 1, 1]

    @pytest.mark.parametrize("metric", ["cosine", "dot"])
    def test_cosine_and_dot_rank_like_euclidean_on_unit_vectors(self, metric):
        img, rec = _pairs(50)
        e = pair_ranks(img, rec, "euclidean")
        m = pair_ranks(img, rec, metric)
        assert torch.equal(e[0], m[0]) and torch.equal(e[1], m[1])


PRECISIONS = ["fp32", "bf16_checked"]


def _needs_bf16(precision: str) -> None:
    if precision == "bf16_checked" and not _bf16_matmul_accumulates_in_fp32():
        pytest.skip("this CPU's bfloat16 matmul does not accumulate in float32")


def _exact_ranks(img: torch.Tensor, rec: torch.Tensor, metric: str = "euclidean"):
    """Reference: every pair computed alone in float64 (exact for equal vectors), as the loop."""
    a, b = img.float(), rec.float()
    if metric == "cosine":
        a, b = (torch.nn.functional.normalize(x, dim=1) for x in (a, b))
    a, b = a.double(), b.double()
    if metric == "euclidean":
        d = ((a[:, None] - b[None]) ** 2).sum(-1)
    else:
        d = -(a[:, None] * b[None]).sum(-1)
    dg = d.diagonal()
    return (d < dg[:, None]).sum(1) + 1, (d < dg[None, :]).sum(0) + 1


def _full_matrix_ranks(img: torch.Tensor, rec: torch.Tensor, metric: str = "euclidean"):
    """The previous method: one float32 N x N matrix compared with its own diagonal."""
    d = distance_matrix(img, rec, metric)
    dg = d.diagonal()
    return (d < dg[:, None]).sum(1) + 1, (d < dg[None, :]).sum(0) + 1


def _regime(name: str, n: int = 301, d: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "trained":  # well separated: most ranks 1
        return _pairs(n, d, noise=0.3, seed=seed)
    if name == "random":  # nearly random: ranks spread over the bag, many entries near a tie
        return _pairs(n, d, noise=4.0, seed=seed)
    if name == "unnormalised":  # norms over four decades, different per modality
        img, rec = _pairs(n, d, noise=1.0, seed=seed)
        return img * torch.logspace(-2, 2, n)[torch.randperm(n, generator=g), None], rec * (
            torch.logspace(-2, 2, n)[torch.randperm(n, generator=g), None]
        )
    if name == "duplicates":  # repeated pairs, a repeated recipe and repeated images
        img, rec = _pairs(n - 60, d, noise=1.0, seed=seed)
        img, rec = torch.cat([img, img[:50]]), torch.cat([rec, rec[:50]])
        img = torch.cat([img, img[60:70]])  # 10 images also serve other items
        rec = torch.cat([rec, rec[100:101].expand(10, d)])
        return img, rec
    if name == "integer":  # small integer coordinates: exact ties everywhere
        x = torch.randint(-2, 3, (2, n // 2, 6), generator=g).float()
        return x[0], x[1]
    raise ValueError(name)


REGIMES = ["trained", "random", "unnormalised", "duplicates", "integer"]


class TestExactRanks:
    @pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
    @pytest.mark.parametrize("regime", REGIMES)
    def test_every_precision_and_block_size_gives_the_exact_ranks(self, regime, metric):
        img, rec = _regime(regime)
        ref = _exact_ranks(img, rec, metric)
        for precision in PRECISIONS:
            _needs_bf16(precision)
            for chunk in (37, 512):  # 37 does not divide 301: a short last block
                got = pair_ranks(img, rec, metric, chunk=chunk, precision=precision)
                assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        if regime in ("trained", "random", "unnormalised"):  # no ties: the old matrix agrees
            old = _full_matrix_ranks(img, rec, metric)
            assert torch.equal(old[0], ref[0]) and torch.equal(old[1], ref[1])

    @pytest.mark.parametrize("precision", PRECISIONS)
    def test_tiny_bags(self, precision):
        _needs_bf16(precision)
        for n in (1, 2, 3, 5):
            img, rec = _pairs(n, seed=n)
            got = pair_ranks(img, rec, precision=precision, chunk=2)
            ref = _exact_ranks(img, rec)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])

    @pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
    @pytest.mark.parametrize("precision", PRECISIONS)
    def test_copies_of_the_true_match_tie_with_it(self, precision, metric):
        # item 0 appears four times: each copy's recipe (image) is exactly as close as the true
        # match, so it must not count; only the true match itself is excluded by position
        _needs_bf16(precision)
        img, rec = _pairs(40, noise=0.05, seed=5)
        img, rec = torch.cat([img, img[:1].repeat(3, 1)]), torch.cat([rec, rec[:1].repeat(3, 1)])
        i2r, r2i = pair_ranks(img, rec, metric, precision=precision, chunk=16)
        assert i2r.tolist() == [1] * 43 and r2i.tolist() == [1] * 43
        # collapsed embeddings: everything ties, every rank is 1
        flat = torch.ones(30, 8)
        assert pair_ranks(flat, flat, metric, precision=precision)[0].tolist() == [1] * 30

    @pytest.mark.parametrize("precision", PRECISIONS)
    def test_near_ties_below_float32_resolution(self, precision):
        # recipe 100 + j is recipe j moved by one float32 step towards image j: closer to it by
        # ~1e-9 of the distance, far below what a float32 matrix resolves; exact ranks see it
        _needs_bf16(precision)
        img, rec = _pairs(200, 64, noise=0.05, seed=7)
        k = (img[:100] - rec[:100]).abs().argmax(1)
        moved = rec[:100].clone()
        rows = torch.arange(100)
        moved[rows, k] = torch.nextafter(moved[rows, k], img[rows, k])
        rec = torch.cat([rec[:100], moved])
        i2r, r2i = pair_ranks(img, rec, precision=precision, chunk=64)
        ref = _brute_ranks(img.double().numpy(), rec.double().numpy())
        np.testing.assert_array_equal(i2r.numpy(), ref[0])
        np.testing.assert_array_equal(r2i.numpy(), ref[1])
        assert (i2r[:100] == 2).all()  # the moved copy, and nothing else, is strictly closer

    def test_reduced_float32_matmul_precision_is_covered(self):
        # "medium" lets float32 matmuls round their operands to bfloat16: the band widens
        img, rec = _regime("random")
        ref = _exact_ranks(img, rec)
        before = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("medium")
            got = pair_ranks(img, rec, precision="fp32")
        finally:
            torch.set_float32_matmul_precision(before)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])

    @pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
    def test_swapping_the_modalities_swaps_the_directions(self, metric):
        img, rec = _regime("random", n=200, seed=3)
        i2r, r2i = pair_ranks(img, rec, metric)
        r2i_t, i2r_t = pair_ranks(rec, img, metric)
        assert torch.equal(i2r, i2r_t) and torch.equal(r2i, r2i_t)
        assert not torch.equal(i2r, r2i)

    def test_metrics_identical_across_precisions_and_stats(self):
        _needs_bf16("bf16_checked")
        img, rec = _pairs(700, 64, noise=3.0, seed=11)
        st: dict[str, int] = {}
        res = {
            p: retrieval_metrics(img, rec, (300, 600), 2, precision=p, stats=st)
            for p in PRECISIONS
        }
        assert res["fp32"] == res["bf16_checked"]
        assert st["entries"] == 2 * 2 * (300 * 299 + 600 * 599)
        assert 0 < st["f32"] <= st["ambiguous"] < st["entries"]

    @pytest.mark.parametrize("precision", PRECISIONS)
    def test_metrics_resolve_only_what_medr_and_recall_need(self, precision):
        # random regime: most ambiguous entries sit in ranks far from the median and from K
        _needs_bf16(precision)
        img, rec = _regime("random", n=900, d=64, seed=4)
        for size, ks in ((900, (1, 5, 10)), (601, (2, 30)), (300, (1,))):
            st: dict[str, int] = {}
            res = retrieval_metrics(img, rec, (size,), 3, ks=ks, precision=precision, stats=st)
            per = {"i2r": [], "r2i": []}
            for idx in bag_indices(900, size, 3, 1234):
                i2r, r2i = pair_ranks(img[idx], rec[idx], precision=precision)
                per["i2r"].append(i2r)
                per["r2i"].append(r2i)
            for d, ranks in per.items():
                for stat, v in rank_summary(torch.stack(ranks), ks).items():
                    assert res[f"{stat}_{d}_{size_label(size)}"] == v
            checked = st["f32"] if precision == "bf16_checked" else st["f64"]
            assert checked < st["ambiguous"] / 2  # the point: most are never re-checked

    def test_needed_keeps_median_and_recall(self):
        # random rank intervals; the true ranks anywhere inside; lower bounds where not needed
        g = torch.Generator().manual_seed(0)
        differs = 0
        for trial in range(200):
            n = int(torch.randint(1, 40, (1,), generator=g))
            surely = torch.randint(0, 30, (n,), generator=g)
            amb = torch.randint(0, 6, (n,), generator=g) * (torch.rand(n, generator=g) < 0.7)
            true = surely + 1 + (torch.rand(n, generator=g) * (amb + 1)).long().clamp(max=amb)
            need = _needed(surely, amb, (1, 5, 10))
            proxy = torch.where(need, true, surely + 1)
            assert rank_summary(proxy) == rank_summary(true), trial
            differs += bool((proxy != true).any())
        assert differs > 50  # the proxy really leaves ranks unresolved

    @pytest.mark.parametrize("kind", ["random", "aligned"])
    def test_bf16_screen_error_is_within_its_bound(self, kind):
        """The bound on the bfloat16 screen holds entry by entry, with room on random data.

        ``aligned``: every component sits just below a bfloat16 rounding midpoint and image and
        recipe share their exponents, so all rounding errors add up and the residuals are
        parallel to the other vector: the Cauchy-Schwarz worst case.
        """
        _needs_bf16("bf16_checked")
        n, d = 96, 1024
        if kind == "random":
            img, rec = _pairs(n, d, noise=2.0, seed=2)
        else:
            g = torch.Generator().manual_seed(2)
            expo = torch.randint(-3, 1, (4, d), generator=g)[torch.arange(n) % 4]
            img = (1 + 0.99 * 2.0**-8) * 2.0 ** expo.float()
            rec = (1 + 0.99 * 2.0**-8) * 2.0 ** expo.roll(1, 0).float()
        rk = _ExactRanker(img, rec, "euclidean", "bf16_checked", 512)
        sc = rk.screen("bf16")
        out = torch.mm(sc.A, sc.Bt.T)[:, :n].double()  # bfloat16 output, rounded once
        a, b = img.double(), rec.double()
        exact = a @ b.T - 0.5 * (a * a).sum(1)[:, None] - 0.5 * (b * b).sum(1)[None] - sc.kappa
        bound = torch.minimum(sc.tol_r[:, None], sc.tol_c[None, :])
        err = (out - exact).abs() - 2.0**-8 * out.abs()  # less the output rounding
        ratio = float((err / bound).max())
        assert ratio < (0.5 if kind == "random" else 1.0), ratio


class TestSummary:
    def test_medr_uses_numpy_median_for_even_n(self):
        ranks = torch.tensor([1, 2, 7, 9])  # numpy: 4.5, torch.median: 2
        assert rank_summary(ranks)["medr"] == 4.5
        assert torch.median(ranks.float()).item() == 2.0

    def test_recall_in_percent_and_bag_mean(self):
        ranks = torch.tensor([[1, 3, 6, 20], [1, 1, 11, 4]])
        s = rank_summary(ranks)
        assert s["r1"] == pytest.approx((25 + 50) / 2)
        assert s["r5"] == pytest.approx((50 + 75) / 2)
        assert s["r10"] == pytest.approx((75 + 75) / 2)
        want = (np.median([1, 3, 6, 20]) + np.median([1, 1, 11, 4])) / 2
        assert s["medr"] == pytest.approx(want)


class TestBags:
    def test_seeded_distinct_and_without_replacement(self):
        a = bag_indices(100, 30, 5, seed=1234)
        b = bag_indices(100, 30, 5, seed=1234)
        assert a.shape == (5, 30) and np.array_equal(a, b)
        assert all(len(set(row)) == 30 for row in a)
        assert not np.array_equal(a[0], a[1])
        assert not np.array_equal(a, bag_indices(100, 30, 5, seed=1))

    def test_metrics_match_per_bag_brute_force(self):
        img, rec = _pairs(120, noise=0.8, seed=3)
        res = retrieval_metrics(img, rec, bag_sizes=(40, 100), n_bags=(4, 3), seed=1234)
        for size, nb in ((40, 4), (100, 3)):
            per_bag = {"i2r": [], "r2i": []}
            for idx in bag_indices(120, size, nb, 1234):
                i2r, r2i = _brute_ranks(img[idx].double().numpy(), rec[idx].double().numpy())
                per_bag["i2r"].append(i2r)
                per_bag["r2i"].append(r2i)
            for d, ranks in per_bag.items():
                r = np.stack(ranks)
                assert res[f"medr_{d}_{size}"] == pytest.approx(np.median(r, 1).mean())
                for k in (1, 5, 10):
                    want = (r <= k).mean(1).mean() * 100
                    assert res[f"r{k}_{d}_{size}"] == pytest.approx(want)
            assert res[f"bags_{size}"] == nb and res[f"n_{size}"] == size

    def test_bag_size_capped_at_pool(self, caplog):
        img, rec = _pairs(30)
        res = retrieval_metrics(img, rec, bag_sizes=(1000,), n_bags=2)
        assert res["n_1k"] == 30
        assert "capped" in caplog.text

    def test_table_lists_every_row(self):
        img, rec = _pairs(30)
        res = retrieval_metrics(img, rec, bag_sizes=(10, 20), n_bags=2)
        table = format_table(res)
        assert len(table.strip().splitlines()) == 2 + 4
        assert "MedR" in table and "R@10" in table


class TestMetric:
    def test_ids_sorted_and_deduplicated(self):
        img, rec = _pairs(40)
        ids = [f"{i:04x}" for i in range(40)]
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
        m = RecipeRetrieval(bag_sizes=(20,), n_bags=3)
        for s in range(0, 40, 16):  # shuffled batches plus a repeated (padding-like) item
            sel = perm[s : s + 16]
            m.update(img[sel], rec[sel], [ids[i] for i in sel])
        m.update(img[:1], rec[:1], ids[:1])
        got = {k: v.item() for k, v in m.compute().items()}
        want = retrieval_metrics(img, rec, bag_sizes=(20,), n_bags=3)
        assert got == pytest.approx(want)

    def test_id_codes_round_trip(self):
        ids = ["000018c8a5", "z", "recipe_42"]
        assert decode_ids(encode_ids(ids, 12)) == ids
        with pytest.raises(ValueError, match="max_id_len"):
            encode_ids(["x" * 13], 12)


def _ddp_worker(rank: int, port: int, img, rec, ids, out) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = RecipeRetrieval(bag_sizes=(16,), n_bags=3)
        sel = list(range(rank, len(ids), 2))  # interleaved shards of unequal size
        m.update(img[sel], rec[sel], [ids[i] for i in sel])
        res = m.compute()
        out[rank] = {k: v.item() for k, v in res.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s idle, ~40 s on a busy 2-core machine
def test_metric_under_two_process_gloo_ddp():
    img, rec = _pairs(33)
    ids = [f"id{i:03d}" for i in range(33)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, img, rec, ids, out), nprocs=2, join=True)
    want = retrieval_metrics(img, rec, bag_sizes=(16,), n_bags=3)
    assert out[0] == pytest.approx(want) and out[1] == pytest.approx(want)
