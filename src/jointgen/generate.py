"""Python API for generating with a joint caption-image VAE: the four modes, annotated samples
and captioned grids (what `jointgen-sample` and the coherence callback use).

Modes:

* ``joint``: z ~ p(z), both decoders (``JointVAE.sample_joint``);
* ``caption_to_image``: images from captions (``JointVAE.caption_to_image``);
* ``image_to_caption``: captions from images (``JointVAE.image_to_caption``, greedy by default);
* ``reconstruct``: each modality from its own posterior mean (``JointVAE.reconstruct``).

Example::

    from jointgen.generate import annotate, generate, render_samples
    from jointgen.utils.checkpoint import model_from_checkpoint

    module, cfg = model_from_checkpoint("last.ckpt")
    out = generate(module, "caption_to_image", temp=0.8, captions=["a large red star"])
    records = annotate(out, AttributeSpace(cfg.data.level))
    render_samples(out, records, "c2i.png")

Everything takes a ``JointVAE`` or any module holding one as ``.net``; only the shapes grammar's
vocabulary and attribute parser are needed besides the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from jointgen.data.shapes.attributes import AttributeSpace
from jointgen.data.shapes.vocab import Vocabulary
from jointgen.eval.attributes import image_attributes
from jointgen.eval.coherence import parse_captions
from jointgen.utils.images import captioned_grid, render_captioned_grid

MODES = ("joint", "caption_to_image", "image_to_caption", "reconstruct")
RIGHT, WRONG = (0, 130, 0), (200, 0, 0)  # caption colours in the grids

__all__ = [
    "MODES",
    "annotate",
    "caption_records",
    "generate",
    "grid_cells",
    "is_joint_config",
    "render_captioned_grid",
    "render_samples",
    "samples_image",
    "take_result",
]


# --- helpers --------------------------------------------------------------------------------


def is_joint_config(cfg) -> bool:
    """True when a checkpoint's resolved config describes the joint caption-image VAE."""
    target = OmegaConf.select(OmegaConf.create(cfg), "model._target_", default="") or ""
    return str(target).endswith("JointLitModule")


def joint_net(model) -> torch.nn.Module:
    """The ``JointVAE`` itself, or the one a LightningModule holds as ``.net``."""
    net = getattr(model, "net", model)
    if not hasattr(net, "caption_to_image"):
        raise TypeError(f"{type(model).__name__} is not a joint VAE (no caption_to_image)")
    return net


@contextmanager
def eval_mode(net: torch.nn.Module):
    """Eval mode inside the block; the previous training flag is restored afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def as_float_images(images) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] from a uint8 or float tensor/array."""
    x = torch.as_tensor(images)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def batched(fn: Callable, *inputs: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """``fn`` over slices of ``inputs`` moved to ``device``; outputs concatenated on the CPU."""
    outs = []
    for s in range(0, len(inputs[0]), batch_size):
        outs.append(fn(*(x[s : s + batch_size].to(device) for x in inputs)).cpu())
    return torch.cat(outs)


def decode_all(tokens: torch.Tensor, vocab: Vocabulary) -> list[str]:
    return [vocab.decode(row.tolist()) for row in tokens]


# --- generation -----------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    mode: str,
    n: int | None = None,
    temp: float = 1.0,
    *,
    captions: Sequence[str] | None = None,
    tokens: torch.Tensor | None = None,
    images: torch.Tensor | np.ndarray | None = None,
    attrs: torch.Tensor | np.ndarray | None = None,
    vocab: Vocabulary | None = None,
    greedy: bool = True,
    batch_size: int = 256,
) -> dict:
    """Generate with a joint VAE in one of ``MODES``; the RNG is used as is (seed it first).

    Args:
        model: a ``JointVAE`` or a module holding one as ``.net`` (e.g. ``JointLitModule``).
        mode: ``joint``, ``caption_to_image``, ``image_to_caption`` or ``reconstruct``.
        n: samples for ``joint`` (required there); for the other modes the first ``n`` sources.
        temp: latent temperature (scale of every latent draw times ``temp``; 0 = means).
        captions: source captions (strings) for ``caption_to_image`` and ``reconstruct``.
        tokens: the same as token ids ``(N, L)``; either ``captions`` or ``tokens``.
        images: source images ``(N, C, H, W)`` (uint8 or float in [0, 1]) for
            ``image_to_caption`` and ``reconstruct``.
        attrs: optional ground-truth attributes ``(N, A)`` of the sources, kept for ``annotate``.
        vocab: the caption vocabulary; the shapes grammar's by default.
        greedy: greedy caption decoding (else sampled at ``temp``).
        batch_size: samples per forward pass.

    Returns:
        ``mode``, ``temperature``, ``images`` (N, C, H, W generated images on the CPU, or None),
        ``tokens`` and ``captions`` (generated, or None), ``source_images``,
        ``source_captions``, ``attrs`` (None where not given or not used) and ``index``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    net = joint_net(model)
    vocab = vocab or Vocabulary.from_grammar()
    max_len = net.branches["txt"].max_len
    if captions is not None and tokens is None:
        tokens = torch.from_numpy(vocab.encode_batch([str(c) for c in captions], max_len))
    if tokens is not None:
        tokens = torch.as_tensor(tokens).long()[:n]
        captions = decode_all(tokens, vocab)
    if images is not None:
        images = as_float_images(images)[:n]
    if attrs is not None:
        attrs = torch.as_tensor(np.asarray(attrs))[:n]
    need = {
        "joint": (),
        "caption_to_image": ("captions",),
        "image_to_caption": ("images",),
        "reconstruct": ("captions", "images"),
    }[mode]
    given = {"captions": tokens, "images": images}
    missing = [k for k in need if given[k] is None]
    if missing:
        raise ValueError(f"mode={mode} needs {' and '.join(missing)}")
    if mode == "joint" and (n is None or n < 1):
        raise ValueError(f"mode=joint needs n >= 1 samples, got {n}")
    if mode == "reconstruct" and len(tokens) != len(images):
        raise ValueError(
            f"reconstruct needs pairs, got {len(tokens)} captions, {len(images)} images"
        )

    device, bs = device_of(net), batch_size
    out_images = out_tokens = None
    with eval_mode(net):
        if mode == "joint":
            parts = [net.sample_joint(min(bs, n - s), temp) for s in range(0, n, bs)]
            out_images = torch.cat([p["image"].cpu() for p in parts])
            out_tokens = torch.cat([p["tokens"].cpu() for p in parts])
        elif mode == "caption_to_image":
            fn = lambda t: net.caption_to_image(t, temp)  # noqa: E731
            out_images = batched(fn, tokens, batch_size=bs, device=device)
        elif mode == "image_to_caption":
            fn = lambda x: net.image_to_caption(x, greedy=greedy, temp=temp)  # noqa: E731
            out_tokens = batched(fn, images, batch_size=bs, device=device)
        else:
            parts = []
            for s in range(0, len(images), bs):
                x, t = images[s : s + bs].to(device), tokens[s : s + bs].to(device)
                m = torch.ones(len(x), dtype=torch.bool, device=device)
                batch = {"image": x, "tokens": t, "mask_image": m, "mask_text": m}
                parts.append(net.reconstruct(batch))
            out_images = torch.cat([p["image"].cpu() for p in parts])
            out_tokens = torch.cat([p["tokens"].cpu() for p in parts])
    count = n if mode == "joint" else len(tokens if tokens is not None else images)
    return {
        "mode": mode,
        "temperature": float(temp),
        "images": out_images,
        "tokens": out_tokens,
        "captions": decode_all(out_tokens, vocab) if out_tokens is not None else None,
        "source_images": images if mode in ("image_to_caption", "reconstruct") else None,
        "source_captions": captions if mode != "joint" else None,
        "attrs": attrs if mode != "joint" else None,
        "index": list(range(count)),
    }


# --- annotation -----------------------------------------------------------------------------


def _names(row: np.ndarray, space: AttributeSpace) -> dict[str, str | None] | None:
    if (row < 0).all():
        return None
    return {
        name: (space.values[name][v] if v >= 0 else None) for name, v in zip(space.attr_names, row)
    }


def _right(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return (pred == target) & (pred >= 0) & (target >= 0)


def annotate(
    result: dict,
    space: AttributeSpace,
    *,
    method: str = "analytic",
    classifier=None,
) -> list[dict]:
    """One JSON-ready record per sample of ``generate``'s result, with attribute checks.

    The target attributes are the given ``attrs`` (else the parse of the source caption, or for
    ``image_to_caption`` the attributes read off the source image; for ``joint`` the parse of
    the generated caption). Generated images are read with ``method`` (``analytic`` or
    ``classifier``), generated captions with the grammar's exact parser; an unparseable caption
    or an unreadable image is wrong for every attribute.

    Returns:
        Dicts with ``mode``, ``temperature``, ``index``, ``source_caption``, ``caption`` (the
        generated one), ``caption_attrs`` (its parse, None when unparseable), ``image_attrs``
        (read off the generated image), ``target_attrs``, ``right`` (per attribute) and
        ``strict``; ``reconstruct`` adds ``right_image`` and ``right_caption`` (``right`` needs
        both).
    """
    mode, level = result["mode"], space.level
    kw = dict(num_colours=space.num_colours, position_grid=space.position_grid)
    parsed = image_read = None
    if result["captions"] is not None:
        parsed = parse_captions(result["captions"], level, **kw)
    if result["images"] is not None:
        image_read = image_attributes(result["images"], level, method, classifier=classifier, **kw)
    if mode == "joint":
        target = parsed
    elif result["attrs"] is not None:
        target = np.asarray(result["attrs"], dtype=np.int64)
    elif mode == "image_to_caption":
        target = image_attributes(result["source_images"], level, method, classifier=classifier,
                                  **kw)  # fmt: skip
    else:
        target = parse_captions(result["source_captions"], level, **kw)
    checks = {}
    if image_read is not None:
        checks["image"] = _right(image_read, target)
    if parsed is not None and mode != "joint":
        checks["caption"] = _right(parsed, target)
    right = np.logical_and.reduce(list(checks.values()))
    records = []
    for i, index in enumerate(result["index"]):
        rec = {
            "mode": mode,
            "temperature": result["temperature"],
            "index": index if mode != "joint" else None,
            "source_caption": result["source_captions"][i] if result["source_captions"] else None,
            "caption": result["captions"][i] if result["captions"] is not None else None,
            "caption_attrs": _names(parsed[i], space) if parsed is not None else None,
            "image_attrs": _names(image_read[i], space) if image_read is not None else None,
            "target_attrs": _names(target[i], space),
            "right": {a: bool(v) for a, v in zip(space.attr_names, right[i])},
            "strict": bool(right[i].all()),
        }
        if mode == "reconstruct":
            for key in ("image", "caption"):
                rec[f"right_{key}"] = {
                    a: bool(v) for a, v in zip(space.attr_names, checks[key][i])
                }
        records.append(rec)
    return records


def caption_records(result: dict) -> list[dict]:
    """One JSON-ready record per sample of ``generate``'s result, without attribute checks (for
    caption data with no attributes, such as Recipe1M titles): ``mode``, ``temperature``,
    ``index``, ``source_caption`` and ``caption`` (the generated one)."""
    mode, sources, captions = result["mode"], result["source_captions"], result["captions"]
    return [
        {
            "mode": mode,
            "temperature": result["temperature"],
            "index": index if mode != "joint" else None,
            "source_caption": sources[i] if sources else None,
            "caption": captions[i] if captions is not None else None,
        }
        for i, index in enumerate(result["index"])
    ]


# --- grids ----------------------------------------------------------------------------------


def grid_cells(result: dict, records: list[dict] | None = None):
    """Images, captions, caption colours and columns of a mode's captioned grid.

    ``joint``: generated images with their generated captions; ``caption_to_image``: generated
    images under their source captions; ``image_to_caption``: source images with the generated
    captions; ``reconstruct``: source and reconstruction side by side (source caption, then the
    reconstructed caption). With ``records``, checked captions are green when strict, else red.
    """
    mode = result["mode"]
    if records is None:
        colours = None
    else:
        colours = [RIGHT if r["strict"] else WRONG for r in records]
    if mode == "joint":
        return result["images"], result["captions"], colours, None
    if mode == "caption_to_image":
        return result["images"], result["source_captions"], colours, None
    if mode == "image_to_caption":
        return result["source_images"], result["captions"], colours, None
    src, rec = result["source_images"], result["images"]
    images = torch.stack([src, rec], 1).flatten(0, 1)
    captions = [c for pair in zip(result["source_captions"], result["captions"]) for c in pair]
    if colours is not None:
        colours = [c for col in colours for c in ((0, 0, 0), col)]
    ncol = 2 * max(int(np.ceil(np.sqrt(len(src) / 2))), 1)
    return images, captions, colours, ncol


def render_samples(result: dict, records: list[dict] | None, path: str | Path) -> Path:
    """Save the captioned grid of ``generate``'s result (see ``grid_cells``) as a PNG."""
    images, captions, colours, ncol = grid_cells(result, records)
    return render_captioned_grid(images, captions, path, ncol=ncol, colours=colours)


def samples_image(result: dict, records: list[dict] | None = None):
    """The captioned grid as a PIL image (for loggers)."""
    images, captions, colours, ncol = grid_cells(result, records)
    return captioned_grid(images, captions, ncol, colours=colours)


def take_result(result: dict, k: int) -> dict:
    """The first ``k`` samples of ``generate``'s result (every per-sample field sliced)."""
    out = {}
    for key, value in result.items():
        out[key] = value[:k] if isinstance(value, torch.Tensor | list) else value
    return out
