"""SEJE phase I features: lexicon derivation, phrase recovery, TF-IDF / TextRank / BERT ratings and
the key-term vectors the DataModule serves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jointgen.data.recipe1m import Recipe1MCache
from jointgen.data.recipe1m.build import preprocess_recipe1m
from jointgen.data.recipe1m.cache import Ragged
from jointgen.features import derive_lexicon, recover_phrases, textrank, write_keyterms
from jointgen.utils.checks import ConfigError

LEXICON = dict(action_min_count=1, action_start_ratio=0.5, utensil_min_count=1, utensil_ratio=0.5)


def _recipe(rid, title, ingrs, steps):
    layer1 = {
        "id": rid,
        "title": title,
        "partition": "train",
        "url": "u",
        "ingredients": [{"text": t} for t in ingrs],
        "instructions": [{"text": s} for s in steps],
    }
    det = {"id": rid, "ingredients": [{"text": t} for t in ingrs], "valid": [True] * len(ingrs)}
    return layer1, det


@pytest.fixture
def cache(tmp_path):
    rs = [
        _recipe("A", "Toast", ["olive oil", "salt"], ["Heat olive oil in a pan.", "Add salt."]),
        _recipe("B", "Soup", ["salt", "water"], ["Heat water in a pot.", "Add salt and salt."]),
        _recipe("C", "Salad", ["olive oil"], ["Toss olive oil in a large bowl."]),
    ]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "layer1.json").write_text(json.dumps([r[0] for r in rs]))
    (raw / "det_ingrs.json").write_text(json.dumps([r[1] for r in rs]))
    (raw / "layer2.json").write_text("[]")
    preprocess_recipe1m(
        raw, raw / "cache", image_dir=raw, require_images=False, verify_images="none"
    )
    return Recipe1MCache(raw / "cache")


def weights_of(cache, i):
    names = (cache.dir / "keyterm_names.txt").read_text().split()
    ids = Ragged(cache.dir, "keyterms", np.int32)[i]
    w = Ragged(cache.dir, "keyterm_weights", np.float32)[i]
    return {names[k]: float(x) for k, x in zip(ids, w)}


def test_tfidf_against_hand_computed(cache):
    stats = write_keyterms(cache, rating="tfidf", min_df=1, **LEXICON)
    lexicon = json.loads((cache.dir / "lexicon.json").read_text())
    assert sorted(lexicon["actions"]) == ["add", "heat", "toss"]
    assert sorted(lexicon["utensils"]) == ["bowl", "pan", "pot"]  # "large" is skipped
    assert stats["num_terms"] == 9
    # recipe A: olive_oil and salt twice (instructions + ingredient list), heat/add/pan once;
    # df over 3 train recipes: olive_oil, salt, heat, add 2; pan 1; idf = ln(4 / (1 + df)) + 1
    idf2, idf1 = math.log(4 / 3) + 1, math.log(2) + 1
    raw = {"olive_oil": 2 * idf2, "salt": 2 * idf2, "heat": idf2, "add": idf2, "pan": idf1}
    total = sum(raw.values())
    got = weights_of(cache, 0)
    assert got.keys() == raw.keys()
    for k, v in raw.items():
        assert got[k] == pytest.approx(v / total, rel=1e-6)
    unnormalised = write_keyterms(cache, rating="tfidf", min_df=1, normalise="none", **LEXICON)
    assert unnormalised["num_terms"] == 9 and weights_of(cache, 0)["pan"] == pytest.approx(idf1)


def test_min_df_and_max_terms(cache):
    write_keyterms(cache, rating="tfidf", min_df=2, max_terms=3, **LEXICON)
    names = (cache.dir / "keyterm_names.txt").read_text().split()
    # df 2 each: add, heat, olive_oil, salt; the 3 most frequent, ties broken by first appearance
    assert len(names) == 3 and set(names) <= {"add", "heat", "olive_oil", "salt"}


def test_textrank_rating(cache):
    write_keyterms(cache, rating="textrank", min_df=1, **LEXICON)
    for i in range(3):
        assert sum(weights_of(cache, i).values()) == pytest.approx(1.0, abs=1e-6)
    terms, scores = textrank(np.array([5, 7, 9]), window=2, damping=0.85, iterations=50)
    assert terms.tolist() == [5, 7, 9] and scores.sum() == pytest.approx(1.0)
    assert scores[1] > scores[0] == pytest.approx(scores[2])
    assert textrank(np.array([4, 4]), 2, 0.85, 10)[1].tolist() == [1.0]


def test_bert_rating_with_a_tiny_local_model(cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *"olive oil salt water heat add toss pan pot bowl".split(),
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config)
    tok.save_pretrained(tmp_path / "bert")
    model.save_pretrained(tmp_path / "bert")
    stats = write_keyterms(
        cache,
        rating="bert",
        min_df=1,
        bert_model=str(tmp_path / "bert"),
        bert_max_length=32,
        **LEXICON,
    )
    assert stats["rating"] == "bert"
    w = weights_of(cache, 0)
    assert len(w) == 5 and all(x > 0 for x in w.values()) and sum(w.values()) == pytest.approx(1.0)


def test_bad_options(cache, tmp_path):
    with pytest.raises(ConfigError, match="rating"):
        write_keyterms(cache, rating="lda")
    with pytest.raises(ConfigError, match="bert_model"):
        write_keyterms(cache, rating="bert")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        write_keyterms(
            cache, rating="bert", bert_model=str(tmp_path / "none"), min_df=1, **LEXICON
        )


def test_lexicon_cues():
    words = "preheat the oven to in a large bowl mix flour whisk eggs then".split()
    wid = {w: k + 2 for k, w in enumerate(words)}
    sents = [
        ["preheat", "the", "oven"],
        ["in", "a", "large", "bowl", "mix", "flour"],
        ["whisk", "eggs", "in", "the", "bowl"],
        ["then", "mix", "eggs"],
        ["mix", "flour"],
    ]
    flat = np.array([wid[w] for s in sents for w in s])
    starts = np.cumsum([0] + [len(s) for s in sents[:-1]])
    actions, utensils = derive_lexicon(
        words, [flat[:7], flat[7:]], flat[starts], np.array([wid["flour"]]), **LEXICON
    )
    names = lambda ids: sorted(words[i - 2] for i in ids)  # noqa: E731
    # "mix" starts 1 of its 3 uses (< 0.5); "then" and "in" are function words
    assert names(actions) == ["preheat", "whisk"]
    assert names(utensils) == ["bowl"]


def test_recover_rejected_ingredient_lines():
    words = [
        "5_dried_pitted_dates",
        "pitted_dates",
        "dates",
        "2_cups_water",
        "1_pinch_of_love",
        "water",
    ]
    got = recover_phrases(words, np.array([2, 5, 6, 2]), {"pitted_dates", "dates", "water"})
    assert got == {2: 3, 5: 7}  # longest valid phrase wins; no match, no entry


def test_datamodule_serves_keyterm_vectors(cache):
    from jointgen.data.recipe1m import Recipe1MDataModule
    from jointgen.data.word2vec import save_vectors

    write_keyterms(cache, rating="tfidf", min_df=1, **LEXICON)
    save_vectors(cache.dir / "vocab.bin", ["</s>", "salt", "heat"], np.ones((3, 2)))
    dm = Recipe1MDataModule(
        data_dir=str(cache.dir),
        image_dir=str(cache.dir),
        image_partition_folder=True,
        cache_dir=str(cache.dir),
        vocab={"path": str(cache.dir / "vocab.bin"), "corpus": "", "train": {}},
        preprocess={},
        features={},
        synthetic=None,
        prepare=False,
        keyterms=True,
        image_size=8,
        resize=8,
        max_images=5,
        max_sentences=20,
        max_words=20,
        max_ingredients=20,
        max_title=20,
        limit=None,
        exclude_images_file=None,
        batch_size=3,
        num_workers=0,
        pin_memory=False,
    )
    b = next(iter(dm.train_dataloader()))
    assert b["keyterms"].shape == (3, dm.num_keyterms) == (3, 9)
    row = dict(zip(dm.keyterm_names, b["keyterms"][b["id"].index("A")].tolist()))
    assert {k: v for k, v in row.items() if v} == pytest.approx(weights_of(cache, 0))
    ids = dict(zip(dm.keyterm_names, dm.keyterm_word_ids.tolist()))
    assert ids["salt"] == 3 and ids["heat"] == 4 and ids["olive_oil"] == 1  # UNK


def test_chunked_streaming_gives_the_same_weights(cache, monkeypatch):
    import jointgen.features.keyterms as kt

    write_keyterms(cache, rating="textrank", min_df=1, **LEXICON)
    whole = [weights_of(cache, i) for i in range(3)]
    monkeypatch.setattr(kt, "CHUNK_TOKENS", 3)
    write_keyterms(cache, rating="textrank", min_df=1, **LEXICON)
    assert [weights_of(cache, i) for i in range(3)] == whole
