"""Caption grammar of the captioned-shapes dataset and its exact inverse parser.

A caption is one template filled with one surface phrase per slot. Templates are token lists
in which ``{name}`` marks a slot: attribute slots (``{shape}``, ``{colour_a}``, ...) take a
phrase from the synonym tables, ``{prep}`` takes "in" or "at", and the determiner slots
(``{det}``, ``{the}``, ``{a}``) follow one determiner style for the whole caption: indefinite
("a large red circle in the top left"), definite ("the large red circle ...") or none
("large red circle in top left"). Paraphrasing is the text-private variation of spec §4.

The parser compiles every template of a level into one regular expression whose slots are
alternations over the same tables, so parsing is the exact inverse of rendering by
construction; ``tests/test_shapes.py`` checks it on every combination, template and synonym.
"""

from __future__ import annotations

import itertools
import re
from functools import cache

import numpy as np

from jointgen.data.shapes.attributes import (
    COLOURS,
    LEVELS,
    POSITION_GRIDS,
    AttributeSpace,
    base_name,
)

SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
    "heart": ("heart",),
}
SIZE_WORDS = {"small": ("small", "tiny"), "medium": ("medium",), "large": ("large", "big")}
COLOUR_WORDS = {name: (name,) for name in COLOURS}
BACKGROUND_WORDS = {"light": ("light", "bright"), "dark": ("dark", "black")}
PREPOSITIONS = ("in", "at")
# object a is the subject; the swapped phrases describe the same scene with b as the subject
RELATION_FORWARD = {"left_of": ("left of", "to the left of"), "above": ("above", "over")}
RELATION_SWAPPED = {"left_of": ("right of", "to the right of"), "above": ("below", "under")}
_ROW_WORDS = {
    "top": ("top", "upper"),
    "middle": ("middle", "centre"),
    "bottom": ("bottom", "lower"),
}
_COLUMN_WORDS = {"left": ("left",), "centre": ("centre", "middle"), "right": ("right",)}

STYLES = ("indefinite", "definite", "none")
_DETERMINERS = {
    "indefinite": {"det": "a", "the": "the", "a": "a"},
    "definite": {"det": "the", "the": "the", "a": "the"},
    "none": {"det": "", "the": "", "a": ""},
}
# what the parser accepts in a determiner slot ("an" is the rendered form of "a" before a vowel)
_DETERMINER_PATTERNS = {"det": "a|an|the", "the": "the", "a": "a|the"}
_SLOT = re.compile(r"^\{(\w+)\}$")


def position_phrases(name: str) -> tuple[str, ...]:
    """Synonymous phrases for a position cell name, canonical first."""
    if name == "centre":
        return ("centre", "middle")
    row, column = name.split()
    return tuple(f"{r} {c}" for r in _ROW_WORDS[row] for c in _COLUMN_WORDS[column])


def _phrases(slot: str, value: str) -> tuple[str, ...]:
    """Surface phrases of one attribute value (for relations, the forward or swapped form)."""
    if slot == "rel_forward":
        return RELATION_FORWARD[value]
    if slot == "rel_swapped":
        return RELATION_SWAPPED[value]
    base = base_name(slot)
    if base == "position":
        return position_phrases(value)
    tables = {
        "shape": SHAPE_WORDS,
        "size": SIZE_WORDS,
        "colour": COLOUR_WORDS,
        "background": BACKGROUND_WORDS,
    }
    return tables[base][value]


def _attribute(slot: str) -> str:
    return "relation" if slot.startswith("rel_") else slot


# --- templates ------------------------------------------------------------------------------


@cache
def templates(space: AttributeSpace) -> tuple[tuple[str, ...], ...]:
    """Every template of a level as token tuples; the first one is the canonical template."""
    if space.level == 6:
        return _pair_templates()
    names = space.attr_names
    adjectives = [f"{{{n}}}" for n in ("size", "colour") if n in names]
    noun = ["{det}", *adjectives, "{shape}"]
    loc = ["{prep}", "{the}", "{position}"] if "position" in names else []
    bg = ["on", "{a}", "{background}", "background"] if "background" in names else []
    out = [
        noun + loc + bg,
        ["there", "is"] + noun + loc + bg,
        ["the", "image", "shows"] + noun + loc + bg,
    ]
    if bg:  # background first
        out.append(bg + ["there", "is"] + noun + loc)
    if adjectives:  # attributes after the noun
        predicate = [adjectives[0]] + (["and", adjectives[1]] if len(adjectives) > 1 else [])
        out.append(["{det}", "{shape}", "which", "is"] + predicate + loc + bg)
    return tuple(tuple(t) for t in out)


def _pair_templates() -> tuple[tuple[str, ...], ...]:
    forms = (
        ("NP1", "REL", "NP2"),
        ("there", "is", "NP1", "REL", "NP2"),
        ("the", "image", "shows", "NP1", "REL", "NP2"),
        ("NP1", "is", "REL", "NP2"),
        ("REL", "NP2", "there", "is", "NP1"),
    )
    noun_a = ("{det}", "{colour_a}", "{shape_a}")
    noun_b = ("{det}", "{colour_b}", "{shape_b}")
    out = []
    for form in forms:
        for swapped in (False, True):
            parts = {
                "NP1": noun_b if swapped else noun_a,
                "NP2": noun_a if swapped else noun_b,
                "REL": ("{rel_swapped}",) if swapped else ("{rel_forward}",),
            }
            out.append(tuple(tok for part in form for tok in parts.get(part, (part,))))
    return tuple(out)


def _slot_options(slot: str, named: dict[str, str], style: str) -> tuple[str, ...]:
    if slot in _DETERMINERS[style]:
        return (_DETERMINERS[style][slot],)
    if slot == "prep":
        return PREPOSITIONS
    return _phrases(slot, named[_attribute(slot)])


def _join(phrases: list[str]) -> str:
    words = " ".join(phrases).split()
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


# --- rendering ------------------------------------------------------------------------------


def render_caption(
    attrs: tuple[int, ...] | list[int] | np.ndarray,
    space: AttributeSpace,
    rng: np.random.Generator | None = None,
    paraphrase_rate: float = 0.0,
) -> str:
    """One caption for an attribute vector.

    Args:
        attrs: attribute indices in ``space.attr_names`` order.
        space: the level and value tables.
        rng: random source for paraphrases; ``None`` always gives the canonical caption.
        paraphrase_rate: probability of a random template, determiner style and synonyms
            instead of the canonical caption (canonical template, indefinite, first synonyms).
    """
    named = space.describe(tuple(int(a) for a in attrs))
    tpls = templates(space)
    paraphrase = rng is not None and paraphrase_rate > 0 and rng.random() < paraphrase_rate
    template = tpls[rng.integers(len(tpls))] if paraphrase else tpls[0]
    style = STYLES[rng.integers(len(STYLES))] if paraphrase else STYLES[0]
    phrases = []
    for tok in template:
        slot = _SLOT.match(tok)
        if slot is None:
            phrases.append(tok)
            continue
        options = _slot_options(slot.group(1), named, style)
        phrases.append(options[rng.integers(len(options))] if paraphrase else options[0])
    return _join(phrases)


def paraphrases(attrs: tuple[int, ...] | list[int], space: AttributeSpace) -> list[str]:
    """Every caption the grammar can produce for ``attrs``; the canonical one comes first."""
    named = space.describe(tuple(int(a) for a in attrs))
    out: dict[str, None] = {}  # ordered set
    for template in templates(space):
        for style in STYLES:
            choices = [
                _slot_options(m.group(1), named, style) if (m := _SLOT.match(tok)) else (tok,)
                for tok in template
            ]
            for combo in itertools.product(*choices):
                out[_join(list(combo))] = None
    return list(out)


def max_caption_words(space: AttributeSpace) -> int:
    """Length in words of the longest caption of this space (add one for EOS)."""
    longest = 0
    for template in templates(space):
        total = 0
        for tok in template:
            slot = _SLOT.match(tok)
            if slot is None:
                total += 1
            elif slot.group(1) in _DETERMINER_PATTERNS:
                total += 1
            elif slot.group(1) == "prep":
                total += max(len(p.split()) for p in PREPOSITIONS)
            else:
                values = space.values[_attribute(slot.group(1))]
                total += max(len(p.split()) for v in values for p in _phrases(slot.group(1), v))
        longest = max(longest, total)
    return longest


def vocabulary_words() -> tuple[str, ...]:
    """Every word any level, grid or colour count can produce, sorted."""
    words = set()
    for level, grid in itertools.product(LEVELS, POSITION_GRIDS):
        space = AttributeSpace(level, num_colours=len(COLOURS), position_grid=grid)
        for template in templates(space):
            for tok in template:
                slot = _SLOT.match(tok)
                if slot is None:
                    words.add(tok)
                elif slot.group(1) in _DETERMINER_PATTERNS:
                    words.update(_DETERMINER_PATTERNS[slot.group(1)].split("|"))
                elif slot.group(1) == "prep":
                    words.update(PREPOSITIONS)
                else:
                    for value in space.values[_attribute(slot.group(1))]:
                        for phrase in _phrases(slot.group(1), value):
                            words.update(phrase.split())
    return tuple(sorted(words))


# --- parsing --------------------------------------------------------------------------------


@cache
def _parsers(space: AttributeSpace) -> tuple[tuple[re.Pattern, dict], ...]:
    """One (regex, {group: (column, phrase -> value index)}) per template."""
    parsers = []
    for template in templates(space):
        pattern, groups = "", {}
        for tok in template:
            slot = _SLOT.match(tok)
            if slot is None:
                pattern += re.escape(tok) + " "
                continue
            name = slot.group(1)
            if name in _DETERMINER_PATTERNS:
                pattern += f"(?:(?:{_DETERMINER_PATTERNS[name]}) )?"
                continue
            if name == "prep":
                pattern += f"(?:{'|'.join(PREPOSITIONS)}) "
                continue
            attribute = _attribute(name)
            lookup = {
                phrase: index
                for index, value in enumerate(space.values[attribute])
                for phrase in _phrases(name, value)
            }
            # longest first, so "centre left" is tried before "centre"
            alternatives = "|".join(re.escape(p) for p in sorted(lookup, key=len, reverse=True))
            pattern += f"(?P<{name}>{alternatives}) "
            groups[name] = (space.attr_names.index(attribute), lookup)
        parsers.append((re.compile(pattern), groups))
    return tuple(parsers)


def normalise(text: str) -> str:
    """Lower-case, drop sentence punctuation and collapse white space."""
    return " ".join(re.sub(r"[.,;!?]", " ", text.lower()).split())


def parse_caption(
    text: str, level: int, *, num_colours: int = 6, position_grid: str = "quadrants"
) -> tuple[int, ...] | None:
    """Attribute vector of a caption, or ``None`` when it is unparseable at this level.

    Args:
        text: a caption, e.g. ``"a large red circle"``; case and final punctuation are ignored.
        level: dataset level, 1..6.
        num_colours: colours of the dataset; a colour outside them makes the caption unparseable.
        position_grid: ``"quadrants"`` or ``"grid3"``, which fixes the position indices.
    """
    space = AttributeSpace(level, num_colours, position_grid)
    target = normalise(text) + " "
    for pattern, groups in _parsers(space):
        match = pattern.fullmatch(target)
        if match is None:
            continue
        attrs = [0] * len(space.attr_names)
        for name, (column, lookup) in groups.items():
            attrs[column] = lookup[match.group(name)]
        return tuple(attrs)
    return None
