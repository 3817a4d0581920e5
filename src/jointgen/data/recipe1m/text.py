"""Tokenisation shared by preprocessing, the word2vec corpus and feature engineering.

Text is lowercased and split into runs of letters and digits (an inner apostrophe is kept, so
"don't" stays one token); punctuation is dropped, which matches SEJE's nearly punctuation-free
``tokenized_text.txt``. A detected ingredient such as "olive oil" becomes the single token
``olive_oil`` wherever it occurs in the title or the instructions, as im2recipe does for its
word2vec corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_WORD_OR_BREAK = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\n")


def words(text: str) -> list[str]:
    """Lowercased word tokens of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def phrase_token(text: str) -> str:
    """The single-token form of an ingredient name: its words joined by ``_``."""
    return "_".join(words(text))


def join_phrases(lines: list[str], phrases: Iterable[str]) -> list[list[str]]:
    """Tokenise ``lines`` and merge every occurrence of a multi-word phrase into one token.

    Args:
        lines: Title and instruction texts.
        phrases: Phrase tokens such as ``olive_oil``; longer phrases are merged first so that
            ``extra_virgin_olive_oil`` wins over ``olive_oil``.

    Returns:
        The token list of each line.
    """
    # one string per recipe with line breaks as separate tokens: a phrase never spans lines;
    # a single regex pass over the whole recipe is the hot loop of preprocessing
    joined = "\n".join(line.replace("\n", " ") for line in lines).lower()
    text = " " + " ".join(_WORD_OR_BREAK.findall(joined)) + " "
    multi = sorted((p for p in phrases if "_" in p), key=len, reverse=True)
    for p in multi:
        spaced = " " + p.replace("_", " ") + " "
        if spaced in text:
            # twice: adjacent repeats share the separating space, so one pass misses every other
            joined = " " + p + " "
            text = text.replace(spaced, joined).replace(spaced, joined)
    return [line.split() for line in text.split("\n")]
