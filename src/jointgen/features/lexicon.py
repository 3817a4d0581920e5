"""Cooking actions and utensils derived from the corpus itself (SEJE phase I, no POS tagger).

SEJE finds actions and utensils by POS-tagging the recipe text once ingredients are removed
(verbs -> actions, nouns -> utensils). Recipe instructions are imperative, which gives two
cheap, tagger-free cues that we use instead:

* **Actions**: a word that starts at least ``action_min_count`` train instruction sentences and
  does so in at least ``action_start_ratio`` of its uses. Imperative verbs ("preheat", "whisk",
  "simmer") mostly open a sentence; nouns and adjectives rarely do. Sentence-opening function
  words ("then", "meanwhile", "in"...) are removed with the :data:`FUNCTION_WORDS` list.
* **Utensils**: the head of a place phrase "in/into/on/onto/from a/an/the [size word] X": X
  counts when it fills that slot at least ``utensil_min_count`` times and in at least
  ``utensil_ratio`` of its uses ("bowl", "skillet", "oven", "saucepan"). Size and state words
  (:data:`MODIFIERS`: "large", "greased"...) are skipped so "in a large bowl" yields "bowl".

Ingredient phrases are excluded from both lists (they are key terms already), as are tokens
that are not purely alphabetic.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FUNCTION_WORDS = frozenset(
    "a an the and or but then meanwhile once when while if after before during until in on "
    "at for to from into onto with without by of this that these those it its you your i we "
    "be is are let so as also now next finally first second third again optional note tip "
    "repeat do don't can may should will".split()
)
PLACE_WORDS = frozenset("in into on onto from".split())
DETERMINERS = frozenset("a an the".split())
MODIFIERS = frozenset(
    "large small medium big little heavy shallow deep clean separate greased prepared hot "
    "cold warm nonstick non stick lightly well buttered oiled lined ungreased covered "
    "preheated 8 9 10 12 13 inch x".split()
)


def _ids_of(words: list[str], vocab: frozenset[str]) -> np.ndarray:
    return np.array([k + 2 for k, w in enumerate(words) if w in vocab], dtype=np.int64)


def derive_lexicon(
    words: list[str],
    chunks: Iterable[np.ndarray],
    first_words: np.ndarray,
    exclude: np.ndarray,
    *,
    action_min_count: int,
    action_start_ratio: float,
    utensil_min_count: int,
    utensil_ratio: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Word ids (internal, >= 2) of the derived actions and utensils.

    Args:
        words: Internal vocabulary (entry k is id k + 2).
        chunks: Word ids of the train instruction sentences, back to back, in one or more
            arrays (chunking bounds memory on the full dataset).
        first_words: The first word id of every train sentence.
        exclude: Ids that can be neither (ingredient phrases).
        action_min_count: Least sentence starts of an action.
        action_start_ratio: Least share of an action's uses that start a sentence.
        utensil_min_count: Least place-phrase heads of a utensil.
        utensil_ratio: Least share of a utensil's uses that head a place phrase.
    """
    size = len(words) + 2
    place = np.zeros(size, dtype=bool)
    place[_ids_of(words, PLACE_WORDS)] = True
    det = np.zeros(size, dtype=bool)
    det[_ids_of(words, DETERMINERS)] = True
    skip = np.zeros(size, dtype=bool)
    skip[_ids_of(words, MODIFIERS)] = True
    total = np.zeros(size, dtype=np.int64)
    heads = np.zeros(size, dtype=np.int64)
    for flat in chunks:
        total += np.bincount(flat, minlength=size)
        heads += np.bincount(flat[_place_heads(flat, place, det, skip)], minlength=size)
    first = np.bincount(np.asarray(first_words, dtype=np.int64), minlength=size)

    ok = np.zeros(size, dtype=bool)
    ok[[k + 2 for k, w in enumerate(words) if w.isalpha() and w not in FUNCTION_WORDS]] = True
    ok[exclude[exclude < size]] = False
    ok[skip] = False
    actions = ok & (first >= action_min_count) & (first >= action_start_ratio * total)
    utensils = ok & (heads >= utensil_min_count) & (heads >= utensil_ratio * total)
    utensils &= ~actions
    return np.flatnonzero(actions), np.flatnonzero(utensils)


def _place_heads(flat: np.ndarray, place, det, skip) -> np.ndarray:
    """Positions of X in "prep det (modifier)* X", vectorised over a flat token stream.

    Sentence boundaries are ignored, which only adds a few spurious cross-sentence heads.
    """
    if len(flat) < 3:
        return np.zeros(0, dtype=np.int64)
    pos = np.flatnonzero(place[flat[:-2]] & det[flat[1:-1]]) + 2
    for _ in range(3):  # skip up to three modifiers
        m = skip[flat[pos]]
        if not m.any():
            break
        pos = np.concatenate([pos[~m], pos[m] + 1])
        pos = pos[pos < len(flat)]
    return pos


def recover_phrases(words: list[str], invalid: np.ndarray, valid: set[str]) -> dict[int, int]:
    """Map rejected ingredient lines to the longest valid phrase they contain.

    The ingredient parser flags lines like "5 dried, pitted dates" invalid; SEJE recovers them
    against the set of true ingredient entities (``pitted_dates``). A rejected line's token is
    its words joined by ``_``; every contiguous word run is looked up, longest first.

    Returns:
        {invalid line id: valid phrase id} for the lines that contain a valid phrase.
    """
    index = {w: k + 2 for k, w in enumerate(words)}
    out = {}
    for i in np.unique(invalid):
        parts = words[int(i) - 2].split("_")
        found = None
        for n in range(len(parts), 0, -1):
            for a in range(len(parts) - n + 1):
                cand = "_".join(parts[a : a + n])
                if cand in valid:
                    found = cand
                    break
            if found:
                break
        if found:
            out[int(i)] = index[found]
    return out
