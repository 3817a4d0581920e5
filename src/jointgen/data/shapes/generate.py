"""Sampling, rendering and caching of the captioned-shapes splits (spec §4).

``generate_shapes`` turns a seed into arrays; ``prepare_shapes`` writes the train, val, test
and (optionally) test_heldout splits of one configuration as ``.npz`` files plus the vocabulary
JSON. Cache names carry a hash of every generation parameter, so a changed parameter never
reads a stale file, and the zip entries carry a fixed timestamp, so identical seeds give
byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from jointgen.data.shapes.attributes import (
    CANONICAL,
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    SIZES,
    AttributeSpace,
    cell_side,
    grid_cells,
)
from jointgen.data.shapes.grammar import max_caption_words, render_caption
from jointgen.data.shapes.render import (
    GLOBAL_NUISANCES,
    OBJECT_NUISANCES,
    render_images,
    sample_nuisances,
)
from jointgen.data.shapes.vocab import Vocabulary
from jointgen.utils.checks import DataFormatError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"  # bump whenever the same parameters would give different data
SPLITS = ("train", "val", "test", "test_heldout")
_STREAMS = {"train": 0, "val": 1, "test": 2, "test_heldout": 3}
_HELDOUT_STREAM = 100
# equivalent radius (radius of the circle of equal area) per size, as a fraction of a cell side;
# pointed shapes reach 1.55 equivalent radii, so a large one plus its shift about fits its cell
SIZE_BINS = {"small": (0.15, 0.18), "medium": (0.22, 0.25), "large": (0.29, 0.32)}
MAX_SHIFT = 0.06  # small translation, as a fraction of a cell side
_PAIR_CENTRES = {"left_of": ((0.25, 0.5), (0.75, 0.5)), "above": ((0.5, 0.25), (0.5, 0.75))}


# --- attributes -----------------------------------------------------------------------------


def heldout_pairs(num_colours: int, fraction: float, seed: int) -> tuple[tuple[int, int], ...]:
    """The (shape, colour) pairs removed from training, chosen from ``seed``.

    Pairs are laid out along shuffled diagonals of the shape × colour table, so every shape and
    every colour keeps most of its pairs in training.
    """
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in [0, 0.5], got {fraction}")
    if fraction == 0.0:
        return ()
    n_shapes = len(SHAPES)
    k = max(1, round(fraction * n_shapes * num_colours))
    rng = np.random.default_rng([seed, _HELDOUT_STREAM])
    shapes, colours = rng.permutation(n_shapes), rng.permutation(num_colours)
    # with k <= S*C/2 the diagonal index i // S stays below C, so all pairs are distinct
    pairs = {
        (int(shapes[i % n_shapes]), int(colours[(i % n_shapes + i // n_shapes) % num_colours]))
        for i in range(k)
    }
    return tuple(sorted(pairs))


def sample_attributes(
    space: AttributeSpace,
    num: int,
    rng: np.random.Generator,
    pairs: tuple[tuple[int, int], ...] | None = None,
) -> np.ndarray:
    """Uniform attribute vectors [num, A]; ``pairs`` restricts every object's (shape, colour)."""
    attrs = np.stack([rng.integers(0, n, num) for n in space.cardinalities], axis=1)
    if pairs is not None:
        table = np.asarray(pairs, dtype=np.int64)
        for shape_col, colour_col in space.pair_columns():
            attrs[:, [shape_col, colour_col]] = table[rng.integers(0, len(table), num)]
    return attrs.astype(np.int64)


def _scene(space: AttributeSpace, attrs: np.ndarray, nuisances: dict) -> tuple[list, dict]:
    """Geometry and colours of every object, plus the background, from attributes."""
    num = len(attrs)
    column = {name: attrs[:, i] for i, name in enumerate(space.attr_names)}
    prototypes = np.asarray([COLOUR_RGB[c] for c in COLOURS], dtype=np.float64)
    if space.level == 6:
        side = 0.5  # two objects share the image in halves whatever the position grid
        is_above = column["relation"] == 1
        centres = [
            np.where(is_above[:, None], _PAIR_CENTRES["above"][k], _PAIR_CENTRES["left_of"][k])
            for k in range(2)
        ]
        suffixes = ("_a", "_b")
    else:
        side = cell_side(space.position_grid)
        if "position" in column:
            centres = [np.asarray(grid_cells(space.position_grid))[column["position"]]]
        else:
            centres = [np.full((num, 2), 0.5)]
        suffixes = ("",)
    objects = []
    for k, suffix in enumerate(suffixes):
        noise = nuisances["objects"][k]
        size = column.get("size" + suffix, np.full(num, CANONICAL["size"]))
        bins = np.asarray([SIZE_BINS[s] for s in SIZES])[size]
        colour = column.get("colour" + suffix, np.full(num, CANONICAL["colour"]))
        shift = np.stack([noise["shift_x"], noise["shift_y"]], axis=1) * MAX_SHIFT * side
        objects.append(
            {
                "shape": np.asarray(SHAPES)[column["shape" + suffix]],
                "centre": centres[k] + shift,
                "radius": (bins[:, 0] + noise["radius"] * (bins[:, 1] - bins[:, 0])) * side,
                "rotation": noise["rotation"],
                "stroke": noise["stroke"],
                "rgb": prototypes[colour] + noise["jitter"],
                "shift": shift,
            }
        )
    dark = column.get("background", np.full(num, CANONICAL["background"])) == 1
    return objects, {"dark": dark, **nuisances["global"]}


def private_names(level: int) -> tuple[str, ...]:
    """Column names of the ``private`` array (object nuisances get _a/_b suffixes at level 6)."""
    suffixes = ("_a", "_b") if level == 6 else ("",)
    return tuple(n + s for s in suffixes for n in OBJECT_NUISANCES) + GLOBAL_NUISANCES


# --- generation -----------------------------------------------------------------------------


def generate_shapes(
    level: int,
    num: int,
    image_size: int = 32,
    seed: int = 0,
    *,
    paraphrase_rate: float = 0.5,
    num_colours: int = 6,
    position_grid: str = "quadrants",
    max_caption_len: int = 16,
    pairs: tuple[tuple[int, int], ...] | None = None,
    stream: int = 0,
) -> dict[str, np.ndarray]:
    """Generate ``num`` captioned images as numpy arrays.

    Args:
        level: dataset level, 1..6.
        num: number of samples.
        image_size: side of the square images in pixels.
        seed: base seed; with ``stream`` it fixes every array bit for bit.
        paraphrase_rate: probability of a paraphrased rather than canonical caption.
        num_colours: colours in use, 2..8.
        position_grid: ``"quadrants"`` or ``"grid3"``.
        max_caption_len: token length of ``tokens``, EOS included.
        pairs: allowed (shape, colour) pairs for every object; ``None`` allows all.
        stream: independent random stream (one per split), so splits never share draws.

    Returns:
        ``images`` [N, H, W, 3] uint8, ``captions`` [N] str, ``tokens`` [N, L] int64, ``attrs``
        [N, A] int64, ``attr_names``, ``private`` [N, P] float32, ``private_names``, ``level``,
        ``seed``, ``stream``, ``generator_version``, ``vocab`` (all tokens) and ``params``
        (the generation parameters as JSON). Private columns: rotation (degrees), radius
        (equivalent radius / image side), shift_x and shift_y (/ image side), stroke (width /
        radius, 0 = filled), texture (index into ``render.TEXTURES``), texture_phase (0..1),
        texture_angle (degrees) and brightness (factor).
    """
    space = AttributeSpace(level, num_colours, position_grid)
    needed = max_caption_words(space) + 1
    if max_caption_len < needed:
        raise ValueError(f"max_caption_len must be at least {needed} at level {level}")
    if pairs is not None and not pairs:
        raise ValueError("pairs must not be empty")
    # separate streams so that, e.g., a new paraphrase rate leaves the images unchanged
    attr_ss, nuisance_ss, caption_ss, noise_ss = np.random.SeedSequence([seed, stream]).spawn(4)
    attrs = sample_attributes(space, num, np.random.default_rng(attr_ss), pairs)
    nuisances = sample_nuisances(np.random.default_rng(nuisance_ss), num, space.num_objects)
    objects, background = _scene(space, attrs, nuisances)
    images = render_images(objects, background, image_size, np.random.default_rng(noise_ss))

    caption_rng = np.random.default_rng(caption_ss)
    captions = [render_caption(a, space, caption_rng, paraphrase_rate) for a in attrs.tolist()]
    vocab = Vocabulary.from_grammar()

    private = []
    for obj in objects:
        private += [obj["rotation"], obj["radius"], obj["shift"][:, 0], obj["shift"][:, 1]]
        private.append(obj["stroke"])
    private += [background[name] for name in GLOBAL_NUISANCES]
    params = {
        "level": level,
        "num": num,
        "image_size": image_size,
        "seed": seed,
        "stream": stream,
        "paraphrase_rate": paraphrase_rate,
        "num_colours": num_colours,
        "position_grid": position_grid,
        "max_caption_len": max_caption_len,
        "pairs": [list(p) for p in pairs] if pairs is not None else None,
    }
    return {
        "images": images,
        "captions": np.asarray(captions, dtype=str),
        "tokens": vocab.encode_batch(captions, max_caption_len),
        "attrs": attrs,
        "attr_names": np.asarray(space.attr_names, dtype=str),
        "private": np.stack(private, axis=1).astype(np.float32),
        "private_names": np.asarray(private_names(level), dtype=str),
        "level": np.int64(level),
        "seed": np.int64(seed),
        "stream": np.int64(stream),
        "generator_version": np.asarray(GENERATOR_VERSION),
        "vocab": np.asarray(vocab.itos, dtype=str),
        "params": np.asarray(json.dumps(params, sort_keys=True)),
    }


# --- cache ----------------------------------------------------------------------------------


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an ``.npz`` atomically, with fixed zip timestamps (reproducible)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    os.replace(tmp, path)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a split written by ``save_npz`` fully into memory.

    Raises:
        DataFormatError: the file is damaged (names it).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise
    # a damaged zip fails with BadZipFile, zlib.error, EOFError, ValueError, ...
    except Exception as e:  # noqa: BLE001
        raise DataFormatError(f"{path}: damaged cache file ({type(e).__name__}: {e})") from None


def cache_paths(data_dir: str | os.PathLike, **params) -> dict[str, Path]:
    """Split and vocabulary file names of one configuration; the hash covers ``params``."""
    params = {**params, "generator_version": GENERATOR_VERSION}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    stem = f"shapes_L{params['level']}_{params['image_size']}px_{digest}"
    splits = SPLITS if params.get("heldout_fraction", 0.0) > 0 else SPLITS[:3]
    paths = {split: Path(data_dir) / f"{stem}_{split}.npz" for split in splits}
    paths["vocab"] = Path(data_dir) / f"{stem}_vocab.json"
    return paths


def prepare_shapes(
    data_dir: str | os.PathLike,
    *,
    level: int,
    image_size: int,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int,
    paraphrase_rate: float,
    num_colours: int,
    position_grid: str,
    heldout_fraction: float,
    max_caption_len: int,
) -> dict[str, Path]:
    """Generate and cache every split of a configuration unless its files already exist.

    Held-out (shape, colour) pairs are excluded from train, val and test and make up the
    whole ``test_heldout`` split (``num_test`` samples), written only when the fraction is > 0.

    Returns:
        The paths of the split files (keys ``train``, ``val``, ``test``, maybe
        ``test_heldout``) and of the vocabulary JSON (key ``vocab``).
    """
    if heldout_fraction > 0 and level < 3:
        raise ValueError(f"heldout_fraction needs captioned colours (level >= 3), got {level}")
    params = {
        "level": level,
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "seed": seed,
        "paraphrase_rate": paraphrase_rate,
        "num_colours": num_colours,
        "position_grid": position_grid,
        "heldout_fraction": heldout_fraction,
        "max_caption_len": max_caption_len,
    }
    paths = cache_paths(data_dir, **params)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    held = heldout_pairs(num_colours, heldout_fraction, seed)
    every = [(s, c) for s in range(len(SHAPES)) for c in range(num_colours)]
    kept = tuple(p for p in every if p not in held) if held else None
    sizes = {"train": num_train, "val": num_val, "test": num_test, "test_heldout": num_test}
    for split, path in paths.items():
        if split == "vocab" or path.exists():
            continue
        log.info("generating shapes %s split (%d samples) into %s", split, sizes[split], path)
        arrays = generate_shapes(
            level,
            sizes[split],
            image_size,
            seed,
            paraphrase_rate=paraphrase_rate,
            num_colours=num_colours,
            position_grid=position_grid,
            max_caption_len=max_caption_len,
            pairs=held if split == "test_heldout" else kept,
            stream=_STREAMS[split],
        )
        save_npz(path, arrays)
    if not paths["vocab"].exists():
        Vocabulary.from_grammar().save(paths["vocab"])
    return paths
