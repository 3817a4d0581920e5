"""SEJE network and losses (torch only): triplet maths, mining, GP, encoders, building."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from jointgen.models.seje import (
    SEJE,
    build_backbone,
    category_loss,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    hardest_negatives,
    pairwise_distances,
    triplet_loss,
)
from jointgen.models.seje.image import class_name_tokens
from jointgen.models.seje.net import private_rng

TINY = dict(
    image_encoder="small_cnn",
    cnn_width=4,
    embed_dim=16,
    word_dim=8,
    sentence_hidden=8,
    instr_hidden=16,
    disc_hidden=(8, 8),
)


def fake_batch(b: int = 4, vocab: int = 30, v_kt: int = 12, seed: int = 0) -> dict:
    """A batch following the Recipe1M data contract (random values)."""
    g = torch.Generator().manual_seed(seed)
    n_s, n_w = 3, 5
    num_instr = torch.randint(1, n_s + 1, (b,), generator=g)
    lengths = torch.randint(1, n_w + 1, (b, n_s), generator=g)
    lengths[torch.arange(n_s)[None, :] >= num_instr[:, None]] = 0
    words = torch.randint(2, vocab, (b, n_s, n_w), generator=g)
    words[torch.arange(n_w)[None, None, :] >= lengths[..., None]] = 0
    return {
        "image": torch.randn(b, 3, 16, 16, generator=g),
        "instructions": words,
        "num_instructions": num_instr,
        "instruction_lengths": lengths,
        "ingredients": torch.randint(2, vocab, (b, 4), generator=g),
        "num_ingredients": torch.full((b,), 4),
        "title": torch.randint(2, vocab, (b, 3), generator=g),
        "title_length": torch.full((b,), 3),
        "keyterms": torch.rand(b, v_kt, generator=g),
        "category": torch.randint(0, 3, (b,), generator=g),
        "id": [f"r{i}" for i in range(b)],
    }


# --- losses --------------------------------------------------------------------------------


class TestTriplet:
    def test_hand_computed_value(self):
        # 2-d unit vectors: v0=(1,0), v1=(0,1); r0=(0.6,0.8), r1=(0.8,-0.6)
        v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        r = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
        d00, d01 = math.dist((1, 0), (0.6, 0.8)), math.dist((1, 0), (0.8, -0.6))
        d10, d11 = math.dist((0, 1), (0.6, 0.8)), math.dist((0, 1), (0.8, -0.6))
        # anchors: image 0 (pos d00, neg d01), image 1 (d11, d10), recipe 0 (d00, d10),
        # recipe 1 (d11, d01); L = mean log(1 + exp(16 (pos - neg)))
        gaps = [d00 - d01, d11 - d10, d00 - d10, d11 - d01]
        want = sum(math.log1p(math.exp(16 * x)) for x in gaps) / 4
        loss, _ = triplet_loss(v, r, gamma=16.0, margin=0.0)
        assert loss.item() == pytest.approx(want, rel=1e-5)
        hinge, _ = triplet_loss(v, r, margin=0.2, kind="hinge")
        assert hinge.item() == pytest.approx(sum(max(0, 0.2 + x) for x in gaps) / 4, rel=1e-5)

    def test_distances_match_cdist(self):
        v, r = torch.randn(5, 7), torch.randn(5, 7)
        assert torch.allclose(pairwise_distances(v, r), torch.cdist(v, r), atol=1e-5)

    def test_batch_hard_picks_row_and_column_minima(self):
        d = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8], [0.7, 0.4, 0.6]])
        neg_img, neg_rec, fb = hardest_negatives(d)
        assert neg_img.tolist() == pytest.approx([0.5, 0.3, 0.4])
        assert neg_rec.tolist() == pytest.approx([0.3, 0.4, 0.5])
        assert not fb.any()

    def test_instance_class_masks_same_category(self):
        d = torch.tensor([[0.1, 0.2, 0.9, 0.8], [0.3, 0.1, 0.7, 0.6]] + [[0.5] * 4] * 2)
        labels = torch.tensor([1, 1, 2, 2])
        neg_img, neg_rec, fb = hardest_negatives(d, labels, "instance_class")
        # image 0: item 1 shares class 1 -> skipped; hardest different-class is 0.8 (item 3)
        assert neg_img[0].item() == pytest.approx(0.8)
        assert neg_img[1].item() == pytest.approx(0.6)
        # recipe 1 (class 1): images 2, 3 are candidates -> 0.5 (not image 0's 0.2)
        assert neg_rec[1].item() == pytest.approx(0.5)
        assert not fb.any()

    def test_instance_class_falls_back_and_ignores_unknown(self):
        d = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.1, 0.6], [0.7, 0.8, 0.1]])
        same = torch.tensor([5, 5, 5])  # nobody has a different class -> instance negatives
        neg_img, _, fb = hardest_negatives(d, same, "instance_class")
        assert neg_img.tolist() == pytest.approx([0.2, 0.4, 0.7]) and fb.all()
        unknown = torch.tensor([0, 0, 0])  # class 0 = unknown: never "the same category"
        neg_img, _, fb = hardest_negatives(d, unknown, "instance_class", unknown_class=0)
        assert neg_img.tolist() == pytest.approx([0.2, 0.4, 0.7]) and not fb.any()

    def test_soft_margin_is_finite_for_large_gaps(self):
        v = nn.functional.normalize(torch.randn(6, 4), dim=1)
        loss, _ = triplet_loss(v, -v, gamma=1e4)
        assert torch.isfinite(loss)


class TestCategoryAndAdversarial:
    def test_category_loss_shared_labels_and_ignore(self):
        lv, lr = torch.randn(4, 3), torch.randn(4, 3)
        y = torch.tensor([0, 1, 2, 1])
        ce_v, ce_r = category_loss(lv, lr, y)
        assert ce_v.item() == pytest.approx(nn.functional.cross_entropy(lv, y).item())
        ce_v, _ = category_loss(lv, lr, y, ignore_index=0)
        assert ce_v.item() == pytest.approx(nn.functional.cross_entropy(lv[1:], y[1:]).item())
        ce_v, _ = category_loss(lv, lr, torch.zeros(4, dtype=torch.long), ignore_index=0)
        assert ce_v.item() == 0.0

    def test_category_loss_count_makes_the_mean_of_halves_the_global_mean(self):
        # DDP: each rank divides by (labelled items of the global batch) / world, so the mean
        # of the ranks' losses (and gradients) is the global batch's, however the labelled
        # items fall
        lv, lr = torch.randn(8, 3), torch.randn(8, 3)
        y = torch.tensor([0, 1, 2, 1, 0, 0, 0, 2])  # 3 labelled in the first half, 1 after
        full, _ = category_loss(lv, lr, y, ignore_index=0)
        count = (y != 0).sum() / 2
        halves = [category_loss(lv[h], lr[h], y[h], 0, count)[0] for h in (slice(4), slice(4, 8))]
        assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item())

    def test_gradient_penalty_closed_form_on_linear_critic(self):
        critic = nn.Linear(5, 1)
        with torch.no_grad():
            critic.weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0, 0.0]]))  # ||w|| = 5
        gp = gradient_penalty(
            lambda x: critic(x).squeeze(-1), torch.randn(7, 5), torch.randn(7, 5)
        )
        assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)

    @pytest.mark.parametrize("kind", ["bce", "wgan_gp"])
    def test_losses_finite_and_generator_reaches_recipes_only(self, kind):
        from jointgen.models.seje import Discriminator

        critic = Discriminator(8, (6, 4))
        v = torch.randn(5, 8, requires_grad=True)
        r = torch.randn(5, 8, requires_grad=True)
        d = discriminator_loss(critic, v, r, kind)
        assert torch.isfinite(d)
        d.backward()
        assert v.grad is None and r.grad is None  # the critic step sees detached inputs
        generator_loss(critic, r, kind).backward()
        assert r.grad is not None and v.grad is None

    def test_bce_is_log2_twice_at_zero_logits(self):
        critic = lambda x: torch.zeros(x.shape[0])  # noqa: E731
        d = discriminator_loss(critic, torch.randn(3, 4), torch.randn(3, 4), "bce")
        assert d.item() == pytest.approx(2 * math.log(2))


# --- network -------------------------------------------------------------------------------


class TestNetwork:
    def test_forward_shapes_and_unit_norm(self):
        net = SEJE(**TINY, vocab_size=30, num_keyterms=12, num_classes=3)
        out = net(fake_batch())
        assert out.img.shape == out.rec.shape == (4, 16)
        assert out.logits_img.shape == out.logits_rec.shape == (4, 3)
        assert torch.allclose(out.img.norm(dim=1), torch.ones(4), atol=1e-5)
        assert torch.allclose(out.rec.norm(dim=1), torch.ones(4), atol=1e-5)

    @pytest.mark.parametrize("kt", ["word2vec", "linear", "none"])
    def test_optional_branches_and_zero_instruction_recipe(self, kt):
        net = SEJE(
            **TINY, keyterm_encoder=kt, ingredient_hidden=4, title_hidden=4, sentence_rnn="gru"
        )
        net.build(30, 12, 3, keyterm_word_ids=torch.arange(12) % 30)
        batch = fake_batch()
        batch["num_instructions"][0] = 0  # no instructions: one padding step is read
        batch["instruction_lengths"][0] = 0
        out = net(batch)
        assert torch.isfinite(out.rec).all()

    def test_precomputed_sentences_and_f_term_f_cat(self):
        net = SEJE(**TINY, sentence_dim=10, vocab_size=30, num_keyterms=12, num_classes=3)
        batch = fake_batch()
        batch["sentence_vectors"] = torch.randn(4, 3, 10)
        batch["f_term"], batch["f_cat"] = torch.randn(4, 8), torch.randn(4, 8)
        net.eval()
        a = net(batch)
        batch["sentence_vectors"] = batch["sentence_vectors"] * 2
        b = net(batch)
        assert not torch.allclose(a.rec, b.rec)  # the precomputed vectors are used

    def test_state_dict_rebuilds_an_unbuilt_network(self):
        vectors = torch.randn(28, 8)
        src = SEJE(**TINY, ingredient_hidden=4)
        src.build(30, 12, 3, word_vectors=vectors, keyterm_word_ids=torch.arange(12) + 2)
        assert torch.equal(src.recipe.words.weight[2:], vectors)
        dst = SEJE(**TINY, ingredient_hidden=4)
        dst.build_from_state_dict(src.state_dict())
        dst.load_state_dict(src.state_dict())
        src.eval(), dst.eval()
        batch = fake_batch()
        assert torch.allclose(src(batch).rec, dst(batch).rec)
        assert dst.sizes() == {"vocab_size": 30, "num_keyterms": 12, "num_classes": 3}
        with pytest.raises(ValueError, match="vocab_size=30 but the data has 31"):
            dst.check_sizes(31, 12, 3)

    def test_seeded_build_ignores_earlier_draws_and_leaves_the_global_stream(self):
        def built(draws: int, seed: int | None = 7) -> tuple[dict, torch.Tensor]:
            torch.manual_seed(0)
            net = SEJE(**TINY)  # the data-independent parts: from the global stream
            torch.rand(draws)  # whatever ran before the data were known
            net.build(30, 12, 3, keyterm_word_ids=torch.arange(12) + 2, seed=seed)
            return net.state_dict(), torch.rand(3)  # the next global draws

        a, next_a = built(0)
        b, next_b = built(5)
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights...
        torch.manual_seed(0)
        SEJE(**TINY)
        assert torch.equal(next_a, torch.rand(3))  # ...and the build drew nothing globally
        assert not torch.equal(built(0, seed=8)[0]["semantic.weight"], a["semantic.weight"])
        unseeded, _ = built(0, seed=None)  # None: the global stream, as before
        assert not torch.equal(unseeded["semantic.weight"], a["semantic.weight"])
        # a stream of its own, not a replay of torch.manual_seed(seed)'s first numbers
        with private_rng(7):
            own = torch.rand(4)
        with private_rng(7):
            assert torch.equal(torch.rand(4), own)
        torch.manual_seed(7)
        assert not torch.equal(torch.rand(4), own)

    def test_building_from_a_state_dict_leaves_the_global_stream(self):
        src = SEJE(**TINY, vocab_size=30, num_keyterms=12, num_classes=3)
        dst = SEJE(**TINY)
        state = torch.get_rng_state()
        dst.build_from_state_dict(src.state_dict())
        assert torch.equal(torch.get_rng_state(), state)

    def test_wrong_word_vector_width_is_a_clear_error(self):
        with pytest.raises(ValueError, match="word_dim must equal"):
            SEJE(**TINY).build(30, 12, 3, word_vectors=torch.randn(28, 9))

    def test_parameter_groups_split_cnn_and_exclude_discriminator(self):
        net = SEJE(**TINY, vocab_size=30, num_keyterms=12, num_classes=3)
        cnn, rest = net.parameter_groups()
        ids = {id(p) for p in cnn + rest}
        assert not ids & {id(p) for p in net.discriminator.parameters()}
        assert {id(p) for p in net.image.cnn.parameters()} == {id(p) for p in cnn}
        assert len(ids) == len(cnn) + len(rest)


class TestImageSide:
    @pytest.mark.parametrize("name", ["resnet50", "resnext101_32x8d", "wide_resnet50_2"])
    def test_torchvision_backbones_random_init(self, name):
        with torch.device("meta"):  # structure only: no memory, no init cost
            net, dim = build_backbone(name)
        assert dim == 2048 and isinstance(net.fc, nn.Identity)

    def test_pretrained_without_cache_is_a_clear_error(self, tmp_path, monkeypatch):
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
        with pytest.raises(FileNotFoundError, match="not cached.*nothing is downloaded"):
            build_backbone("resnet50", pretrained=True)

    def test_local_weights_file(self, tmp_path):
        src, _ = build_backbone("small_cnn", width=4)
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
                   tmp_path / "w.pt")  # fmt: skip
        dst, _ = build_backbone("small_cnn", weights=str(tmp_path / "w.pt"), width=4)
        for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="does not fit"):
            build_backbone("small_cnn", weights=str(tmp_path / "w.pt"), width=8)

    def test_encoder_weights_load_on_request_only(self, tmp_path):
        from jointgen.models.seje import ImageEncoder

        src, _ = build_backbone("small_cnn", width=4)
        torch.save(src.state_dict(), tmp_path / "w.pt")
        enc = ImageEncoder("small_cnn", 8, 8, weights=str(tmp_path / "w.pt"), width=4)
        w = src.state_dict()["features.0.weight"]
        assert not torch.equal(enc.cnn.state_dict()["features.0.weight"], w)
        assert enc.load_weights()
        assert torch.equal(enc.cnn.state_dict()["features.0.weight"], w)

    def test_category_vector_from_a_classifier(self):
        index = {"apple_pie": 2, "pad": 3, "thai": 4}
        tokens = class_name_tokens(["apple_pie", "pad_thai", "creme_brulee"], index, width=3)
        assert tokens.tolist() == [[2, 0, 0], [3, 4, 0], [0, 0, 0]]
        clf, _ = build_backbone("small_cnn", width=4, num_classes=3)
        net = SEJE(**TINY, category_arch="small_cnn")
        net.build(30, 12, 3, category_tokens=tokens, category_state=clf.state_dict())
        f_cat = net.category(torch.randn(5, 3, 16, 16), net.recipe.words)
        words = net.recipe.words.weight
        allowed = [words[2], (words[3] + words[4]) / 2, torch.zeros(8)]
        for row in f_cat:
            assert any(torch.allclose(row, a, atol=1e-6) for a in allowed)
        assert not any(p.requires_grad for p in net.category.parameters())


def test_network_package_imports_without_lightning():
    code = "import sys, jointgen.models.seje; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
