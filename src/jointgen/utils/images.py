"""Image grids: PNG files and logger media."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(int(math.sqrt(images.shape[0])), 1)
    save_image(images.detach().float().cpu().clamp(0, 1), path, nrow=nrow, padding=1)
    return path


def log_images(trainer, images: dict[str, torch.Tensor]) -> None:
    """Send grids to every logger that takes images (wandb, tensorboard)."""
    step = trainer.global_step
    for logger in trainer.loggers:
        for key, x in images.items():
            grid = make_grid(x.detach().float().cpu().clamp(0, 1), nrow=int(math.sqrt(len(x))))
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key=key, images=[grid], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image(key, grid, step)


# --- captioned grids ------------------------------------------------------------------------


def _wrap(text: str, font, width: int, draw) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a single word
    longer than the width gets a line of its own)."""
    lines: list[str] = []
    for word in str(text).split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def captioned_grid(
    images: torch.Tensor,
    captions: list[str],
    ncol: int | None = None,
    cell: int = 96,
    max_lines: int = 4,
    colours: list[tuple[int, int, int]] | None = None,
):
    """A PIL image of (N, C, H, W) images in [0, 1], each with its caption written under it.

    Images are upscaled (nearest neighbour, so pixels stay crisp) to ``cell`` pixels; captions
    use Pillow's built-in default font (nothing is downloaded) and wrap to the cell width.

    Args:
        images: (N, C, H, W) in [0, 1], C = 1 or 3.
        captions: N strings (may be empty).
        ncol: images per row; defaults to about sqrt(N).
        cell: side of each upscaled image in pixels.
        max_lines: caption lines kept per image (the last one ends with "..." when cut).
        colours: optional RGB text colour per caption (e.g. green when right); black otherwise.
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(images) != len(captions):
        raise ValueError(f"need one caption per image, got {len(captions)} and {len(images)}")
    if len(images) == 0:
        raise ValueError("a grid needs at least one image")
    n = len(images)
    ncol = ncol or max(int(math.ceil(math.sqrt(n))), 1)
    nrow = int(math.ceil(n / ncol))
    font = ImageFont.load_default()
    line_h = sum(font.getmetrics()) + 1
    pad = 4
    text_h = max_lines * line_h + pad
    canvas = Image.new("RGB", (ncol * (cell + pad) + pad, nrow * (cell + text_h + pad) + pad))
    canvas.paste((255, 255, 255), (0, 0, *canvas.size))
    draw = ImageDraw.Draw(canvas)
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        tile = Image.fromarray(pixels[i].permute(1, 2, 0).numpy(), "RGB")
        canvas.paste(tile.resize((cell, cell), Image.NEAREST), (x0, y0))
        lines = _wrap(captions[i], font, cell, draw)
        if len(lines) > max_lines:
            lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
        for j, line in enumerate(lines):
            fill = tuple(colours[i]) if colours is not None else (0, 0, 0)
            draw.text((x0, y0 + cell + 2 + j * line_h), line, fill=fill, font=font)
    return canvas


def render_captioned_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | Path,
    ncol: int | None = None,
    cell: int = 96,
    colours: list[tuple[int, int, int]] | None = None,
) -> Path:
    """Save ``captioned_grid(images, captions, ncol, cell, colours=colours)`` as a PNG; returns
    the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    captioned_grid(images, captions, ncol, cell, colours=colours).save(path)
    return path
