"""Tests of the offline evaluation suite: attribute extraction, coherence, caption metrics,
in-domain Fréchet distance, linear probes and reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.text import BLEUScore

import jointgen.eval.classifier as classifier_module
from jointgen.data.shapes import AttributeSpace, generate_shapes, paraphrases
from jointgen.eval import (
    FD_LABEL,
    LEADERBOARD_COLUMNS,
    analytic_attributes,
    attribute_agreement,
    bleu4,
    caption_perplexity,
    cross_coherence_img2txt,
    cross_coherence_txt2img,
    exact_match,
    extract_features,
    frechet_distance,
    image_attributes,
    in_domain_fd_metric,
    joint_coherence,
    leaderboard_row,
    leaderboard_table,
    letters_accuracy,
    logistic_probe,
    probe_attributes,
    probe_private,
    ridge_r2,
    token_accuracy,
    token_nll,
    train_attribute_classifier,
    write_results,
)

# a tiny level-1 classifier: ~12k image passes, a few seconds on one core
TINY_CLF = dict(level=1, image_size=32, num_train=3000, epochs=4, seed=0, num_test=500)


@pytest.fixture(scope="module")
def clf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("clf_cache")


@pytest.fixture(scope="module")
def tiny_classifier(clf_cache):
    return train_attribute_classifier(**TINY_CLF, cache_dir=clf_cache)


@pytest.fixture(scope="module")
def level5():
    return generate_shapes(5, 300, 32, seed=11, paraphrase_rate=0.5)


def _shuffled(n: int) -> np.ndarray:
    # samples are independent, so pairing each with its neighbour is a fair shuffle
    return np.roll(np.arange(n), 1)


class TestAnalyticAttributes:
    @pytest.mark.parametrize("level", range(1, 7))
    def test_recovers_ground_truth(self, level):
        data = generate_shapes(level, 240, 32, seed=100 + level)
        pred = analytic_attributes(data["images"], level)
        assert pred.shape == data["attrs"].shape and pred.dtype == np.int64
        accuracy = (pred == data["attrs"]).mean(0)
        assert accuracy.min() >= 0.99, dict(zip(data["attr_names"], accuracy))

    def test_grid3_and_eight_colours(self):
        data = generate_shapes(4, 80, 64, seed=5, num_colours=8, position_grid="grid3")
        pred = analytic_attributes(data["images"], 4, num_colours=8, position_grid="grid3")
        assert (pred == data["attrs"]).mean(0).min() >= 0.99

    def test_layouts_agree(self, level5):
        images = level5["images"][:40]
        floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        np.testing.assert_array_equal(
            analytic_attributes(floats, 5), analytic_attributes(images, 5)
        )

    def test_blank_image_is_unknown(self):
        blank = np.full((2, 32, 32, 3), 40, dtype=np.uint8)
        pred = analytic_attributes(blank, 5)
        assert (pred[:, :4] == -1).all()  # no object: shape, size, colour, position unknown
        assert (pred[:, 4] == 1).all()  # the background is still readable: dark

    def test_bad_input_raises(self):
        with pytest.raises(ValueError, match="expected images"):
            analytic_attributes(np.zeros((2, 32, 32), np.uint8), 1)
        with pytest.raises(ValueError, match="method"):
            image_attributes(np.zeros((1, 32, 32, 3), np.uint8), 1, method="magic")


class TestClassifier:
    def test_tiny_classifier_is_accurate(self, tiny_classifier):
        model, accuracy = tiny_classifier
        assert accuracy["shape"] >= 0.95, accuracy
        assert accuracy["train_seconds"] > 0

    def test_cache_is_reused(self, tiny_classifier, clf_cache, monkeypatch):
        def no_data(*args, **kwargs):
            raise AssertionError("a cached classifier must not generate training data")

        monkeypatch.setattr(classifier_module, "generate_shapes", no_data)
        model, accuracy = train_attribute_classifier(**TINY_CLF, cache_dir=clf_cache)
        assert accuracy == tiny_classifier[1]
        images = generate_shapes(1, 16, 32, seed=3)["images"]
        np.testing.assert_array_equal(model.predict(images), tiny_classifier[0].predict(images))

    def test_entry_point_and_features(self, tiny_classifier):
        model, _ = tiny_classifier
        data = generate_shapes(1, 64, 32, seed=21)
        both = image_attributes(data["images"], 1, method="both", classifier=model)
        assert set(both) == {"analytic", "classifier"}
        assert (both["classifier"] == data["attrs"]).mean() >= 0.9
        feats = extract_features(data["images"], model)
        assert feats.shape == (64, model.num_features) and torch.isfinite(feats).all()
        with pytest.raises(ValueError, match="needs classifier"):
            image_attributes(data["images"], 1, method="classifier")
        with pytest.raises(ValueError, match="level"):
            image_attributes(data["images"], 2, method="classifier", classifier=model)


class TestCoherence:
    def test_ground_truth_pairs_are_coherent(self, level5):
        images, attrs, captions = level5["images"], level5["attrs"], list(level5["captions"])
        for result in (
            cross_coherence_txt2img(images, attrs, 5),
            cross_coherence_img2txt(captions, attrs, 5, source_captions=captions),
            joint_coherence(images, captions, 5),
        ):
            assert result["strict"] == 1.0 and result["feats"] == 5.0
            assert all(v == 1.0 for k, v in result.items() if k.startswith("acc/"))
        assert (
            cross_coherence_img2txt(captions, attrs, 5, source_captions=captions)["letters"] == 1
        )

    def test_shuffled_pairs_are_near_chance(self, level5):
        perm = _shuffled(len(level5["attrs"]))
        captions = list(level5["captions"][perm])
        result = joint_coherence(level5["images"], captions, 5)
        chance = {"shape": 1 / 6, "size": 1 / 3, "colour": 1 / 6, "position": 1 / 4}
        for name, p in {**chance, "background": 1 / 2}.items():
            assert abs(result[f"acc/{name}"] - p) < 0.1, (name, result)
        assert result["strict"] < 0.03
        txt2img = cross_coherence_txt2img(level5["images"], level5["attrs"][perm], 5)
        assert abs(txt2img["feats"] - sum(chance.values()) - 0.5) < 0.3

    def test_unparseable_captions_fail_every_attribute(self, level5):
        captions = list(level5["captions"][:100])
        broken = [c if i % 2 else "a purple elephant" for i, c in enumerate(captions)]
        result = cross_coherence_img2txt(broken, level5["attrs"][:100], 5)
        assert result["parsed"] == result["strict"] == 0.5
        assert all(result[f"acc/{n}"] == 0.5 for n in AttributeSpace(5).attr_names)
        joint = joint_coherence(level5["images"][:100], broken, 5)
        assert joint["strict"] == 0.5 and joint["feats"] == 2.5

    def test_agreement_and_letters(self):
        pred = np.array([[0, 1], [1, -1], [-1, -1]])
        target = np.array([[0, 1], [1, 2], [-1, 0]])
        result = attribute_agreement(pred, target, ("shape", "size"))
        assert result["strict"] == pytest.approx(1 / 3)
        assert result["feats"] == pytest.approx(1.0)  # 2 + 1 + 0 right attributes
        assert result["acc/shape"] == pytest.approx(2 / 3) and result["acc/size"] == 1 / 3
        assert letters_accuracy(["abc", "ab", ""], ["abd", "abcd", ""]) == pytest.approx(
            (2 / 3 + 2 / 4 + 1.0) / 3
        )


class TestTextMetrics:
    @pytest.mark.parametrize("level", [3, 5, 6])
    def test_ground_truth_captions_score_one(self, level):
        data = generate_shapes(level, 80, 16, seed=level, paraphrase_rate=0.8)
        captions = [c.upper() + "." for c in data["captions"]]  # normalised away
        assert exact_match(captions, data["attrs"], level) == 1.0
        assert bleu4(captions, data["attrs"], level) == pytest.approx(1.0)
        perm = _shuffled(80)
        assert exact_match(captions, data["attrs"][perm], level) < 0.2
        assert bleu4(captions, data["attrs"][perm], level) < 0.9

    def test_bleu_equals_full_reference_set(self):
        data = generate_shapes(4, 40, 16, seed=2, paraphrase_rate=1.0)
        space = AttributeSpace(4)
        preds = [" ".join(c.split()[: 3 + i % 6]) for i, c in enumerate(data["captions"])]
        attrs = data["attrs"].copy()
        attrs[::3] = attrs[::3][::-1]  # some predictions describe another scene
        full = BLEUScore(n_gram=4)
        full.update(preds, [paraphrases(a, space) for a in attrs])
        assert bleu4(preds, attrs, 4) == pytest.approx(float(full.compute()), abs=1e-12)

    def test_uniform_model_perplexity_is_vocabulary_size(self):
        vocab_size = 57
        targets = torch.randint(4, vocab_size, (8, 12))
        targets[:, 9:] = 0  # padding is not scored
        nll, mask = token_nll(torch.zeros(8, 12, vocab_size), targets)
        result = caption_perplexity(nll, mask)
        assert result["perplexity"] == pytest.approx(vocab_size)
        assert result["nats_per_token"] == pytest.approx(np.log(vocab_size))

    def test_token_accuracy(self, level5):
        tokens = level5["tokens"]
        assert token_accuracy(tokens, tokens) == 1.0
        wrong = tokens.copy()
        wrong[:, 0] = 3  # UNK in place of the first word
        counted = (tokens != 0).sum()
        assert token_accuracy(wrong, tokens) == pytest.approx(1 - len(tokens) / counted)
        assert token_accuracy(tokens[:, :2], tokens) < 0.5  # a short prediction is padded


class TestFrechet:
    def test_identical_sets_and_different_sets(self, tiny_classifier):
        model, _ = tiny_classifier
        level1 = generate_shapes(1, 200, 32, seed=1)["images"]
        other = generate_shapes(1, 200, 32, seed=2)["images"]
        level3 = generate_shapes(3, 200, 32, seed=1)["images"]
        same = frechet_distance(level1, level1, model)
        fresh = frechet_distance(level1, other, model)["in_domain_fd"]
        shifted = frechet_distance(level1, level3, model)["in_domain_fd"]
        assert same["label"] == FD_LABEL and "in-domain" in same["label"]
        assert abs(same["in_domain_fd"]) < 1e-3 * shifted
        assert shifted > 5 * fresh > 0
        assert next(model.parameters()).dtype == torch.float32  # not converted by set_dtype

    def test_metric_keeps_classifier_frozen(self, tiny_classifier):
        model, _ = tiny_classifier
        metric = in_domain_fd_metric(model)
        metric.train()  # what a LightningModule does to its children every epoch
        assert not metric.inception.classifier.training
        images = torch.from_numpy(generate_shapes(1, 8, 32, seed=4)["images"]).permute(0, 3, 1, 2)
        metric.update(images, real=True)
        metric.update(images.float() / 255.0, real=False)
        assert abs(float(metric.compute())) < 1e-3


class TestProbes:
    def test_informative_features_and_noise(self):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 4, (1000, 2))
        onehot = np.eye(4)[labels[:, 0]] + 0.3 * rng.standard_normal((1000, 4))
        latents = np.concatenate([onehot, rng.standard_normal((1000, 12))], axis=1)
        result = probe_attributes(latents, labels, ("signal", "noise"))
        assert result["probe/signal"] >= 0.95
        assert abs(result["probe/noise"] - 0.25) < 0.08
        assert result == probe_attributes(latents, labels, ("signal", "noise"))  # deterministic
        assert logistic_probe(latents[:500], labels[:500, 0], latents[500:], labels[500:, 0]) > 0.9

    def test_private_nuisances(self):
        data = generate_shapes(1, 900, 16, seed=7)
        private, names = data["private"], list(data["private_names"])
        rng = np.random.default_rng(1)
        texture = np.eye(4)[private[:, names.index("texture")].astype(int)]
        rotation = private[:, [names.index("rotation")]] / 30.0
        latents = np.concatenate([rotation, texture], 1) + 0.1 * rng.standard_normal((900, 5))
        result = probe_private(latents, private, names)
        assert result["r2/rotation"] > 0.9 and result["probe/texture"] > 0.95
        assert abs(result["r2/brightness"]) < 0.1
        assert (
            ridge_r2(
                rng.standard_normal((500, 3)),
                rng.standard_normal(500),
                rng.standard_normal((400, 3)),
                rng.standard_normal(400),
            )
            < 0.05
        )

    def test_bad_split_raises(self):
        with pytest.raises(ValueError, match="num_train"):
            probe_attributes(np.zeros((100, 3)), np.zeros((100, 1), int), ("a",))


class TestReport:
    def test_leaderboard_row_and_files(self, tmp_path):
        seeds = [
            {"strict": 0.5, "feats": 1.5, "num_attributes": 2.0, "letters": 0.9},
            {"strict": 0.3, "feats": 1.1, "num_attributes": 2.0, "letters": 0.8},
        ]
        row = leaderboard_row(2, "joint-vae", txt2img=seeds, img2txt=seeds, joint=seeds[0])
        assert list(row) == list(LEADERBOARD_COLUMNS)
        assert row["Txt→Img Strict"] == "40 (14)" and row["Txt→Img Feats"] == "1.3/2"
        assert row["Img→Txt Letters"] == "85 (7)" and row["Joint Strict"] == "50"
        level1 = leaderboard_row(
            1, "m", txt2img={"strict": 0.47, "feats": 0.47, "num_attributes": 1}
        )
        assert level1["Txt→Img Feats"] == "–" and level1["Joint Strict"] == "–"
        table = leaderboard_table([row, level1])
        assert table.splitlines()[0].startswith("| Level | Model | Txt→Img Strict")
        results = {"txt2img": seeds[0], "fd": {"in_domain_fd": 1.5, "label": FD_LABEL}}
        paths = write_results(results, tmp_path / "results", "level2", leaderboard=[row])
        assert json.loads(paths["json"].read_text())["fd"]["label"] == FD_LABEL
        markdown = paths["markdown"].read_text()
        assert "| Level |" in markdown and "fd/in_domain_fd" in markdown
