"""Image attribute extraction for the captioned shapes (spec §5), analytic and learned.

The analytic extractor inverts the known renderer (``jointgen.data.shapes.render``):
backgrounds and textures are grey, so an object pixel's saturation (max - min channel) is its
coverage times the object's saturation, exactly, before rounding. From that coverage map:

* colour: the alpha-weighted circular mean hue against the named colour prototypes (adding grey
  or scaling brightness leaves the hue unchanged, so edge pixels vote for the right colour);
* size: the area of the hole-filled coverage (shapes are scaled to equal area per size bin;
  outlines are drawn inwards, so filling the hole recovers the polygon);
* position: the filled mask's centroid, snapped to the nearest cell centre;
* background: mean brightness of the uncovered pixels (light ≈ 215, dark ≈ 40 grey levels);
* shape: template matching of the filled mask against every prototype polygon rendered at the
  measured centre and equal-area radius over the allowed rotations;
* level 6: the relation from the axis of largest spread, then each half as one object.

An attribute that cannot be read (no saturated pixels, e.g. a blank generated image) is -1,
which the coherence metrics count as wrong. ``image_attributes`` also dispatches to the learned
``AttributeClassifier`` (``jointgen.eval.classifier``).
"""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from jointgen.data.shapes.attributes import (
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    SIZES,
    AttributeSpace,
    cell_side,
    grid_cells,
)
from jointgen.data.shapes.generate import SIZE_BINS
from jointgen.data.shapes.render import MAX_ROTATION, SUPERSAMPLE, UNIT_SHAPES

if TYPE_CHECKING:
    from jointgen.eval.classifier import AttributeClassifier

MIN_OBJECT_SAT = 30.0  # weakest object saturation (green at brightness 0.9 is ~135)
NOISE_SAT = 4.0  # saturation below this is rounding noise, not object
CHUNK = 256  # images processed at once
FLOOR = 0.15  # coverage below this share of the object's saturation counts as noise
BACKGROUND_SPLIT = 128.0  # grey level between the light and dark backgrounds
ROTATIONS = np.arange(-MAX_ROTATION, MAX_ROTATION + 1e-6, 5.0)
PROTO_HUE = np.array([colorsys.rgb_to_hsv(*np.divide(COLOUR_RGB[c], 255.0))[0] for c in COLOURS])
# size thresholds halfway between the equivalent-radius bins (fractions of a cell side)
SIZE_EDGES = np.array(
    [(SIZE_BINS[a][1] + SIZE_BINS[b][0]) / 2 for a, b in zip(SIZES[:-1], SIZES[1:])]
)


# --- image conversion -----------------------------------------------------------------------


def to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images as a uint8 numpy array [N, H, W, 3].

    Args:
        images: uint8 or float (in [0, 1]) images, [N, H, W, 3] or [N, 3, H, W], numpy or torch.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"expected images [N, H, W, 3] or [N, 3, H, W], got {images.shape}")
    if images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        images = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(images)


# --- coverage and geometry ------------------------------------------------------------------


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Pixels with at least one set 4-neighbour, bool [N, H, W]."""
    out = np.zeros_like(mask)
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    out[:, :, 1:] |= mask[:, :, :-1]
    out[:, :, :-1] |= mask[:, :, 1:]
    return out


def fill_holes(alpha: np.ndarray) -> np.ndarray:
    """Coverage with the inside of outlines filled: float32 [N, H, W] -> [N, H, W].

    Pixels reachable from the border through low coverage (4-connected, so thin diagonal
    strokes still close an outline) keep their coverage, as do the stroke pixels touching
    them; everything enclosed counts as fully covered.
    """
    low = alpha < 0.5
    border = np.zeros_like(low)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    outside = low & border
    while True:
        grown = (outside | _neighbours(outside)) & low
        if np.array_equal(grown, outside):
            break
        outside = grown
    edge = outside | _neighbours(outside)
    return np.where(edge, alpha, 1.0).astype(np.float32)


def _coverage(sat: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-object coverage from saturation; ``regions`` bool [N, K, H, W] -> alpha, present.

    Generated images are not clean renders: saturation below ``FLOOR`` of the object's own is
    treated as noise, and so are isolated pixels (every stroke is at least 1.5 px wide).
    """
    sat_k = np.where(regions, sat[:, None], 0.0)
    peak = sat_k.reshape(*sat_k.shape[:2], -1).max(-1)  # fully covered pixels: the object's own
    present = peak >= MIN_OBJECT_SAT
    alpha = np.clip(sat_k / np.maximum(peak, 1.0)[..., None, None], 0.0, 1.0)
    alpha = np.where(sat_k >= np.maximum(NOISE_SAT, FLOOR * peak)[..., None, None], alpha, 0.0)
    flat = alpha.reshape(-1, *alpha.shape[2:])
    isolated = ~_neighbours(flat > 0).reshape(alpha.shape)
    alpha = np.where(isolated | ~present[..., None, None], 0.0, alpha)
    return alpha.astype(np.float32), present


def _hue_index(images: np.ndarray, alpha: np.ndarray, num_colours: int) -> np.ndarray:
    """Nearest prototype of the alpha-weighted circular mean hue, per object [N, K]."""
    rgb = images.astype(np.float32)[:, None]  # [N, 1, H, W, 3]
    hi, lo = rgb.max(-1), rgb.min(-1)
    r, g, b = (rgb[..., i] for i in range(3))
    span = np.maximum(hi - lo, 1e-6)
    hue = np.select(
        [hi == r, hi == g], [((g - b) / span) % 6.0, (b - r) / span + 2.0], (r - g) / span + 4.0
    ) * (np.pi / 3.0)
    weight = np.where(alpha > 0.5, alpha, 0.0)
    mean = np.arctan2((weight * np.sin(hue)).sum((-1, -2)), (weight * np.cos(hue)).sum((-1, -2)))
    proto = PROTO_HUE[:num_colours] * 2.0 * np.pi
    dist = np.abs(np.angle(np.exp(1j * (mean[..., None] - proto))))
    return dist.argmin(-1)


# --- shape templates ------------------------------------------------------------------------


def _template(
    shape: str, centre: np.ndarray, radius: float, rotation: float, box: tuple
) -> np.ndarray:
    """Filled coverage of a prototype in the pixel window ``box`` = (x0, y0, size); mirrors
    ``render.shape_mask`` (same polygon, rotation convention and pixel-centre offset)."""
    x0, y0, size = box
    theta = np.deg2rad(rotation)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = UNIT_SHAPES[shape] @ rot.T * (radius * SUPERSAMPLE)
    xs = (centre[0] - x0) * SUPERSAMPLE + pts[:, 0] - 0.5
    ys = (centre[1] - y0) * SUPERSAMPLE - pts[:, 1] - 0.5
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _fit_template(filled: np.ndarray, centre: np.ndarray, radius: float) -> tuple[int, float]:
    """Closest prototype (L1) to one filled coverage map [H, W], and its fitted radius.

    The shape and rotation are searched at the equal-area radius; the radius is then refined
    on the best template, which removes Pillow's rasterisation bias (filled polygons come out
    slightly larger than nominal) and the holes of thick star outlines, whose concave corners
    leave gaps that the hole filling cannot close.

    Args:
        filled: the object's hole-filled coverage, zero outside its region.
        centre: area centroid (x, y) in pixels.
        radius: equivalent radius in pixels, from the filled area.

    Returns:
        The index into ``SHAPES`` and the equivalent radius in pixels.
    """
    half = int(np.ceil(1.55 * 1.25 * radius)) + 2  # pointed shapes reach 1.55 radii
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    box = (cx - half, cy - half, 2 * half)
    crop = np.pad(filled, 2 * half)[cy + half : cy + 3 * half, cx + half : cx + 3 * half]

    def error(shape: str, rotation: float, r: float) -> float:
        return float(np.abs(_template(shape, centre, r, rotation, box) - crop).sum())

    candidates = [(s, a) for s in SHAPES for a in (ROTATIONS if s != "circle" else (0.0,))]
    shape, rotation = min(candidates, key=lambda c: error(c[0], c[1], radius))
    coarse = min(np.arange(0.8, 1.21, 0.04), key=lambda f: error(shape, rotation, f * radius))
    fine = min(
        coarse + np.arange(-0.03, 0.031, 0.01), key=lambda f: error(shape, rotation, f * radius)
    )
    return SHAPES.index(shape), float(fine * radius)


# --- analytic extraction --------------------------------------------------------------------


def analytic_attributes(
    images: np.ndarray | torch.Tensor,
    level: int,
    *,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> np.ndarray:
    """Read the captioned attributes off rendered images, without any learning.

    Args:
        images: [N, H, W, 3] or [N, 3, H, W], uint8 or float in [0, 1].
        level: dataset level, 1..6; fixes the columns (``AttributeSpace(level).attr_names``).
        num_colours: colours of the dataset (nearest prototype among the first ``num_colours``).
        position_grid: ``"quadrants"`` or ``"grid3"``.

    Returns:
        int64 [N, A] in the dataset's ``attrs`` column layout; -1 where no object was found.
    """
    space = AttributeSpace(level, num_colours, position_grid)
    images = to_uint8_nhwc(images)
    # chunks bound the [N, K, H, W] float temporaries at 64×64 and larger
    chunks = [_analytic_chunk(images[s : s + CHUNK], space) for s in range(0, len(images), CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros((0, len(space.attr_names)), np.int64)


def _analytic_chunk(images: np.ndarray, space: AttributeSpace) -> np.ndarray:
    level, num_colours, position_grid = space.level, space.num_colours, space.position_grid
    n, size = len(images), images.shape[1]
    pix = images.astype(np.float32)
    sat = pix.max(-1) - pix.min(-1)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    if level == 6:
        # relation: the two objects sit in the left/right or the top/bottom halves
        mass = np.maximum(sat.sum((1, 2)), 1e-6)
        mx, my = (sat * xx).sum((1, 2)) / mass, (sat * yy).sum((1, 2)) / mass
        var_x = (sat * (xx - mx[:, None, None]) ** 2).sum((1, 2)) / mass
        var_y = (sat * (yy - my[:, None, None]) ** 2).sum((1, 2)) / mass
        above = var_y > var_x
        first = np.where(above[:, None, None], yy < 0.5, xx < 0.5)
        regions = np.stack([first, ~first], axis=1)
        side = 0.5
    else:
        regions = np.ones((n, 1, size, size), dtype=bool)
        side = cell_side(position_grid)
    alpha, present = _coverage(sat, regions)
    filled = fill_holes(alpha.sum(1).clip(0.0, 1.0))[:, None] * regions
    area = filled.sum((-1, -2))
    centre = np.stack([(filled * xx).sum((-1, -2)), (filled * yy).sum((-1, -2))], -1)
    centre /= np.maximum(area, 1e-6)[..., None]  # fractions of the image side, [N, K, 2]
    radius_px = np.sqrt(area / np.pi)

    shape = np.full(present.shape, -1, dtype=np.int64)
    for i, k in zip(*np.nonzero(present)):
        shape[i, k], radius_px[i, k] = _fit_template(
            filled[i, k], centre[i, k] * size, radius_px[i, k]
        )
    columns = {
        "shape": shape,
        "colour": _hue_index(images, alpha, num_colours),
        "size": np.searchsorted(SIZE_EDGES, radius_px / size / side),
    }
    if level == 6:
        columns["relation"] = above.astype(np.int64)[:, None]
    cells = np.asarray(grid_cells(position_grid))
    columns["position"] = ((centre[..., None, :] - cells) ** 2).sum(-1).argmin(-1)
    uncovered = alpha.sum(1) == 0
    grey = (pix.mean(-1) * uncovered).sum((1, 2)) / np.maximum(uncovered.sum((1, 2)), 1)
    columns["background"] = (grey < BACKGROUND_SPLIT).astype(np.int64)[:, None]

    out = np.empty((n, len(space.attr_names)), dtype=np.int64)
    for j, name in enumerate(space.attr_names):
        base, k = name.removesuffix("_a").removesuffix("_b"), int(name.endswith("_b"))
        value = columns[base][:, min(k, columns[base].shape[1] - 1)]
        # object attributes are unknown without their object, the relation without both
        known = present.all(1) if base == "relation" else present[:, k]
        out[:, j] = value if base == "background" else np.where(known, value, -1)
    return out


# --- entry point ----------------------------------------------------------------------------


def image_attributes(
    images: np.ndarray | torch.Tensor,
    level: int,
    method: str = "analytic",
    *,
    classifier: AttributeClassifier | None = None,
    num_colours: int = 6,
    position_grid: str = "quadrants",
) -> np.ndarray | dict[str, np.ndarray]:
    """Captioned attributes of images, analytically, by the learned classifier, or both.

    Args:
        images: [N, H, W, 3] or [N, 3, H, W], uint8 or float in [0, 1].
        level: dataset level, 1..6.
        method: ``"analytic"``, ``"classifier"`` or ``"both"``.
        classifier: a trained ``AttributeClassifier`` of this level; needed unless analytic.
        num_colours: colours of the dataset (analytic only; the classifier knows its own).
        position_grid: ``"quadrants"`` or ``"grid3"`` (analytic only).

    Returns:
        int64 [N, A] in the dataset's ``attrs`` layout, or for ``"both"`` a dict with keys
        ``analytic`` and ``classifier``.
    """
    if method not in ("analytic", "classifier", "both"):
        raise ValueError(f"method must be analytic, classifier or both, got {method!r}")
    out = {}
    if method in ("analytic", "both"):
        out["analytic"] = analytic_attributes(
            images, level, num_colours=num_colours, position_grid=position_grid
        )
    if method in ("classifier", "both"):
        if classifier is None:
            raise ValueError(f"method={method!r} needs classifier=train_attribute_classifier(...)")
        if classifier.level != level:
            raise ValueError(f"classifier is for level {classifier.level}, not {level}")
        out["classifier"] = classifier.predict(images)
    return out if method == "both" else out[method]
