"""word2vec vectors in the C tool's binary format (``vocab.bin``), and training them with gensim.

Format (as written by Mikolov's ``word2vec -binary 1``): an ASCII header ``"V D\\n"``, then for
each word its UTF-8 bytes, one space, ``D`` little-endian float32 values and a newline (some
writers omit the newline; the reader accepts both). ``</s>``, the C tool's sentence token, comes
first; the files written here keep that convention with a zero vector.

Token ids used across jointgen: 0 = PAD, 1 = UNK and id ``i >= 2`` is row ``i - 2`` of the
vectors returned by :func:`load_vectors`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from jointgen.utils.checks import DataFormatError

log = logging.getLogger(__name__)
PAD_ID, UNK_ID, FIRST_WORD_ID = 0, 1, 2
EOS = "</s>"


class Word2VecFormatError(DataFormatError):
    """A malformed or truncated word2vec file; the message names the file and position."""


def _error(path: Path, msg: str) -> Word2VecFormatError:
    return Word2VecFormatError(f"{path}: {msg}")


def load_vectors(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a word2vec C binary file.

    Args:
        path: ``vocab.bin`` written by the C tool, gensim or :func:`save_vectors`.

    Returns:
        ``(words, vectors)``: V words and a float32 array of shape ``[V, D]``.

    Raises:
        FileNotFoundError: no such file.
        Word2VecFormatError: bad header, truncated file or undecodable word (one line naming
            the file, the word index and the byte offset).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word2vec file not found: {path} (train one with jointgen-w2v)")
    data = path.read_bytes()
    end = data.find(b"\n")
    try:
        v, d = (int(x) for x in data[:end].split())
        if v < 0 or not 0 < d <= 1 << 20:  # no real embedding has a million dimensions
            raise ValueError
    except ValueError:
        raise _error(path, f"bad header {data[: max(end, 0)][:40]!r}; expected 'V D'") from None
    words: list[str] = []
    # no more rows than the file can hold: a damaged header could ask for terabytes
    vectors = np.empty((min(v, len(data) // (1 + 4 * d)), d), dtype=np.float32)
    row = d * 4
    pos = end + 1
    for i in range(v):
        while pos < len(data) and data[pos] in b"\n ":  # newline left by the previous row
            pos += 1
        space = data.find(b" ", pos)
        if space < 0 or space + 1 + row > len(data):
            raise _error(
                path, f"truncated at word {i} of {v} (byte {pos} of {len(data)}); re-create it"
            )
        try:
            words.append(data[pos:space].decode("utf-8"))
        except UnicodeDecodeError:
            raise _error(path, f"word {i} at byte {pos} is not valid UTF-8") from None
        vectors[i] = np.frombuffer(data, dtype="<f4", count=d, offset=space + 1)
        if not np.isfinite(vectors[i]).all():  # flipped bytes often give NaN or inf
            raise _error(path, f"word {i} ({words[-1]!r}) at byte {pos} has non-finite values")
        pos = space + 1 + row
    if data[pos:].strip():  # more rows than the header counts: V is wrong
        raise _error(path, f"data after word {v} of {v} (byte {pos}); the header is wrong")
    return words, vectors


def save_vectors(path: str | Path, words: list[str], vectors: np.ndarray) -> None:
    """Write ``words`` and their ``[V, D]`` vectors in the C binary format."""
    vectors = np.asarray(vectors, dtype="<f4")
    if vectors.ndim != 2 or len(words) != len(vectors):
        raise ValueError(f"{len(words)} words but vectors of shape {vectors.shape}")
    for w in words:
        if not w or any(c in w for c in " \n"):
            raise ValueError(f"word {w!r} is empty or contains a space or newline")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(f"{len(words)} {vectors.shape[1]}\n".encode())
        for w, vec in zip(words, vectors):
            f.write(w.encode("utf-8") + b" " + vec.tobytes() + b"\n")


def save_vocab_txt(path: str | Path, words: list[str]) -> None:
    """One word per line, in row order (line ``k`` is token id ``k + 2``)."""
    Path(path).write_text("".join(w + "\n" for w in words), encoding="utf-8")


def train_word2vec(
    corpus: str | Path,
    out_bin: str | Path,
    out_txt: str | Path | None = None,
    *,
    sg: int = 1,
    hs: int = 1,
    negative: int = 0,
    window: int = 10,
    epochs: int = 10,
    vector_size: int = 300,
    min_count: int = 10,
    sample: float = 1e-3,
    alpha: float = 0.025,
    workers: int = 2,
    seed: int = 1,
) -> dict:
    """Train gensim Word2Vec on a space-tokenised corpus and write ``vocab.bin`` (+ vocab.txt).

    The defaults reproduce im2recipe's and SEJE's C command (``-cbow 0 -hs 1 -negative 0 -window
    10 -iter 10 -size 300 -min-count 10``). ``</s>`` is written first with a zero vector, as in
    the C tool's files.

    Returns:
        ``{"words", "dim", "corpus_words", "seconds", "words_per_second"}``.
    """
    from gensim.models import Word2Vec

    corpus = Path(corpus)
    if not corpus.is_file() or corpus.stat().st_size == 0:
        raise FileNotFoundError(
            f"word2vec corpus not found or empty: {corpus} (run jointgen-preprocess first)"
        )
    from gensim.models.callbacks import CallbackAny2Vec

    from jointgen.utils.progress import progress

    class _Ticks(CallbackAny2Vec):  # gensim calls it after each pass over the corpus
        def __init__(self, advance) -> None:
            self.advance = advance

        def on_epoch_end(self, model) -> None:
            self.advance(1)

    t0 = time.perf_counter()
    with progress(f"word2vec {corpus.name}", total=epochs) as advance:
        model = Word2Vec(
            corpus_file=str(corpus),
            sg=sg,
            hs=hs,
            negative=negative,
            window=window,
            epochs=epochs,
            vector_size=vector_size,
            min_count=min_count,
            sample=sample,
            alpha=alpha,
            workers=workers,
            seed=seed,
            callbacks=[_Ticks(advance)],
        )
    seconds = time.perf_counter() - t0
    wv = model.wv
    if len(wv.index_to_key) == 0:
        raise ValueError(f"{corpus}: no word occurs min_count={min_count} times")
    words = [EOS, *(w for w in wv.index_to_key if w != EOS)]
    vectors = np.zeros((len(words), vector_size), dtype=np.float32)
    vectors[1:] = np.stack([wv[w] for w in words[1:]])
    save_vectors(out_bin, words, vectors)
    if out_txt:
        save_vocab_txt(out_txt, words)
    total = model.corpus_total_words
    return {
        "words": len(words),
        "dim": vector_size,
        "corpus_words": total,
        "seconds": round(seconds, 3),
        "words_per_second": round(total * epochs / seconds),
    }


def word_index(words: list[str]) -> dict[str, int]:
    """word -> token id (row + 2)."""
    return {w: i + FIRST_WORD_ID for i, w in enumerate(words)}
