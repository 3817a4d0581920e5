"""Stream the raw Recipe1M files into the compact cache read by the DataModule.

One pass over each JSON file, in bounded memory: ``det_ingrs.json`` and ``layer2.json`` are
reduced to one short string per recipe id, then ``layer1.json`` is streamed, joined with them by
id, filtered, tokenised and appended to the flat arrays of :mod:`.cache`. The word2vec corpus
``tokenized_text.txt`` (one line per recipe: title, ingredient phrases, instructions) is written
on the way. Everything goes to ``<cache_dir>.tmp`` first and is renamed at the end, so an
interrupted run never leaves a cache that looks complete.

Filters (the reference's, configurable): at least one instruction and one valid ingredient,
at most ``max_instructions`` instructions and ``max_ingredients`` valid ingredients (im2recipe
keeps fewer than 20 of each, its ingredient count including an end token), at least one
readable image, not listed in ``remove1M.txt``. Every dropped recipe, missing or corrupt image,
malformed record and id found in one layer only is counted in the report (``meta.json``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from jointgen.data.images.common import IMAGE_ERRORS
from jointgen.data.recipe1m.cache import CACHE_VERSION, SPLITS, RaggedWriter
from jointgen.data.recipe1m.jsonstream import iter_json_array
from jointgen.data.recipe1m.pickles import restricted_load_all
from jointgen.data.recipe1m.text import join_phrases, phrase_token
from jointgen.utils.checks import DataFormatError
from jointgen.utils.progress import track

log = logging.getLogger(__name__)
VERIFY_MODES = ("none", "exists", "open", "decode")
_EXAMPLES = 3  # example ids/paths kept per problem in the report


class _WordIds(dict):
    """word -> id, assigning the next id (from 2; 0 = PAD, 1 = UNK) to unseen words."""

    def __missing__(self, word: str) -> int:
        i = self[word] = len(self) + 2
        return i


class _Report:
    """Counters plus a few examples per problem."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, key: str, example: str | None = None, n: int = 1) -> None:
        self.counts[key] += n
        if example is not None and len(self.examples.setdefault(key, [])) < _EXAMPLES:
            self.examples[key].append(example)

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


def image_file(image_dir: Path, partition: str, name: str, partition_folder: bool) -> Path:
    """Path of image ``name`` in the four-level folder layout (optionally under the partition)."""
    base = image_dir / partition if partition_folder else image_dir
    return base / name[0] / name[1] / name[2] / name[3] / name


def _check_image(path: Path, mode: str) -> str | None:
    """None if the image passes ``mode``, else "missing" or "corrupt"."""
    if mode == "none":
        return None
    if not path.is_file():
        return "missing"
    if mode == "exists":
        return None
    try:
        with Image.open(path) as img:
            if mode == "decode":
                img.load()
    except IMAGE_ERRORS:
        return "corrupt"
    return None


def _read_det(path: Path, chunk_size: int, report: _Report) -> dict[str, str]:
    """det_ingrs.json -> {id: "1olive_oil 0raw_line ..."}: validity bit + phrase token each."""
    out: dict[str, str] = {}
    for n, rec in enumerate(track(iter_json_array(path, chunk_size), f"{path.name} records")):
        try:
            rid, items, valid = _str(rec["id"]), rec["ingredients"], rec["valid"]
            tokens = (
                ("1" if v else "0") + phrase_token(_str(x["text"])) for x, v in zip(items, valid)
            )
            out[rid] = " ".join(t for t in tokens if len(t) > 1)
        except (KeyError, TypeError, IndexError):
            report.add("malformed_det_ingrs", f"{path.name}[{n}]")
    return out


def _read_layer2(path: Path, chunk_size: int, report: _Report) -> dict[str, str]:
    """layer2.json -> {id: newline-joined image names}."""
    out: dict[str, str] = {}
    for n, rec in enumerate(track(iter_json_array(path, chunk_size), f"{path.name} records")):
        try:
            out[_str(rec["id"])] = "\n".join(_str(im["id"]) for im in rec["images"])
        except (KeyError, TypeError, IndexError):
            report.add("malformed_layer2", f"{path.name}[{n}]")
    return out


def _str(x: object) -> str:
    """``x`` if it is a string; a ``TypeError`` (counted as a malformed record) otherwise."""
    if not isinstance(x, str):
        raise TypeError(f"expected a string, got {type(x).__name__}")
    return x


def read_classes(path: Path) -> tuple[dict[str, int], dict[int, str]]:
    """classes1M.pkl: two pickles, {recipe_id: class} then {class: name} (restricted loader).

    Raises:
        DataFormatError: either pickle is not a dict of the expected key and value types, or a
            class is negative or does not fit the int32 cache column (names the entry).
    """
    id2class, class2name = restricted_load_all(path, count=2, encoding="latin1")

    def is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    for what, table, key_ok, value_ok, rule in (
        ("first", id2class, lambda k: isinstance(k, str), is_int, "str -> int"),
        ("second", class2name, is_int, lambda v: isinstance(v, str), "int -> str"),
    ):
        if not isinstance(table, dict):
            raise DataFormatError(
                f"{path}: the {what} pickle is a {type(table).__name__}, not a dict"
            )
        for k, v in table.items():
            if not (key_ok(k) and value_ok(v)):
                raise DataFormatError(f"{path}: {what} pickle entry {k!r}: {v!r} is not {rule}")
    for k, v in [*id2class.items(), *((v, k) for k, v in class2name.items())]:
        if not 0 <= v < 2**31:
            raise DataFormatError(f"{path}: class {v} of {k!r} is outside 0..2^31-1")
    return id2class, class2name


def preprocess_recipe1m(
    data_dir: str | Path,
    cache_dir: str | Path,
    *,
    image_dir: str | Path,
    image_partition_folder: bool = True,
    classes_file: str | Path | None = None,
    remove_ids_file: str | Path | None = None,
    max_instructions: int = 19,
    max_ingredients: int = 18,
    require_images: bool = True,
    verify_images: str = "open",
    corpus_splits: tuple[str, ...] = ("train",),
    corpus_file: str | Path | None = None,
    chunk_size: int = 1 << 20,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build the cache in ``cache_dir`` from the raw files in ``data_dir``; returns meta.json.

    Args:
        data_dir: Folder with ``layer1.json``, ``layer2.json`` and ``det_ingrs.json``.
        cache_dir: Output folder (replaced when the build succeeds).
        image_dir: Root of the image folders.
        image_partition_folder: Images live under ``<image_dir>/<partition>/`` (SEJE, ACME).
        classes_file: ``classes1M.pkl``; None or a missing file gives category 0 everywhere.
        remove_ids_file: ``remove1M.txt`` (one id per line) or None.
        max_instructions: Most instructions a kept recipe may have.
        max_ingredients: Most valid detected ingredients a kept recipe may have.
        require_images: Drop recipes without a usable image.
        verify_images: ``none``, ``exists``, ``open`` (header read) or ``decode`` (full decode).
        corpus_splits: Partitions written to the word2vec corpus (all recipes with text).
        corpus_file: Where to write ``tokenized_text.txt`` (default: in ``cache_dir``).
        chunk_size: Characters read per JSON refill.
        progress: Called with a status line every 100k recipes.
    """
    data_dir, cache_dir, image_dir = Path(data_dir), Path(cache_dir), Path(image_dir)
    if verify_images not in VERIFY_MODES:
        raise ValueError(f"verify_images must be one of {VERIFY_MODES}, got {verify_images!r}")
    bad_splits = set(corpus_splits) - set(SPLITS)
    if bad_splits:
        raise ValueError(f"corpus_splits may hold {SPLITS}, got {sorted(bad_splits)}")
    files = {k: data_dir / f"{k}.json" for k in ("layer1", "layer2", "det_ingrs")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"Recipe1M file not found: {path} (see docs/seje_data.md)")
    t0 = time.perf_counter()
    report = _Report()
    removed: set[str] = set()
    if remove_ids_file:
        removed = set(read_id_list(remove_ids_file))
    id2class: dict[str, int] = {}
    class_names: dict[int, str] = {}
    if classes_file and Path(classes_file).is_file():
        id2class, class_names = read_classes(Path(classes_file))
    elif classes_file:
        log.warning("%s not found: every recipe gets category 0", classes_file)
    det = _read_det(files["det_ingrs"], chunk_size, report)
    layer2 = _read_layer2(files["layer2"], chunk_size, report)

    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    corpus_tmp = tmp / "tokenized_text.txt"
    w = {
        "recipe_ids": RaggedWriter(tmp, "recipe_ids", "B"),
        "title": RaggedWriter(tmp, "title", "i"),
        "sentences": RaggedWriter(tmp, "sentences", "i"),
        "instructions": RaggedWriter(tmp, "instructions", None),
        "ingredients": RaggedWriter(tmp, "ingredients", "i"),
        "ingredient_valid": RaggedWriter(tmp, "ingredient_valid", "B"),
        "images": RaggedWriter(tmp, "images", "B"),
    }
    partition_f = open(tmp / "partition.bin", "wb")
    category_f = open(tmp / "category.bin", "wb")
    ids = _WordIds()
    seen: set[str] = set()
    kept = Counter()
    with open(corpus_tmp, "w", encoding="utf-8") as corpus:
        recipes = track(iter_json_array(files["layer1"], chunk_size), "layer1.json recipes")
        for n, rec in enumerate(recipes):
            if progress and n and n % 100_000 == 0:
                progress(f"{n} recipes read, {sum(kept.values())} kept")
            try:
                rid, title, part = rec["id"], _str(rec.get("title") or ""), rec["partition"]
                steps = [_str(x["text"]) for x in rec["instructions"]]
                if part not in SPLITS or not isinstance(rid, str) or not rid:
                    raise TypeError
            except (KeyError, TypeError, IndexError, AttributeError):
                report.add("malformed_layer1", f"{files['layer1'].name}[{n}]")
                continue
            if rid in seen:
                report.add("duplicate_ids", rid)
                continue
            seen.add(rid)
            d = det.pop(rid, None)
            names = layer2.pop(rid, "")
            if d is None:
                report.add("layer1_without_det_ingrs", rid)
                continue
            phrases = [t[1:] for t in d.split()]
            valid = [t[0] == "1" for t in d.split()]
            good = [p for p, v in zip(phrases, valid) if v]
            lines = join_phrases([title, *steps], good)
            sents = [s for s in lines[1:] if s]
            if part in corpus_splits and sents:
                corpus.write(" ".join([*lines[0], *good, *(t for s in sents for t in s)]) + "\n")
            reason = _drop_reason(rid, sents, good, max_instructions, max_ingredients, removed)
            images = _usable_images(
                names, image_dir, part, image_partition_folder, verify_images, report
            )
            if reason is None and require_images and not images:
                reason = "dropped_no_images"
            if reason:
                report.add(reason, rid)
                continue
            kept[part] += 1
            w["recipe_ids"].append(rid.encode("ascii", "replace"))
            w["title"].append([ids[t] for t in lines[0]])
            w["sentences"].append_rows([[ids[t] for t in s] for s in sents])
            w["instructions"].append(length=len(sents))
            w["ingredients"].append([ids[p] for p in phrases])
            w["ingredient_valid"].append(bytes(valid))
            w["images"].append("\n".join(images).encode("utf-8"))
            partition_f.write(bytes([SPLITS.index(part)]))
            category_f.write(int(id2class.get(rid, 0)).to_bytes(4, "little", signed=True))
    for x in w.values():
        x.close()
    partition_f.close()
    category_f.close()
    if det:
        report.add("det_ingrs_only_ids", next(iter(det)), n=len(det))
    if layer2:
        report.add("layer2_only_ids", next(iter(layer2)), n=len(layer2))
    words = sorted(ids, key=ids.__getitem__)
    (tmp / "words.txt").write_text("".join(x + "\n" for x in words), encoding="utf-8")
    meta = {
        "version": CACHE_VERSION,
        "num_recipes": sum(kept.values()),
        "splits": {s: kept[s] for s in SPLITS},
        "num_words": len(words) + 2,
        # a class used by id2class but missing from the names still needs an output
        "num_classes": int(max([0, *class_names, *id2class.values()])) + 1,
        "class_names": {str(k): v for k, v in sorted(class_names.items())},
        "classes_file": str(classes_file) if class_names else None,
        "recipes_read": len(seen),
        "report": report.to_dict(),
        "params": {
            "max_instructions": max_instructions,
            "max_ingredients": max_ingredients,
            "require_images": require_images,
            "verify_images": verify_images,
            "corpus_splits": list(corpus_splits),
            "image_partition_folder": image_partition_folder,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)
    if corpus_file:
        Path(corpus_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(cache_dir / "tokenized_text.txt", corpus_file)
    return meta


def read_id_list(path: str | Path) -> list[str]:
    """Whitespace-separated ids of a text file such as ``remove1M.txt``."""
    try:
        return Path(path).read_text(encoding="utf-8").split()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte offset {e.start})") from None


def _drop_reason(rid, sents, good, max_instructions, max_ingredients, removed) -> str | None:
    if not sents:
        return "dropped_no_instructions"
    if not good:
        return "dropped_no_ingredients"
    if len(sents) > max_instructions:
        return "dropped_too_many_instructions"
    if len(good) > max_ingredients:
        return "dropped_too_many_ingredients"
    if rid in removed:
        return "dropped_remove_list"
    return None


def _usable_images(names, image_dir, part, partition_folder, mode, report) -> list[str]:
    if not names:
        return []
    if mode == "none":  # the common case at scale: no path work at all
        return [n for n in names.split("\n") if n]
    base = os.path.join(image_dir, part) if partition_folder else str(image_dir)
    out = []
    for name in names.split("\n"):
        path = (
            os.path.join(base, name[0], name[1], name[2], name[3], name) if len(name) > 4 else None
        )
        problem = "missing" if path is None else _check_image(Path(path), mode)
        if problem:
            report.add(f"images_{problem}", str(path or name))
        else:
            out.append(name)
    return out


def summarise(meta: dict) -> list[str]:
    """Human-readable lines of a cache's preprocessing report."""
    s = meta["splits"]
    lines = [
        f"kept {meta['num_recipes']} of {meta['recipes_read']} recipes "
        f"(train {s['train']}, val {s['val']}, test {s['test']}) in {meta['seconds']} s",
    ]
    examples = meta["report"]["examples"]
    for key, n in meta["report"]["counts"].items():
        ex = examples.get(key)
        lines.append(f"{key}: {n}" + (f" (e.g. {', '.join(ex)})" if ex else ""))
    return lines
