"""Tests of the captioned-shapes dataset: grammar, vocabulary, generator and DataModule."""

from __future__ import annotations

import colorsys
import itertools
import re

import numpy as np
import pytest
import torch

import jointgen.data.shapes.generate as generate_module
from jointgen.data.shapes import (
    COLOURS,
    LEVEL_ATTRS,
    PAD,
    AttributeSpace,
    ShapesDataModule,
    Vocabulary,
    generate_shapes,
    heldout_pairs,
    load_npz,
    max_caption_words,
    paraphrases,
    parse_caption,
    prepare_shapes,
    render_caption,
    vocabulary_words,
)
from jointgen.data.shapes.attributes import COLOUR_RGB
from jointgen.data.shapes.grammar import templates

TINY = dict(image_size=16, num_train=64, num_val=16, num_test=16, batch_size=8)


def _datamodule(tmp_path, **overrides) -> ShapesDataModule:
    kwargs = dict(data_dir=str(tmp_path), **TINY)
    kwargs.update(overrides)
    return ShapesDataModule(**kwargs)


def _covering_combos(space: AttributeSpace) -> list[tuple[int, ...]]:
    """A few attribute vectors that together use every value of every attribute."""
    return [tuple(i % n for n in space.cardinalities) for i in range(max(space.cardinalities))]


# --- image attribute extraction (what the evaluation suite will do analytically) ------------

_PROTO_HUE = np.array([colorsys.rgb_to_hsv(*np.divide(COLOUR_RGB[c], 255))[0] for c in COLOURS])


def _foreground(image: np.ndarray) -> np.ndarray:
    """Saturated pixels: backgrounds and textures are grey, so only objects are coloured."""
    image = image.astype(np.int16)
    return (image.max(-1) - image.min(-1)) > 60


def _colour_of(pixels: np.ndarray, num_colours: int) -> np.ndarray:
    hues = np.array([colorsys.rgb_to_hsv(*(p / 255.0))[0] for p in np.atleast_2d(pixels)])
    dist = np.abs(hues[:, None] - _PROTO_HUE[None, :num_colours])
    return np.minimum(dist, 1.0 - dist).argmin(axis=1)


class TestGrammar:
    @pytest.mark.parametrize("level", range(1, 7))
    def test_parser_inverts_every_caption(self, level):
        space = AttributeSpace(level)
        for attrs in space.combinations():
            captions = paraphrases(attrs, space)
            assert captions[0] == render_caption(attrs, space)
            for caption in captions:
                assert parse_caption(caption, level) == attrs, caption

    @pytest.mark.parametrize("level", [4, 5, 6])
    def test_parser_with_all_colours_and_grid3(self, level):
        space = AttributeSpace(level, num_colours=8, position_grid="grid3")
        combos = list(space.combinations())[:: 1 if level == 4 else 7]  # subsample, for speed
        for attrs in combos:
            for caption in paraphrases(attrs, space):
                assert parse_caption(caption, level, num_colours=8, position_grid="grid3") == attrs

    @pytest.mark.parametrize(
        "text, level",
        [
            ("", 1),
            ("a circle circle", 1),
            ("a purple elephant", 3),
            ("a large red circle in the top left", 3),  # position is not captioned at level 3
            ("a large red circle", 4),  # position missing
            ("a large orange circle", 3),  # orange is the 7th colour, not in the default six
            ("a large red circle in the centre", 4),  # a grid3 cell, not a quadrant
            ("a red circle left of", 6),
            ("red circle left of a blue square a", 6),
            ("a big big red star", 3),
        ],
    )
    def test_unparseable_returns_none(self, text, level):
        assert parse_caption(text, level) is None

    def test_parser_ignores_case_and_punctuation(self):
        assert parse_caption("A Large RED circle.", 3) == (0, 2, 0)

    def test_paraphrases_use_every_synonym_and_word(self):
        used = set()
        for level, grid in itertools.product(range(1, 7), ("quadrants", "grid3")):
            space = AttributeSpace(level, num_colours=8, position_grid=grid)
            for attrs in _covering_combos(space):
                for caption in paraphrases(attrs, space):
                    used.update(caption.split())
        assert used == set(vocabulary_words())

    def test_template_counts_and_lengths(self):
        for level in range(1, 7):
            for grid in ("quadrants", "grid3"):
                space = AttributeSpace(level, num_colours=8, position_grid=grid)
                forms = len(templates(space)) // (2 if level == 6 else 1)
                assert (level == 1 and forms == 3) or 4 <= forms <= 5
                assert max_caption_words(space) + 1 <= 16
                captions = [c for a in _covering_combos(space) for c in paraphrases(a, space)]
                assert max(len(c.split()) for c in captions) == max_caption_words(space)

    def test_paraphrase_rate_zero_is_canonical(self):
        space = AttributeSpace(5)
        rng = np.random.default_rng(0)
        attrs = (1, 2, 3, 3, 0)
        assert {render_caption(attrs, space, rng, 0.0) for _ in range(50)} == {
            "a large cyan square in the bottom right on a light background"
        }
        assert len({render_caption(attrs, space, rng, 1.0) for _ in range(200)}) > 20


class TestVocabulary:
    def test_size_and_specials(self):
        vocab = Vocabulary.from_grammar()
        assert len(vocab.words) < 60
        assert len(vocab) == len(vocab.words) + 4
        assert vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and PAD == 0
        assert vocab == Vocabulary.from_grammar()  # deterministic

    def test_encode_decode_round_trip(self):
        vocab = Vocabulary.from_grammar()
        text = "there is a big orange box in the upper left on a black background"
        ids = vocab.encode(text, 16)
        assert len(ids) == 16 and ids[len(text.split())] == vocab.EOS
        assert ids[len(text.split()) + 1 :] == [PAD] * (15 - len(text.split()))
        assert vocab.decode(ids) == text
        assert vocab.decode([vocab.BOS] + ids) == text

    def test_truncation_unknown_and_pad(self):
        vocab = Vocabulary.from_grammar()
        assert vocab.encode("a red circle", 3) == [vocab.stoi["a"], vocab.stoi["red"], vocab.EOS]
        assert vocab.encode("a zebra", 4)[1] == vocab.UNK
        assert vocab.decode([PAD, vocab.stoi["star"], PAD, vocab.EOS, vocab.stoi["red"]]) == "star"

    def test_save_load(self, tmp_path):
        vocab = Vocabulary.from_grammar()
        vocab.save(tmp_path / "vocab.json")
        assert Vocabulary.load(tmp_path / "vocab.json") == vocab


class TestGenerate:
    def test_same_seed_same_arrays(self):
        a = generate_shapes(5, 32, 16, seed=3)
        b = generate_shapes(5, 32, 16, seed=3)
        c = generate_shapes(5, 32, 16, seed=4)
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), key
        assert not np.array_equal(a["images"], c["images"])
        assert not np.array_equal(a["attrs"], c["attrs"])

    def test_same_seed_same_files(self, tmp_path):
        kwargs = dict(
            level=6,
            image_size=16,
            num_train=20,
            num_val=5,
            num_test=5,
            seed=1,
            paraphrase_rate=0.5,
            num_colours=6,
            position_grid="quadrants",
            heldout_fraction=0.1,
            max_caption_len=16,
        )
        first = prepare_shapes(tmp_path / "a", **kwargs)
        second = prepare_shapes(tmp_path / "b", **kwargs)
        for key in first:
            assert first[key].read_bytes() == second[key].read_bytes(), key

    @pytest.mark.parametrize("level", range(1, 7))
    def test_level_columns(self, level):
        data = generate_shapes(level, 40, 16, seed=0)
        space = AttributeSpace(level)
        assert tuple(data["attr_names"]) == LEVEL_ATTRS[level]
        assert data["attrs"].shape == (40, len(LEVEL_ATTRS[level]))
        assert data["attrs"].dtype == np.int64 and data["tokens"].dtype == np.int64
        assert (data["attrs"] >= 0).all() and (data["attrs"] < space.cardinalities).all()
        assert data["images"].shape == (40, 16, 16, 3) and data["images"].dtype == np.uint8
        assert data["private"].shape == (40, len(data["private_names"]))
        assert data["private"].dtype == np.float32 and "rotation" in data["private_names"][0]
        assert data["tokens"].shape == (40, 16)
        assert ((data["tokens"] == Vocabulary.EOS).sum(1) == 1).all()
        for caption, attrs in zip(data["captions"], data["attrs"]):
            assert parse_caption(str(caption), level) == tuple(attrs)

    def test_colour_position_background_from_pixels(self):
        data = generate_shapes(5, 200, 32, seed=2)
        for image, (_, _, colour, position, background) in zip(data["images"], data["attrs"]):
            mask = _foreground(image)
            assert _colour_of(image[mask].mean(0), 6)[0] == colour
            ys, xs = np.nonzero(mask)
            assert 2 * int(ys.mean() >= 16) + int(xs.mean() >= 16) == position
            assert int(image[~mask].mean() < 128) == background

    def test_size_from_filled_area(self):
        data = generate_shapes(2, 200, 32, seed=2)
        filled = data["private"][:, list(data["private_names"]).index("stroke")] == 0
        areas = np.array([_foreground(img).sum() for img in data["images"]])[filled]
        sizes = data["attrs"][filled, 1]
        assert areas[sizes == 0].max() < areas[sizes == 1].min()
        assert areas[sizes == 1].max() < areas[sizes == 2].min()

    def test_relation_binds_colours_to_sides(self):
        data = generate_shapes(6, 60, 32, seed=2)
        for image, (_, colour_a, relation, _, colour_b) in zip(data["images"], data["attrs"]):
            if colour_a == colour_b:
                continue
            ys, xs = np.nonzero(_foreground(image))
            labels = _colour_of(image[ys, xs].astype(float), 6)
            axis = ys if relation == 1 else xs  # a is above (smaller y) or left of b
            assert axis[labels == colour_a].mean() < axis[labels == colour_b].mean()

    @pytest.mark.parametrize("level", [3, 6])
    def test_heldout_pairs_never_in_training(self, tmp_path, level):
        paths = prepare_shapes(
            tmp_path,
            level=level,
            image_size=8,
            num_train=300,
            num_val=50,
            num_test=50,
            seed=0,
            paraphrase_rate=0.5,
            num_colours=6,
            position_grid="quadrants",
            heldout_fraction=0.2,
            max_caption_len=16,
        )
        held = set(heldout_pairs(6, 0.2, 0))
        assert len(held) == round(0.2 * 36)
        space = AttributeSpace(level)
        for split in ("train", "val", "test", "test_heldout"):
            attrs = load_npz(paths[split])["attrs"]
            for shape_col, colour_col in space.pair_columns():
                pairs = set(map(tuple, attrs[:, [shape_col, colour_col]].tolist()))
                assert pairs <= held if split == "test_heldout" else not pairs & held


class TestDataModule:
    def test_batches(self, tmp_path):
        dm = _datamodule(tmp_path, level=4)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert set(batch) == {"image", "tokens", "mask_image", "mask_text", "attrs", "index"}
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 3, 16, 16)
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (8, 16)
        assert batch["mask_image"].dtype == torch.bool and batch["mask_image"].all()
        assert batch["mask_text"].dtype == torch.bool and batch["mask_text"].all()
        assert batch["attrs"].dtype == torch.int64 and batch["attrs"].shape == (8, 4)
        assert batch["index"].dtype == torch.int64
        assert dm.attr_names == ("shape", "size", "colour", "position")
        assert dm.image_shape == (3, 16, 16) and dm.num_bits == 8
        assert len(dm.train_dataloader()) == 64 // 8
        assert sum(len(b["index"]) for b in dm.val_dataloader()) == 16
        assert sum(len(b["index"]) for b in dm.test_dataloader()) == 16
        with pytest.raises(ValueError, match="heldout_fraction"):
            dm.heldout_dataloader()

    def test_missing_modalities(self, tmp_path):
        dm = _datamodule(tmp_path, num_train=100, missing_fraction=0.5)
        dm.setup("fit")
        train = dm.datasets["train"]
        assert (~train.mask_text).sum() == 25 and (~train.mask_image).sum() == 25
        assert (train.mask_image | train.mask_text).all()
        assert (train.images[~train.mask_image] == 0).all()
        assert (train.tokens[~train.mask_text] == PAD).all()
        assert (train.tokens[train.mask_text, 0] != PAD).all()
        assert dm.datasets["val"].mask_image.all() and dm.datasets["val"].mask_text.all()

    def test_heldout_loader(self, tmp_path):
        dm = _datamodule(tmp_path, level=3, heldout_fraction=0.1)
        dm.setup()
        assert sum(len(b["index"]) for b in dm.heldout_dataloader()) == 16

    def test_cache_reused_and_invalidated(self, tmp_path, monkeypatch):
        _datamodule(tmp_path).prepare_data()
        files = sorted(p.name for p in tmp_path.iterdir())

        def fail(*args, **kwargs):
            raise AssertionError("regenerated a cached split")

        monkeypatch.setattr(generate_module, "generate_shapes", fail)
        dm = _datamodule(tmp_path)
        dm.prepare_data()
        dm.setup()
        assert len(dm.datasets["train"]) == 64
        with pytest.raises(AssertionError, match="regenerated"):
            _datamodule(tmp_path, paraphrase_rate=0.25).prepare_data()
        monkeypatch.undo()
        _datamodule(tmp_path, paraphrase_rate=0.25).prepare_data()
        assert len(list(tmp_path.iterdir())) == 2 * len(files)

    @pytest.mark.parametrize(
        "key, value, message",
        [
            ("level", 7, "data.level must be in 1..6, got 7"),
            ("image_size", 0, "data.image_size must be positive, got 0"),
            ("batch_size", 0, "data.batch_size must be positive, got 0"),
            ("batch_size", 65, "data.batch_size must be at most num_train=64, got 65"),
            ("num_train", -1, "data.num_train must be positive, got -1"),
            ("seed", -1, "data.seed must be non-negative, got -1"),
            ("paraphrase_rate", 1.5, "data.paraphrase_rate must be in [0, 1], got 1.5"),
            ("num_colours", 9, "data.num_colours must be in 2..8, got 9"),
            ("position_grid", "hex", "data.position_grid must be one of"),
            ("heldout_fraction", 0.7, "data.heldout_fraction must be in [0, 0.5], got 0.7"),
            ("missing_fraction", -0.1, "data.missing_fraction must be in [0, 1], got -0.1"),
            ("max_caption_len", 7, "data.max_caption_len must be at least 8 at this level, got 7"),
            ("num_workers", -1, "data.num_workers must be >= 0, got -1"),
        ],
    )
    def test_bad_arguments(self, tmp_path, key, value, message):
        with pytest.raises(ValueError, match=re.escape(message)):
            _datamodule(tmp_path, **{key: value})

    def test_heldout_needs_colour(self, tmp_path):
        with pytest.raises(ValueError, match="data.heldout_fraction must be 0 below level 3"):
            _datamodule(tmp_path, level=2, heldout_fraction=0.1)
