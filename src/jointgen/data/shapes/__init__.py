"""Procedural captioned-shapes dataset: images, captions and exact attribute labels (spec §4).

Everything is generated from a seed with numpy and Pillow; nothing is downloaded.
"""

from jointgen.data.shapes.attributes import (
    BACKGROUNDS,
    COLOURS,
    LEVEL_ATTRS,
    POSITION_GRIDS,
    RELATIONS,
    SHAPES,
    SIZES,
    AttributeSpace,
)
from jointgen.data.shapes.datamodule import ShapesDataModule, ShapesDataset, missing_masks
from jointgen.data.shapes.generate import (
    GENERATOR_VERSION,
    generate_shapes,
    heldout_pairs,
    load_npz,
    prepare_shapes,
)
from jointgen.data.shapes.grammar import (
    max_caption_words,
    paraphrases,
    parse_caption,
    render_caption,
    vocabulary_words,
)
from jointgen.data.shapes.vocab import BOS, EOS, PAD, UNK, Vocabulary

__all__ = [
    "BACKGROUNDS",
    "BOS",
    "COLOURS",
    "EOS",
    "GENERATOR_VERSION",
    "LEVEL_ATTRS",
    "PAD",
    "POSITION_GRIDS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "UNK",
    "AttributeSpace",
    "ShapesDataModule",
    "ShapesDataset",
    "Vocabulary",
    "generate_shapes",
    "heldout_pairs",
    "load_npz",
    "max_caption_words",
    "missing_masks",
    "paraphrases",
    "parse_caption",
    "prepare_shapes",
    "render_caption",
    "vocabulary_words",
]
