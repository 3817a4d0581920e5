"""Word-level vocabulary shared by every text model trained on the captioned shapes.

Ids 0..3 are the special tokens PAD, BOS, EOS and UNK; the words follow in sorted order, so the
vocabulary built from the grammar is identical on every machine and for every dataset level.
Encoded captions end with EOS and are padded with PAD to a fixed length (spec §3.4).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Vocabulary:
    """Maps caption words to integer ids and back.

    Args:
        words: the word list; order is kept, duplicates and special tokens are rejected.

    Example:
        >>> vocab = Vocabulary(["a", "circle", "red"])
        >>> vocab.encode("a red circle", max_len=5)
        [4, 6, 5, 2, 0]
        >>> vocab.decode([4, 6, 5, 2, 0])
        'a red circle'
    """

    PAD, BOS, EOS, UNK = PAD, BOS, EOS, UNK

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        if set(words) & set(SPECIAL_TOKENS):
            raise ValueError(f"vocabulary words must not include {SPECIAL_TOKENS}")
        self.itos = list(SPECIAL_TOKENS) + words
        self.stoi = {token: i for i, token in enumerate(self.itos)}

    @classmethod
    def from_grammar(cls) -> Vocabulary:
        """The vocabulary of every caption the shapes grammar can produce."""
        from jointgen.data.shapes.grammar import vocabulary_words

        return cls(vocabulary_words())

    @property
    def words(self) -> list[str]:
        """The non-special tokens."""
        return self.itos[len(SPECIAL_TOKENS) :]

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({len(self.words)} words + {len(SPECIAL_TOKENS)} special tokens)"

    def encode(self, text: str, max_len: int, bos: bool = False) -> list[int]:
        """Ids of ``text`` followed by EOS, truncated and PAD-padded to ``max_len``.

        A caption longer than ``max_len - 1`` words loses its tail but always keeps the EOS.

        Args:
            text: white-space separated words; unknown words become UNK.
            max_len: output length, counting EOS (and BOS when ``bos``).
            bos: prepend BOS (for autoregressive decoders' inputs).
        """
        if max_len < 1 + bos:
            raise ValueError(f"max_len must leave room for EOS, got {max_len}")
        ids = [self.stoi.get(w, UNK) for w in text.split()]
        ids = ([BOS] if bos else []) + ids[: max_len - 1 - bos] + [EOS]
        return ids + [PAD] * (max_len - len(ids))

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Encode many captions into an int64 array [N, max_len]."""
        out = np.full((len(texts), max_len), PAD, dtype=np.int64)
        for i, text in enumerate(texts):
            out[i] = self.encode(text, max_len)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` up to the first EOS; PAD and BOS are skipped, UNK prints as <unk>."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIAL_TOKENS[UNK])
        return " ".join(words)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically: a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"special_tokens": SPECIAL_TOKENS, "words": self.words}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary written by ``save``."""
        data = json.loads(Path(path).read_text())
        if tuple(data["special_tokens"]) != SPECIAL_TOKENS:
            found = data["special_tokens"]
            raise ValueError(f"{path}: special tokens {found} differ from {SPECIAL_TOKENS}")
        return cls(data["words"])
