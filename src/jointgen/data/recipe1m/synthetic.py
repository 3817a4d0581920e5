"""Synthetic Recipe1M in the exact file formats, with learnable image-text structure.

Each recipe belongs to a dish category. A category owns title words, core ingredients, cooking
actions, utensils, two colours and a drawing pattern, so a model can learn to match a recipe's
text with its images; shared pantry words (salt, stir, bowl...) add realistic overlap. Files:
``layer1.json``, ``layer2.json`` (recipes with images only), ``det_ingrs.json`` (aligned with
layer1, about 5% of lines flagged invalid), ``classes1M.pkl`` (two pickles: {id: class},
{class: name}; class 0 = background) and JPEGs under ``images/{partition}/a/b/c/d/{id}.jpg``.

Run ``jointgen-make-recipe1m OUT --num-recipes 2000`` (``--no-images`` writes the JSON only).
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# name, title words, core ingredients, actions, utensils, (colour A, colour B), pattern
CATEGORIES = [
    (
        "chicken_curry",
        ["curry", "masala", "spicy"],
        ["chicken breast", "curry powder", "coconut milk", "ginger", "turmeric", "basmati rice"],
        ["simmer", "saute"],
        ["wok", "skillet"],
        ((200, 140, 30), (240, 200, 80)),
        "dots",
    ),
    (
        "chocolate_cake",
        ["cake", "chocolate", "fudge"],
        ["cocoa powder", "flour", "baking soda", "egg", "dark chocolate", "buttermilk"],
        ["bake", "whisk"],
        ["cake pan", "mixer"],
        ((70, 35, 20), (130, 80, 50)),
        "layers",
    ),
    (
        "caesar_salad",
        ["salad", "caesar", "crisp"],
        ["romaine lettuce", "parmesan cheese", "croutons", "anchovy", "lemon juice", "mayonnaise"],
        ["toss", "chop"],
        ["salad bowl", "cutting board"],
        ((90, 170, 60), (230, 230, 200)),
        "leaves",
    ),
    (
        "tomato_soup",
        ["soup", "tomato", "creamy"],
        ["tomato", "vegetable broth", "heavy cream", "basil", "celery", "carrot"],
        ["puree", "simmer"],
        ["stockpot", "blender"],
        ((190, 40, 30), (240, 120, 90)),
        "rings",
    ),
    (
        "beef_stew",
        ["stew", "beef", "hearty"],
        ["beef chuck", "potato", "carrot", "red wine", "beef broth", "thyme"],
        ["brown", "braise"],
        ["dutch oven", "ladle"],
        ((110, 60, 30), (170, 110, 60)),
        "chunks",
    ),
    (
        "blueberry_muffins",
        ["muffins", "blueberry", "morning"],
        ["blueberries", "flour", "baking powder", "egg", "sugar", "vanilla extract"],
        ["fold", "bake"],
        ["muffin tin", "whisk"],
        ((70, 60, 150), (220, 190, 140)),
        "dots",
    ),
    (
        "shrimp_pasta",
        ["pasta", "shrimp", "garlic"],
        ["shrimp", "linguine", "white wine", "parsley", "red pepper flakes", "lemon zest"],
        ["boil", "saute"],
        ["colander", "saucepan"],
        ((240, 210, 150), (240, 120, 100)),
        "stripes",
    ),
    (
        "guacamole",
        ["guacamole", "avocado", "fresh"],
        ["avocado", "lime juice", "cilantro", "jalapeno", "red onion", "tortilla chips"],
        ["mash", "dice"],
        ["molcajete", "fork"],
        ((110, 170, 50), (60, 110, 30)),
        "chunks",
    ),
    (
        "pancakes",
        ["pancakes", "fluffy", "breakfast"],
        ["flour", "milk", "egg", "maple syrup", "baking powder", "butter"],
        ["flip", "pour"],
        ["griddle", "spatula"],
        ((230, 180, 100), (150, 90, 40)),
        "rings",
    ),
    (
        "lemon_bars",
        ["bars", "lemon", "tangy"],
        ["lemon juice", "lemon zest", "powdered sugar", "flour", "egg", "butter"],
        ["press", "bake"],
        ["baking dish", "zester"],
        ((250, 230, 90), (255, 255, 220)),
        "checks",
    ),
    (
        "pork_tacos",
        ["tacos", "pork", "street"],
        ["pork shoulder", "corn tortillas", "cumin", "chili powder", "pineapple", "queso fresco"],
        ["grill", "shred"],
        ["grill pan", "tongs"],
        ((200, 120, 60), (250, 240, 200)),
        "wedges",
    ),
    (
        "mushroom_risotto",
        ["risotto", "mushroom", "creamy"],
        ["arborio rice", "mushrooms", "parmesan cheese", "shallot", "chicken broth", "white wine"],
        ["stir", "toast"],
        ["heavy pan", "wooden spoon"],
        ((220, 210, 180), (120, 100, 80)),
        "dots",
    ),
    (
        "salmon_teriyaki",
        ["salmon", "teriyaki", "glazed"],
        ["salmon fillet", "soy sauce", "mirin", "brown sugar", "sesame seeds", "green onion"],
        ["glaze", "broil"],
        ["broiler pan", "brush"],
        ((240, 130, 90), (60, 40, 30)),
        "stripes",
    ),
    (
        "apple_pie",
        ["pie", "apple", "classic"],
        ["apples", "cinnamon", "pie crust", "nutmeg", "brown sugar", "cornstarch"],
        ["slice", "crimp"],
        ["pie plate", "rolling pin"],
        ((210, 160, 90), (240, 220, 170)),
        "checks",
    ),
    (
        "green_smoothie",
        ["smoothie", "green", "healthy"],
        ["spinach", "banana", "almond milk", "chia seeds", "kale", "honey"],
        ["blend", "pour"],
        ["blender", "glass"],
        ((100, 200, 90), (200, 240, 180)),
        "rings",
    ),
    (
        "pizza_margherita",
        ["pizza", "margherita", "homemade"],
        ["pizza dough", "mozzarella", "tomato sauce", "basil", "olive oil", "semolina"],
        ["stretch", "bake"],
        ["pizza stone", "peel"],
        ((230, 60, 40), (250, 250, 240)),
        "wedges",
    ),
]
PANTRY = ["salt", "black pepper", "olive oil", "butter", "garlic", "onion", "water", "sugar"]
COMMON_ACTIONS = ["add", "stir", "mix", "heat", "season", "serve", "combine", "cook"]
COMMON_UTENSILS = ["bowl", "pan", "oven", "pot", "plate"]
QUANTITIES = ["1", "2", "3", "1/2", "1/4", "3/4", "1 1/2"]
UNITS = ["cup", "cups", "tablespoons", "teaspoon", "ounces", "pound", "cloves", "pinch of"]
PREPS = ["", "chopped", "minced", "fresh", "diced", "large", "sliced"]
SPLITS = ("train", "val", "test")


def recipe_id(i: int, seed: int) -> str:
    """Ten hex digits, distinct for every index (odd multiplier: a bijection mod 2^40)."""
    return format((i * 0x9E3779B1 + seed * 0x51ED27) % (1 << 40), "010x")


def image_path(image_dir: Path, partition: str, image_id: str) -> Path:
    """Recipe1M layout: ``{partition}/{c0}/{c1}/{c2}/{c3}/{image_id}``."""
    return image_dir / partition / image_id[0] / image_id[1] / image_id[2] / image_id[3] / image_id


def _sentence(rng, cat, ingrs: list[str]) -> str:
    """One instruction built from category words, with shared words mixed in."""
    action = rng.choice(cat[3]) if rng.random() < 0.7 else rng.choice(COMMON_ACTIONS)
    utensil = rng.choice(cat[4]) if rng.random() < 0.7 else rng.choice(COMMON_UTENSILS)
    a, b = rng.sample(ingrs, 2) if len(ingrs) > 1 else (ingrs[0], ingrs[0])
    form = rng.randrange(5)
    if form == 0:
        return f"{action.capitalize()} the {a} in a {utensil}."
    if form == 1:
        return f"{action.capitalize()} {a} and {b} for {rng.randrange(2, 30)} minutes."
    if form == 2:
        return f"Heat the {utensil} and {action} the {a}, stirring often."
    if form == 3:
        return f"In the {utensil}, {action} {a} with {b} until golden."
    return f"{action.capitalize()} everything and serve with {b}."


def make_recipe(
    i: int, seed: int, rng: random.Random, num_categories: int
) -> tuple[dict, dict, int]:
    """layer1 and det_ingrs entries of recipe ``i`` and its category."""
    c = rng.randrange(num_categories)
    cat = CATEGORIES[c % len(CATEGORIES)]
    rid = recipe_id(i, seed)
    names = rng.sample(cat[2], rng.randrange(3, 7)) + rng.sample(PANTRY, rng.randrange(1, 5))
    lines = [
        f"{rng.choice(QUANTITIES)} {rng.choice(UNITS)} {rng.choice(PREPS)} {n}".replace("  ", " ")
        for n in names
    ]
    valid = [rng.random() > 0.05 for _ in names]
    steps = [_sentence(rng, cat, names) for _ in range(rng.randrange(2, 11))]
    lead = rng.choice(["Easy", "Best", "Quick", "Grandma", "Simple"])
    title = f"{lead} {' '.join(rng.sample(cat[1], 2))}"
    if c >= len(CATEGORIES):  # extra categories reuse words, told apart by a numbered title
        title += f" number {c}"
    u = rng.random()
    partition = SPLITS[0 if u < 0.7 else 1 if u < 0.85 else 2]
    layer1 = {
        "id": rid,
        "title": title,
        "partition": partition,
        "url": f"http://recipes.example.org/{rid}",
        "ingredients": [{"text": t} for t in lines],
        "instructions": [{"text": t} for t in steps],
    }
    # an invalid line keeps the raw text, as the im2recipe ingredient parser does
    det = [n if v else t for n, t, v in zip(names, lines, valid)]
    det_entry = {"id": rid, "ingredients": [{"text": t} for t in det], "valid": valid}
    return layer1, det_entry, c


def draw_image(rng, category: int, size: int) -> Image.Image:
    """A picture whose colours and pattern identify the category, with random placement."""
    cat = CATEGORIES[category % len(CATEGORIES)]
    (ca, cb), pattern = cat[5], cat[6]
    jitter = lambda col: tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in col)  # noqa: E731
    img = Image.new("RGB", (size, size), jitter(ca))
    d = ImageDraw.Draw(img)
    step = max(4, size // int(rng.integers(4, 8)))
    off = int(rng.integers(step))
    if pattern in ("stripes", "layers"):
        for y in range(off - step, size, step):
            d.rectangle(
                [0, y, size, y + step // (2 if pattern == "stripes" else 3)], fill=jitter(cb)
            )
    elif pattern in ("dots", "chunks"):
        for _ in range(int(rng.integers(6, 14))):
            x, y, r = rng.integers(0, size, 2).tolist() + [
                int(rng.integers(size // 20 + 1, size // 8 + 2))
            ]
            box = [x - r, y - r, x + r, y + r]
            (d.ellipse if pattern == "dots" else d.rectangle)(box, fill=jitter(cb))
    elif pattern == "rings":
        cx, cy = rng.integers(size // 3, 2 * size // 3 + 1, 2).tolist()
        for r in range(size, 0, -step):
            d.ellipse(
                [cx - r, cy - r, cx + r, cy + r], outline=jitter(cb), width=max(1, step // 3)
            )
    elif pattern == "checks":
        for y in range(0, size, step):
            for x in range((y // step + off) % 2 * step, size, 2 * step):
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=jitter(cb))
    elif pattern == "wedges":
        start = int(rng.integers(360))
        for k in range(0, 360, 60):
            d.pieslice([0, 0, size - 1, size - 1], start + k, start + k + 30, fill=jitter(cb))
    else:  # leaves
        for _ in range(int(rng.integers(5, 10))):
            x, y = rng.integers(0, size, 2).tolist()
            d.ellipse([x, y, x + size // 4, y + size // 10], fill=jitter(cb))
    noise = rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(
        np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    )


class _ArrayWriter:
    """Writes a JSON array one element at a time."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "w", encoding="utf-8")
        self.f.write("[")
        self.n = 0

    def write(self, obj: dict) -> None:
        self.f.write(("\n" if self.n == 0 else ",\n") + json.dumps(obj))
        self.n += 1

    def close(self) -> None:
        self.f.write("\n]\n")
        self.f.close()


def make_recipe1m(
    out_dir: str | Path,
    num_recipes: int = 2000,
    *,
    seed: int = 0,
    images: bool = True,
    image_size: int = 128,
    num_categories: int = 16,
    no_image_rate: float = 0.1,
    max_images: int = 4,
    background_rate: float = 0.1,
    classes: bool = True,
) -> dict[str, int]:
    """Write a synthetic Recipe1M into ``out_dir``; returns counts of what was written.

    Args:
        out_dir: Folder for the JSON files, ``classes1M.pkl`` and ``images/``.
        num_recipes: Recipes in layer1 (any size; the JSON is streamed, up to 1M is fine).
        seed: Seed of every random choice (same seed, same files).
        images: Write the JPEG files (layer2 lists the image ids either way).
        image_size: Side of the square JPEGs.
        num_categories: Dish categories (beyond 16 the word lists repeat with numbered titles).
        no_image_rate: Share of recipes without images (absent from layer2).
        max_images: Most images per recipe.
        background_rate: Share of recipes with class 0 (background) in classes1M.pkl.
        classes: Write ``classes1M.pkl``.
    """
    if num_recipes <= 0 or num_categories <= 0:
        raise ValueError(
            f"num_recipes and num_categories must be positive, got {num_recipes}, {num_categories}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # text: Python's generator is far faster for small choices
    pixels = np.random.default_rng([seed, 1])  # own stream: the JSON is the same with no images
    writers = {k: _ArrayWriter(out / f"{k}.json") for k in ("layer1", "layer2", "det_ingrs")}
    id2class, n_images = {}, 0
    for i in range(num_recipes):
        layer1, det, c = make_recipe(i, seed, rng, num_categories)
        writers["layer1"].write(layer1)
        writers["det_ingrs"].write(det)
        if rng.random() >= no_image_rate:
            ids = [
                recipe_id(n_images + k, seed + 1) + ".jpg"
                for k in range(rng.randint(1, max_images))
            ]
            n_images += len(ids)
            entry = {
                "id": layer1["id"],
                "images": [{"id": m, "url": f"http://img.example.org/{m}"} for m in ids],
            }
            writers["layer2"].write(entry)
            for m in ids if images else ():
                path = image_path(out / "images", layer1["partition"], m)
                path.parent.mkdir(parents=True, exist_ok=True)
                draw_image(pixels, c, image_size).save(path, quality=90)
        id2class[layer1["id"]] = 0 if rng.random() < background_rate else c + 1
    for w in writers.values():
        w.close()
    if classes:
        names = {0: "background"} | {c + 1: _class_name(c) for c in range(num_categories)}
        with open(out / "classes1M.pkl", "wb") as f:
            pickle.dump(id2class, f)
            pickle.dump(names, f)
    return {"recipes": num_recipes, "with_images": writers["layer2"].n, "images": n_images}


def _class_name(c: int) -> str:
    name = CATEGORIES[c % len(CATEGORIES)][0]
    return name if c < len(CATEGORIES) else f"{name}_{c}"


def main(argv: list[str] | None = None) -> None:
    """``jointgen-make-recipe1m OUT [--num-recipes N] [--no-images] ...``."""
    p = argparse.ArgumentParser(prog="jointgen-make-recipe1m", description=__doc__.splitlines()[0])
    p.add_argument(
        "out_dir", help="folder to write layer1.json, layer2.json, det_ingrs.json, images/"
    )
    p.add_argument(
        "--num-recipes", type=int, default=2000, help="recipes in layer1 (default 2000)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-images", action="store_true", help="write the JSON files only")
    p.add_argument("--image-size", type=int, default=128, help="JPEG side in pixels (default 128)")
    p.add_argument("--num-categories", type=int, default=16, help="dish categories (default 16)")
    p.add_argument("--no-classes", action="store_true", help="do not write classes1M.pkl")
    a = p.parse_args(argv)
    try:
        counts = make_recipe1m(
            a.out_dir,
            a.num_recipes,
            seed=a.seed,
            images=not a.no_images,
            image_size=a.image_size,
            num_categories=a.num_categories,
            classes=not a.no_classes,
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    n, m, k = counts["recipes"], counts["with_images"], counts["images"]
    print(f"wrote {n} recipes ({m} with {k} images) to {a.out_dir}")
