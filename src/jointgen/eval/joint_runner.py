"""Offline evaluation of a joint caption-image VAE on the captioned shapes (spec §5, issue 3).

Data without attributes (a datamodule without ``space``, e.g. Recipe1M titles) get the reduced
suite of ``evaluate_captions_only``: likelihoods and caption scores against the sources.

``evaluate_joint(net, datamodule)`` takes a ``JointVAE`` (or a module holding one as ``.net``)
and a ``ShapesDataModule`` and computes, on the first ``num_samples`` pairs of a split:

* cross coherence caption→image (``c2i``) and image→caption (``i2c``), per attribute and
  strict, also on the held-out (shape, colour) split when the data has one;
* joint coherence of ``num_samples`` prior samples;
* caption quality of image→caption and of caption reconstructions: exact match and BLEU-4
  against every paraphrase of the true attributes, token accuracy of reconstructions;
* likelihoods (``jointgen.eval.joint_likelihood``: units in the metric names);
* the in-domain Fréchet distance (attribute-classifier features, *not comparable to Inception
  FID*) of reconstructions, caption→image samples and prior samples against the real images;
* linear probes of the captioned attributes from the shared z and the private w_img, w_txt
  (and ridge/logistic probes of the private nuisances from w_img and z).

The global RNG is saved and restored; each block draws from ``seed`` plus a fixed offset, so a
given seed always gives the same numbers and switching one block off changes no other.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from jointgen.data.shapes.generate import load_npz
from jointgen.eval.classifier import train_attribute_classifier
from jointgen.eval.coherence import (
    cross_coherence_img2txt,
    cross_coherence_txt2img,
    joint_coherence,
)
from jointgen.eval.frechet import FD_LABEL, frechet_distance
from jointgen.eval.joint_likelihood import likelihood_metrics
from jointgen.eval.probes import probe_attributes, probe_private
from jointgen.eval.report import leaderboard_row, write_results
from jointgen.eval.text_metrics import caption_metrics, token_accuracy
from jointgen.generate import as_float_images, eval_mode, generate, joint_net
from jointgen.utils.progress import progress

log = logging.getLogger(__name__)

ATTRIBUTE_METHODS = ("analytic", "classifier")
SPLITS = ("test", "val", "test_heldout")
PROBE_LATENTS = ("z", "w_img", "w_txt")


@contextmanager
def seeded(seed: int):
    """Seed torch inside the block; the global CPU (and current CUDA) RNG state is restored."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def take(dataset, n: int) -> dict:
    """The first ``n`` samples of a ``ShapesDataset``: uint8 images, tokens, attrs, captions."""
    n = min(n, len(dataset))
    return {
        "images": dataset.images[:n],
        "tokens": dataset.tokens[:n],
        "attrs": dataset.attrs[:n],
        "captions": [str(c) for c in dataset.captions[:n]],
    }


# --- coherence ------------------------------------------------------------------------------


def coherence_suite(
    net,
    data: dict,
    space,
    *,
    temperature: float,
    num_joint: int,
    method: str = "analytic",
    classifier=None,
    batch_size: int = 250,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], dict[str, dict]]:
    """Cross (c2i, i2c) and joint coherence of a joint VAE on paired samples.

    Args:
        net: a ``JointVAE`` (or a module holding one as ``.net``).
        data: ``take(...)``-style dict (``images``, ``tokens``, ``attrs``, ``captions``).
        space: the data's ``AttributeSpace``.
        temperature: latent temperature of every draw.
        num_joint: prior samples for joint coherence (0 skips it).
        method: image attribute extractor, ``analytic`` or ``classifier``.
        classifier: the trained ``AttributeClassifier`` for ``method="classifier"``.
        batch_size: samples per forward pass.
        seed: c2i, i2c and joint draw from ``seed``, ``seed + 1``, ``seed + 2``.

    Returns:
        ``(metrics, generated)``: ``metrics[c2i|i2c|joint]`` are the ``jointgen.eval.coherence``
        dicts; ``generated`` holds the ``jointgen.generate.generate`` results of each mode.
    """
    kw = dict(num_colours=space.num_colours, position_grid=space.position_grid)
    common = dict(temp=temperature, attrs=data["attrs"], batch_size=batch_size)
    gen, metrics = {}, {}
    with seeded(seed):
        gen["c2i"] = generate(net, "caption_to_image", tokens=data["tokens"], **common)
    with seeded(seed + 1):
        gen["i2c"] = generate(net, "image_to_caption", images=data["images"], **common)
    metrics["c2i"] = cross_coherence_txt2img(
        gen["c2i"]["images"], data["attrs"], space.level, method=method, classifier=classifier,
        **kw,
    )  # fmt: skip
    metrics["i2c"] = cross_coherence_img2txt(
        gen["i2c"]["captions"], data["attrs"], space.level, source_captions=data["captions"], **kw
    )
    if num_joint > 0:
        with seeded(seed + 2):
            gen["joint"] = generate(net, "joint", num_joint, temperature, batch_size=batch_size)
        metrics["joint"] = joint_coherence(
            gen["joint"]["images"], gen["joint"]["captions"], space.level, method=method,
            classifier=classifier, **kw,
        )  # fmt: skip
    return metrics, gen


# --- probes ---------------------------------------------------------------------------------


@torch.no_grad()
def encode_means(net, data: dict, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """``JointVAE.encode`` posterior means of complete pairs, concatenated on the CPU."""
    net = joint_net(net)
    device = next(net.parameters()).device
    images = as_float_images(data["images"])
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(images), batch_size):
        x, t = images[s : s + batch_size].to(device), data["tokens"][s : s + batch_size].to(device)
        m = torch.ones(len(x), dtype=torch.bool, device=device)
        out = net.encode({"image": x, "tokens": t, "mask_image": m, "mask_text": m})
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def probe_suite(
    codes: dict[str, torch.Tensor],
    attrs: torch.Tensor,
    attr_names,
    *,
    num_train: int,
    seed: int,
    private: np.ndarray | None = None,
    private_names=None,
) -> dict[str, dict[str, float]]:
    """Attribute probes from each of ``PROBE_LATENTS`` (empty latents skipped), plus nuisance
    probes from w_img and z when the split's ``private`` array is given."""
    out = {}
    for name in PROBE_LATENTS:
        if name in codes and codes[name].shape[1] > 0:
            out[name] = probe_attributes(
                codes[name], attrs, attr_names, num_train=num_train, seed=seed
            )
    if private is not None:
        for name in ("w_img", "z"):
            if name in codes and codes[name].shape[1] > 0:
                out[f"private_from_{name}"] = probe_private(
                    codes[name], private, list(private_names), num_train=num_train, seed=seed
                )
    return out


# --- the whole evaluation -------------------------------------------------------------------


def _classifier(datamodule, options: dict | None):
    h = datamodule.hparams
    opts = dict(options or {})
    return train_attribute_classifier(
        h.level,
        image_size=h.image_size,
        num_colours=h.num_colours,
        position_grid=h.position_grid,
        **opts,
    )


def evaluate_joint(
    net,
    datamodule,
    *,
    split: str = "test",
    num_samples: int = 500,
    temperature: float = 1.0,
    image_attributes: str = "analytic",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 250,
    image_iw_samples: int = 1,
    probe_samples: int = 1000,
    probe_train: int = 500,
    frechet: bool = True,
    classifier=None,
    classifier_accuracy: dict | None = None,
    classifier_options: dict | None = None,
    model_name: str = "jointgen",
) -> dict:
    """Every spec §5 metric of a joint VAE on the shapes data; see the module docstring.

    Args:
        net: a ``JointVAE`` or a module holding one as ``.net`` (``JointLitModule``).
        datamodule: a ``ShapesDataModule`` (``setup`` is called here).
        split: ``test`` (default), ``val`` or ``test_heldout``.
        num_samples: source pairs (and prior samples) for coherence, captions, likelihoods, FD.
        temperature: latent temperature of cross and joint generation.
        image_attributes: read generated images ``analytic``-ally or with the ``classifier``.
        seed: base seed of every random draw (the global RNG is restored afterwards).
        out_dir: when given, writes ``<out_dir>/results/metrics.json`` and ``results.md``.
        batch_size: samples per forward pass.
        image_iw_samples: importance samples of the likelihood bounds (1 = ELBO).
        probe_samples: pairs encoded for the linear probes (``probe_train`` of them train).
        probe_train: training samples per probe (500, the MoPoE convention); at most half of
            the encoded pairs are used for training.
        frechet: compute the in-domain Fréchet distances (needs the attribute classifier).
        classifier: a trained ``AttributeClassifier``; trained or loaded from the cache with
            ``classifier_options`` (``train_attribute_classifier`` arguments) when needed.
        classifier_accuracy: its held-out accuracy per attribute, reported when given.
        classifier_options: e.g. ``{"num_train": 20000, "epochs": 5, "cache_dir": ...}``.
        model_name: the model column of the leaderboard row.

    Returns:
        Nested dict: ``meta``, ``coherence`` (``c2i``, ``i2c``, ``joint``), maybe
        ``coherence_heldout``, ``captions``, ``likelihood``, maybe ``fd`` and ``classifier``,
        and ``probes``.
    """
    if image_attributes not in ATTRIBUTE_METHODS:
        raise ValueError(f"image_attributes must be one of {ATTRIBUTE_METHODS}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    start = time.perf_counter()
    net = joint_net(net)
    if not hasattr(datamodule, "space"):  # captions without attributes (Recipe1M)
        results = evaluate_captions_only(
            net, datamodule, split=split, num_samples=num_samples, temperature=temperature,
            seed=seed, batch_size=batch_size, image_iw_samples=image_iw_samples,
        )  # fmt: skip
        results["meta"]["seconds"] = time.perf_counter() - start
        if out_dir is not None:
            write_joint_results(results, out_dir, model_name)
        return results
    datamodule.setup("test")
    if split not in datamodule.datasets:
        raise ValueError(f"the data has no {split!r} split (data.heldout_fraction is 0?)")
    space = datamodule.space
    kw = dict(num_colours=space.num_colours, position_grid=space.position_grid)
    data = take(datamodule.datasets[split], num_samples)
    n = len(data["images"])
    images = as_float_images(data["images"])

    if classifier is None and (image_attributes == "classifier" or frechet):
        classifier, classifier_accuracy = _classifier(datamodule, classifier_options)
    method_kw = dict(method=image_attributes, classifier=classifier, batch_size=batch_size)
    results: dict = {
        "meta": {
            "split": split, "num_samples": n, "temperature": float(temperature), "seed": seed,
            "level": space.level, "image_attributes": image_attributes, "fusion": net.fusion,
            "image_branch": type(net.branches["img"]).__name__,
        },
    }  # fmt: skip
    stages = 5 if frechet else 4  # coherence, captions, likelihoods, [FD,] probes
    with eval_mode(net), progress("joint evaluation", total=stages) as advance:
        coherence, gen = coherence_suite(
            net, data, space, temperature=temperature, num_joint=n, seed=seed, **method_kw
        )
        results["coherence"] = coherence
        if split != "test_heldout" and "test_heldout" in datamodule.datasets:
            held = take(datamodule.datasets["test_heldout"], num_samples)
            results["coherence_heldout"], _ = coherence_suite(
                net, held, space, temperature=temperature, num_joint=0, seed=seed + 10,
                **method_kw,
            )  # fmt: skip
        advance()
        with seeded(seed + 20):
            recon = generate(net, "reconstruct", tokens=data["tokens"], images=images,
                             batch_size=batch_size)  # fmt: skip
        results["captions"] = {
            "i2c": caption_metrics(gen["i2c"]["captions"], data["attrs"], space.level, **kw),
            "reconstruction": caption_metrics(recon["captions"], data["attrs"], space.level, **kw)
            | {"token_accuracy": token_accuracy(recon["tokens"], data["tokens"])},
        }
        advance()
        with seeded(seed + 30):
            results["likelihood"] = likelihood_metrics(
                net, images, data["tokens"], K=image_iw_samples, batch_size=batch_size
            )
        advance()
        if frechet:
            fakes = {
                "reconstruction": recon["images"],
                "c2i": gen["c2i"]["images"],
                "prior": gen["joint"]["images"],
            }
            results["fd"] = {"label": FD_LABEL, "num_real": float(n)}
            for key, fake in fakes.items():
                results["fd"][key] = frechet_distance(images, fake, classifier)["in_domain_fd"]
            advance()
        probe_data = take(datamodule.datasets[split], probe_samples)
        codes = encode_means(net, probe_data, batch_size)
        private = names = None
        path = getattr(datamodule, "paths", {}).get(split)
        if path is not None:
            arrays = load_npz(path)
            if "private" in arrays:
                private = arrays["private"][: len(probe_data["attrs"])]
                names = arrays["private_names"]
        train = min(probe_train, len(probe_data["attrs"]) // 2)
        results["probes"] = probe_suite(
            codes, probe_data["attrs"], space.attr_names, num_train=train, seed=seed,
            private=private, private_names=names,
        )  # fmt: skip
        results["meta"]["probe_train"] = train
        advance()
    if classifier_accuracy is not None:
        results["classifier"] = {
            f"acc/{k}": float(v) for k, v in classifier_accuracy.items() if k != "train_seconds"
        }
    results["meta"]["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        write_joint_results(results, out_dir, model_name)
    return results


def evaluate_captions_only(
    net,
    datamodule,
    *,
    split: str,
    num_samples: int,
    temperature: float,
    seed: int,
    batch_size: int,
    image_iw_samples: int,
) -> dict:
    """The part of the suite that needs no attributes, for caption data such as Recipe1M
    titles: likelihoods (bits/dim, caption NLL and perplexity), BLEU-4 and exact match of
    image-to-caption and of caption reconstructions against the source captions, and the token
    accuracy of reconstructions, on the first ``num_samples`` complete pairs of ``split``
    (``datamodule.dataset(split).pairs``). Coherence, Fréchet distance and probes need the
    shapes attributes and are skipped."""
    from torchmetrics.text import BLEUScore

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test for this data, got {split!r}")
    data = datamodule.dataset(split).pairs(num_samples)
    images, tokens, vocab = data["images"], data["tokens"], datamodule.vocab
    kw = dict(vocab=vocab, batch_size=batch_size)
    with eval_mode(net), progress("joint evaluation (captions only)", total=2) as advance:
        with seeded(seed + 1):
            i2c = generate(net, "image_to_caption", temp=temperature, images=images, **kw)
        with seeded(seed + 20):
            recon = generate(net, "reconstruct", tokens=tokens, images=images, **kw)
        sources = recon["source_captions"]
        captions = {}
        for name, preds in (("i2c", i2c["captions"]), ("reconstruction", recon["captions"])):
            bleu = BLEUScore(n_gram=4)
            bleu.update(preds, [[ref] for ref in sources])
            exact = float(np.mean([p == ref for p, ref in zip(preds, sources)]))
            captions[name] = {"bleu4": float(bleu.compute()), "exact_match": exact}
        captions["reconstruction"]["token_accuracy"] = token_accuracy(recon["tokens"], tokens)
        advance()
        with seeded(seed + 30):
            likelihood = likelihood_metrics(
                net, images, tokens, K=image_iw_samples, batch_size=batch_size
            )
        advance()
    meta = {
        "split": split, "num_samples": len(images), "temperature": float(temperature),
        "seed": seed, "fusion": net.fusion, "image_branch": type(net.branches["img"]).__name__,
        "skipped": "coherence, fd, probes (the data have no attributes)",
    }  # fmt: skip
    return {"meta": meta, "captions": captions, "likelihood": likelihood}


def write_joint_results(results: dict, out_dir: str | os.PathLike, model_name: str) -> dict:
    """``<out_dir>/results/metrics.json`` and ``results.md`` (leaderboard row + all metrics;
    no leaderboard for data without attributes)."""
    rows = []
    if "coherence" in results:
        c, level = results["coherence"], results["meta"]["level"]
        rows = [leaderboard_row(level, model_name, c["c2i"], c["i2c"], c.get("joint"))]
    folder = Path(out_dir) / "results"
    paths = write_results(results, folder, name="metrics", leaderboard=rows)
    md = folder / "results.md"
    os.replace(paths["markdown"], md)
    log.info("joint evaluation written to %s and %s", paths["json"], md)
    return {"json": paths["json"], "markdown": md}
