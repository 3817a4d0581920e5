"""Recipe1M for SEJE: streaming preprocessing, cache, DataModule, synthetic data, adapters.

See :mod:`jointgen.data.recipe1m.datamodule` for the batch contract.
"""

from jointgen.data.recipe1m.cache import PAD, SPLITS, UNK, Recipe1MCache
from jointgen.data.recipe1m.datamodule import Recipe1MDataModule
from jointgen.data.recipe1m.dataset import Recipe1MDataset, collate_recipes, image_transform
from jointgen.data.recipe1m.jsonstream import JSONFormatError, iter_json_array
from jointgen.data.recipe1m.synthetic import make_recipe1m

__all__ = [
    "PAD",
    "SPLITS",
    "UNK",
    "JSONFormatError",
    "Recipe1MCache",
    "Recipe1MDataModule",
    "Recipe1MDataset",
    "collate_recipes",
    "image_transform",
    "iter_json_array",
    "make_recipe1m",
]
