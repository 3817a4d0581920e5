"""Deterministic rasteriser of the captioned-shapes images.

Each shape is a unit polygon scaled to the area of a circle of the requested radius, so the
size attribute reads directly off the mask area whatever the shape. Masks are drawn with
Pillow on a canvas ``SUPERSAMPLE`` times larger and box-filtered down, which anti-aliases the
edges; backgrounds and compositing are vectorised with numpy over chunks of images.

Private nuisances, never captioned: rotation, a small translation inside the cell, the radius
inside its size bin, stroke width (0 = filled), background texture (plain, stripes, dots,
noise) with its phase and angle, colour jitter and a global brightness factor. Backgrounds are
grey and textures achromatic, so the object's hue is the only colour in the picture.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4
CHUNK = 512  # images composited at once; bounds memory at 64×64 and larger
TEXTURES = ("plain", "stripes", "dots", "noise")
BACKGROUND_GREY = (215.0, 40.0)  # light, dark; far from each other and from every colour
TEXTURE_AMPLITUDE = 12.0  # grey levels; small enough that light stays light after brightness
TEXTURE_PERIOD = 0.1875  # fraction of the image side (6 px at 32×32)
MAX_ROTATION = 30.0  # degrees; more would let a rotated square pass for a diamond
BRIGHTNESS = (0.9, 1.1)
COLOUR_JITTER = 12.0  # per channel, grey levels
MIN_STROKE_PX = 1.5  # thinner outlines vanish after down-sampling

OBJECT_NUISANCES = ("rotation", "radius", "shift_x", "shift_y", "stroke")
GLOBAL_NUISANCES = ("texture", "texture_phase", "texture_angle", "brightness")


# --- unit shapes ----------------------------------------------------------------------------


def _regular(n: int, radius: float = 1.0, start: float = 90.0) -> np.ndarray:
    angles = np.deg2rad(start + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return radii[:, None] * _regular(2 * points)


def _heart(n: int = 64) -> np.ndarray:
    # the classic parametric heart curve, with y pointing up
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = 13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y], axis=1)


def _normalise(poly: np.ndarray) -> np.ndarray:
    """Move the area centroid to the origin and scale the area to pi (equivalent radius 1)."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2.0
    centroid = np.stack([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6.0 * area)
    return (poly - centroid) * np.sqrt(np.pi / abs(area))


UNIT_SHAPES = {
    "circle": _normalise(_regular(64)),
    "square": _normalise(_regular(4, start=45.0)),
    "triangle": _normalise(_regular(3)),
    "diamond": _normalise(np.array([[0.0, 1.0], [-0.65, 0.0], [0.0, -1.0], [0.65, 0.0]])),
    "star": _normalise(_star()),
    "heart": _normalise(_heart()),
}


# --- nuisances ------------------------------------------------------------------------------


def sample_nuisances(rng: np.random.Generator, num: int, num_objects: int) -> dict:
    """Draw every private nuisance for ``num`` images.

    Returns:
        ``{"objects": [dict per object], "global": dict}``; object entries hold ``rotation``
        (degrees), ``radius`` (position inside the size bin, 0..1), ``shift_x``/``shift_y``
        (fractions of a cell side), ``stroke`` (0 = filled, else width / radius) and ``jitter``
        (RGB offsets); global entries hold ``texture`` (index into ``TEXTURES``),
        ``texture_phase`` (0..1), ``texture_angle`` (degrees) and ``brightness``.
    """
    objects = []
    for _ in range(num_objects):
        filled = rng.random(num) < 0.5
        objects.append(
            {
                "rotation": rng.uniform(-MAX_ROTATION, MAX_ROTATION, num),
                "radius": rng.random(num),
                "shift_x": rng.uniform(-1.0, 1.0, num),
                "shift_y": rng.uniform(-1.0, 1.0, num),
                "stroke": np.where(filled, 0.0, rng.uniform(0.35, 0.6, num)),
                "jitter": rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (num, 3)),
            }
        )
    glob = {
        "texture": rng.integers(0, len(TEXTURES), num),
        "texture_phase": rng.random(num),
        "texture_angle": 45.0 * rng.integers(0, 4, num),
        "brightness": rng.uniform(*BRIGHTNESS, num),
    }
    return {"objects": objects, "global": glob}


# --- rasterising ----------------------------------------------------------------------------


def shape_mask(
    shape: str,
    centre: tuple[float, float],
    radius: float,
    rotation: float,
    stroke: float,
    image_size: int,
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, float32 [H, W].

    Args:
        shape: a key of ``UNIT_SHAPES``.
        centre: (x, y) as fractions of the image side, y pointing down.
        radius: radius of the circle of equal area, as a fraction of the image side.
        rotation: degrees, counter-clockwise on screen.
        stroke: 0 for a filled shape, else the outline width as a fraction of ``radius``.
        image_size: output side in pixels.
    """
    side = image_size * SUPERSAMPLE
    theta = np.deg2rad(rotation)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = UNIT_SHAPES[shape] @ rot.T * (radius * side)
    # flip y to screen coordinates; Pillow puts pixel centres on integers, hence the -0.5
    xs = centre[0] * side + pts[:, 0] - 0.5
    ys = centre[1] * side - pts[:, 1] - 0.5
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    if stroke > 0:
        width = max(stroke * radius * image_size, MIN_STROKE_PX) * SUPERSAMPLE
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), outline=255, width=round(width))
    else:
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def backgrounds(
    dark: np.ndarray,
    texture: np.ndarray,
    phase: np.ndarray,
    angle: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Grey textured backgrounds, float32 [N, H, W] in grey levels (before brightness)."""
    n = len(dark)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / (image_size * TEXTURE_PERIOD)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    theta = np.deg2rad(angle).astype(np.float32)[:, None, None]
    ph = phase.astype(np.float32)[:, None, None]
    stripes = np.sin(2.0 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta) + ph))
    dx = (xx - ph) % 1.0 - 0.5
    dy = (yy - ph) % 1.0 - 0.5
    dots = np.exp(-(dx**2 + dy**2) / (2.0 * 0.15**2))
    noise = np.clip(0.5 * rng.standard_normal((n, image_size, image_size), np.float32), -1, 1)
    tex = np.select(
        [texture[:, None, None] == k for k in (1, 2, 3)], [stripes, dots, noise], 0.0
    ).astype(np.float32)
    # dots and stripes darken a light background and brighten a dark one
    sign = np.where(dark, 1.0, -1.0).astype(np.float32)[:, None, None]
    grey = np.asarray(BACKGROUND_GREY, np.float32)[dark.astype(int)][:, None, None]
    return grey + sign * TEXTURE_AMPLITUDE * tex


def render_images(
    objects: list[dict], background: dict, image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Rasterise a batch of scenes into uint8 RGB images [N, H, W, 3].

    Args:
        objects: one dict per object with ``shape`` (names), ``centre`` [N, 2], ``radius``,
            ``rotation``, ``stroke`` (as in ``shape_mask``) and ``rgb`` [N, 3] floats.
        background: ``dark`` (bool), ``texture``, ``texture_phase``, ``texture_angle`` and
            ``brightness``, each of length N.
        image_size: output side in pixels.
        rng: source of the noise texture; the only randomness used here.
    """
    n = len(background["dark"])
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        idx = slice(start, min(start + CHUNK, n))
        grey = backgrounds(
            background["dark"][idx],
            background["texture"][idx],
            background["texture_phase"][idx],
            background["texture_angle"][idx],
            image_size,
            rng,
        )
        canvas = np.repeat(grey[..., None], 3, axis=-1)
        for obj in objects:
            alpha = np.stack(
                [
                    shape_mask(s, c, r, a, w, image_size)
                    for s, c, r, a, w in zip(
                        obj["shape"][idx],
                        obj["centre"][idx].tolist(),
                        obj["radius"][idx].tolist(),
                        obj["rotation"][idx].tolist(),
                        obj["stroke"][idx].tolist(),
                    )
                ]
            )[..., None]
            rgb = obj["rgb"][idx].astype(np.float32)[:, None, None, :]
            canvas += alpha * (rgb - canvas)
        canvas *= background["brightness"][idx].astype(np.float32)[:, None, None, None]
        out[idx] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return out
