"""Attribute tables and difficulty levels of the captioned-shapes dataset (spec §4).

Every captioned attribute is stored as an integer index into one of the tables below, so an
attribute vector is a tuple of ints whose meaning is given by ``AttributeSpace.attr_names``.

Levels follow the CdSprites+ ladder (arXiv 2209.03048): each level captions one more attribute.
Attributes a level does not caption are held at a fixed canonical value in the image (medium,
red, centred, light background), so everything visible that the caption does not mention is a
private nuisance (rotation, stroke, texture, brightness), never an uncaptioned attribute.
Level 6 shows two objects and captions the colour and shape of each plus their relation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

SHAPES = ("circle", "square", "triangle", "diamond", "star", "heart")
SIZES = ("small", "medium", "large")
BACKGROUNDS = ("light", "dark")
# the relation is always stated from object a: a is left of b, or a is above b
RELATIONS = ("left_of", "above")

# Colour prototypes (RGB), ordered so that every prefix keeps hues far apart: the default six sit
# about 60 degrees apart, orange and pink (7th, 8th) halve two gaps to 30 degrees. All are
# saturated, so none is close to the grey light or dark backgrounds.
COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple", "orange", "pink")
COLOUR_RGB = {
    "red": (225, 40, 40),
    "yellow": (215, 215, 30),
    "green": (40, 190, 40),
    "cyan": (30, 190, 200),
    "blue": (50, 70, 225),
    "purple": (160, 50, 220),
    "orange": (240, 130, 20),
    "pink": (235, 60, 150),
}
MAX_COLOURS = len(COLOURS)

# Positions: names are (row, column) words; the caption grammar adds synonyms on top.
POSITION_GRIDS = {
    "quadrants": ("top left", "top right", "bottom left", "bottom right"),
    "grid3": (
        "top left",
        "top centre",
        "top right",
        "middle left",
        "centre",
        "middle right",
        "bottom left",
        "bottom centre",
        "bottom right",
    ),
}

# Captioned attributes per level; level 6 is the two-object binding test.
LEVEL_ATTRS = {
    1: ("shape",),
    2: ("shape", "size"),
    3: ("shape", "size", "colour"),
    4: ("shape", "size", "colour", "position"),
    5: ("shape", "size", "colour", "position", "background"),
    6: ("shape_a", "colour_a", "relation", "shape_b", "colour_b"),
}
LEVELS = tuple(LEVEL_ATTRS)

# Values used in the image for attributes a level does not caption.
CANONICAL = {"size": SIZES.index("medium"), "colour": 0, "background": 0}


def grid_cells(position_grid: str) -> tuple[tuple[float, float], ...]:
    """Cell centres (x, y) as fractions of the image side, in ``POSITION_GRIDS`` order."""
    n = 2 if position_grid == "quadrants" else 3
    return tuple(((c + 0.5) / n, (r + 0.5) / n) for r in range(n) for c in range(n))


def cell_side(position_grid: str) -> float:
    """Side of one position cell as a fraction of the image side; object sizes scale with it."""
    return 0.5 if position_grid == "quadrants" else 1.0 / 3.0


@dataclass(frozen=True)
class AttributeSpace:
    """The captioned attributes of one dataset configuration.

    Args:
        level: difficulty level, 1..6.
        num_colours: how many of ``COLOURS`` are used, 2..8.
        position_grid: ``"quadrants"`` (4 cells) or ``"grid3"`` (3×3 cells).
    """

    level: int
    num_colours: int = 6
    position_grid: str = "quadrants"

    def __post_init__(self) -> None:
        if self.level not in LEVEL_ATTRS:
            raise ValueError(f"level must be in 1..6, got {self.level}")
        if not 2 <= self.num_colours <= MAX_COLOURS:
            raise ValueError(f"num_colours must be in 2..{MAX_COLOURS}, got {self.num_colours}")
        if self.position_grid not in POSITION_GRIDS:
            grids, grid = sorted(POSITION_GRIDS), self.position_grid
            raise ValueError(f"position_grid must be one of {grids}, got {grid!r}")

    @property
    def attr_names(self) -> tuple[str, ...]:
        """Column names of the attribute vector at this level."""
        return LEVEL_ATTRS[self.level]

    @cached_property
    def values(self) -> dict[str, tuple[str, ...]]:
        """Value names of every captioned attribute (index = stored integer)."""
        table = {
            "shape": SHAPES,
            "size": SIZES,
            "colour": COLOURS[: self.num_colours],
            "position": POSITION_GRIDS[self.position_grid],
            "background": BACKGROUNDS,
            "relation": RELATIONS,
        }
        return {name: table[base_name(name)] for name in self.attr_names}

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Number of values of each attribute, in ``attr_names`` order."""
        return tuple(len(self.values[name]) for name in self.attr_names)

    @property
    def num_objects(self) -> int:
        return 2 if self.level == 6 else 1

    def combinations(self) -> Iterator[tuple[int, ...]]:
        """Every attribute vector of this space, in lexicographic order."""
        return itertools.product(*(range(n) for n in self.cardinalities))

    def describe(self, attrs: tuple[int, ...]) -> dict[str, str]:
        """Value names of an attribute vector, keyed by attribute name."""
        return {name: self.values[name][i] for name, i in zip(self.attr_names, attrs)}

    def pair_columns(self) -> tuple[tuple[int, int], ...]:
        """Columns of each object's (shape, colour) pair; empty below level 3."""
        names = self.attr_names
        if self.level == 6:
            a = (names.index("shape_a"), names.index("colour_a"))
            return (a, (names.index("shape_b"), names.index("colour_b")))
        if "colour" in names:
            return ((names.index("shape"), names.index("colour")),)
        return ()


def base_name(name: str) -> str:
    """Attribute table behind a column name: ``shape_a`` and ``shape_b`` both use ``shape``."""
    return name.removesuffix("_a").removesuffix("_b")
