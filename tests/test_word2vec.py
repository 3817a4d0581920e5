"""word2vec C binary format: round trips, gensim compatibility, truncation errors, training."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from gensim.models import KeyedVectors
from hydra import compose, initialize_config_dir

from jointgen import CONF_DIR
from jointgen.data.word2vec import (
    Word2VecFormatError,
    load_vectors,
    save_vectors,
    train_word2vec,
)

WORDS = ["</s>", "olive_oil", "crème", "salt", "über_pan"]


@pytest.fixture
def vectors():
    return np.random.default_rng(0).normal(size=(len(WORDS), 7)).astype(np.float32)


def test_round_trip(tmp_path, vectors):
    save_vectors(tmp_path / "v.bin", WORDS, vectors)
    words, vecs = load_vectors(tmp_path / "v.bin")
    assert words == WORDS and vecs.dtype == np.float32 and np.array_equal(vecs, vectors)


def test_gensim_reads_ours_and_we_read_gensims(tmp_path, vectors):
    save_vectors(tmp_path / "ours.bin", WORDS, vectors)
    kv = KeyedVectors.load_word2vec_format(tmp_path / "ours.bin", binary=True)
    assert kv.index_to_key == WORDS and np.array_equal(kv.vectors, vectors)
    kv.save_word2vec_format(tmp_path / "gensim.bin", binary=True)
    words, vecs = load_vectors(tmp_path / "gensim.bin")
    assert words == WORDS and np.array_equal(vecs, vectors)


def test_rows_without_newline(tmp_path, vectors):
    # some C-format writers omit the newline after each vector
    data = f"{len(WORDS)} 7\n".encode() + b"".join(
        w.encode() + b" " + v.astype("<f4").tobytes() for w, v in zip(WORDS, vectors)
    )
    (tmp_path / "v.bin").write_bytes(data)
    words, vecs = load_vectors(tmp_path / "v.bin")
    assert words == WORDS and np.array_equal(vecs, vectors)


@pytest.mark.parametrize("cut", [10, 40, -3])
def test_truncated_file(tmp_path, vectors, cut):
    save_vectors(tmp_path / "vocab.bin", WORDS, vectors)
    data = (tmp_path / "vocab.bin").read_bytes()
    (tmp_path / "vocab.bin").write_bytes(data[:cut])
    with pytest.raises(Word2VecFormatError, match=r"vocab.bin: truncated at word \d+ of 5"):
        load_vectors(tmp_path / "vocab.bin")


@pytest.mark.parametrize("header", [b"", b"abc\n", b"5\n", b"-1 3\n"])
def test_bad_header(tmp_path, header):
    (tmp_path / "vocab.bin").write_bytes(header)
    with pytest.raises(Word2VecFormatError, match="vocab.bin: bad header"):
        load_vectors(tmp_path / "vocab.bin")


def test_missing_file_and_bad_words(tmp_path, vectors):
    with pytest.raises(FileNotFoundError, match="jointgen-w2v"):
        load_vectors(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match="space"):
        save_vectors(tmp_path / "v.bin", ["a b", *WORDS[1:]], vectors)


def test_train_writes_c_format_and_vocab_txt(tmp_path):
    rng = np.random.default_rng(0)
    lines = [
        " ".join(rng.choice(["heat", "oil", "pan", "salt", "stir", "bowl"], 12))
        for _ in range(200)
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    stats = train_word2vec(
        tmp_path / "corpus.txt",
        tmp_path / "vocab.bin",
        tmp_path / "vocab.txt",
        vector_size=8,
        epochs=1,
        min_count=1,
        workers=1,
    )
    words, vecs = load_vectors(tmp_path / "vocab.bin")
    assert words[0] == "</s>" and not vecs[0].any() and vecs.shape == (7, 8)
    assert sorted(words[1:]) == ["bowl", "heat", "oil", "pan", "salt", "stir"]
    assert (tmp_path / "vocab.txt").read_text().split("\n")[:-1] == words
    assert stats["corpus_words"] == 2400 and stats["words_per_second"] > 0


def test_original_flags_are_the_defaults():
    """conf/data/vocab.yaml and train_word2vec both default to the im2recipe/SEJE C command."""
    original = dict(sg=1, hs=1, negative=0, window=10, epochs=10, vector_size=300, min_count=10)
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="w2v")
    assert {k: cfg.data.vocab.train[k] for k in original} == original
    sig = inspect.signature(train_word2vec).parameters
    assert {k: sig[k].default for k in original} == original
