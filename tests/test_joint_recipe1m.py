"""The joint VAE on Recipe1M titles: caption vocabulary, batch contract and masks of the joint
data module, word2vec embeddings, and `jointgen-train experiment=joint_recipe1m` followed by
`jointgen-sample` on a tiny synthetic Recipe1M."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from helpers import compose_cfg, run_cli
from jointgen.callbacks.word2vec_init import Word2VecInit
from jointgen.data.recipe1m import pipeline
from jointgen.data.recipe1m.captions import SEP
from jointgen.data.recipe1m.joint import JointRecipe1MDataModule
from jointgen.data.recipe1m.synthetic import make_recipe1m
from jointgen.data.shapes.vocab import EOS, PAD, SPECIAL_TOKENS
from jointgen.data.word2vec import load_vectors, train_word2vec
from jointgen.utils.checks import ConfigError, check_model_data

VOCAB_SIZE, MAX_LEN = 64, 10


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    """48 synthetic recipes (about a fifth without images), cached with caption-only recipes
    kept, and a tiny word2vec file."""
    d = tmp_path_factory.mktemp("recipe1m")
    make_recipe1m(d, 48, seed=0, image_size=24, no_image_rate=0.2, max_images=2)
    preprocess = {"require_images": False, "verify_images": "none"}
    pipeline.build_cache(d, d / "cache", d / "images", True, preprocess, d / "tokenized_text.txt")
    train_word2vec(
        d / "tokenized_text.txt", d / "vocab.bin", epochs=1, vector_size=8, min_count=2, workers=1
    )
    return d


def datamodule(d: Path, **kw) -> JointRecipe1MDataModule:
    args = dict(
        data_dir=str(d),
        image_dir=str(d / "images"),
        image_partition_folder=True,
        cache_dir=str(d / "cache"),
        vocab={
            "path": str(d / "vocab.bin"),
            "txt_path": None,
            "corpus": str(d / "tokenized_text.txt"),
            "train": {},
        },  # fmt: skip
        preprocess={},
        synthetic=None,
        prepare=False,
        caption="title",
        max_caption_len=MAX_LEN,
        caption_vocab_size=VOCAB_SIZE,
        image_size=16,
        max_images=2,
        limit=None,
        exclude_images_file=None,
        batch_size=8,
        num_workers=0,
        pin_memory=False,
    )
    return JointRecipe1MDataModule(**{**args, **kw})


def title_words(dm: JointRecipe1MDataModule, split: str, k: int) -> list[str]:
    words = dm.cache.words()
    return [words[t - 2] for t in dm.dataset(split).cache.title[int(dm.dataset(split).indices[k])]]


# --- caption vocabulary and embeddings --------------------------------------------------------


class TestCaptions:
    def test_vocabulary_layout(self, recipes):
        dm = datamodule(recipes)
        vocab = dm.vocab
        assert len(vocab) == VOCAB_SIZE and tuple(vocab.itos[:4]) == SPECIAL_TOKENS
        vector_words = set(load_vectors(recipes / "vocab.bin")[0])
        real = [w for w in vocab.words if not w.startswith("<unused")]
        assert real and all(w in vector_words for w in real) and SEP not in vocab.stoi
        big = datamodule(recipes, caption="title_ingredients", caption_vocab_size=400)
        assert big.vocab.words[0] == SEP and big.vocab.words[-1].startswith("<unused")
        assert datamodule(recipes).vocab == vocab  # a pure function of the cache and options

    def test_title_round_trip(self, recipes):
        """title -> tokens -> text: the words of the title (UNK outside the vocabulary), EOS
        and PAD; encoding the title text gives the same tokens."""
        dm = datamodule(recipes, caption_vocab_size=400, max_caption_len=4)
        ds, vocab = dm.dataset("train"), dm.vocab
        for k in range(len(ds)):
            words = title_words(dm, "train", k)
            tokens = ds[k]["tokens"]
            assert tokens.dtype == torch.int64 and tokens.shape == (4,)
            n = min(len(words), 3)
            assert tokens[n] == EOS and (tokens[n + 1 :] == PAD).all()
            want = " ".join(w if w in vocab.stoi else "<unk>" for w in words[:3])
            assert vocab.decode(tokens.tolist()) == want
            assert vocab.encode(" ".join(words), 4) == tokens.tolist()

    def test_title_ingredients(self, recipes):
        dm = datamodule(recipes, caption="title_ingredients", caption_vocab_size=400,
                        max_caption_len=24)  # fmt: skip
        ds, vocab, words = dm.dataset("train"), dm.vocab, dm.cache.words()
        known = lambda ws: " ".join(w if w in vocab.stoi else "<unk>" for w in ws)  # noqa: E731
        i = int(ds.indices[0])
        ingredients = [words[t - 2] for t, ok in zip(ds.cache.ingredients[i],
                       ds.cache.ingredient_valid[i]) if ok]  # fmt: skip
        want = f"{known(title_words(dm, 'train', 0))} {SEP} {known(ingredients)}"
        assert vocab.decode(ds[0]["tokens"].tolist()) == " ".join(want.split()[: 24 - 1])

    def test_word2vec_embeddings(self, recipes):
        dm = datamodule(recipes)
        emb, vocab = dm.caption_embeddings(seed=0), dm.vocab
        words, vectors = load_vectors(recipes / "vocab.bin")
        assert emb.shape == (VOCAB_SIZE, 8) and (emb[PAD] == 0).all()
        w = vocab.words[0]
        assert torch.equal(emb[vocab.stoi[w]], torch.from_numpy(vectors[words.index(w)]))
        assert torch.equal(emb, dm.caption_embeddings(seed=0))


# --- data module ------------------------------------------------------------------------------


class TestDataModule:
    def test_batch_contract(self, recipes):
        dm = datamodule(recipes)
        dm.setup("fit")
        b = next(iter(dm.train_dataloader()))
        assert set(b) == {"image", "tokens", "mask_image", "mask_text", "index"}  # no attrs
        assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == torch.float32
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["tokens"].shape == (8, MAX_LEN) and b["tokens"].dtype == torch.int64
        assert b["mask_image"].dtype == torch.bool and b["mask_text"].dtype == torch.bool
        assert dm.image_shape == (3, 16, 16) and dm.vocab_size == VOCAB_SIZE

    def test_missing_images_are_masked(self, recipes, tmp_path):
        """Recipes without images, with only excluded images or with unreadable files are
        caption-only: zero image, mask_image False, never a white image."""
        dm = datamodule(recipes)
        ds = dm.dataset("train")
        masks = [bool(ds[k]["mask_image"]) for k in range(len(ds))]
        assert not all(masks) and any(masks)  # the synthetic data leave some without images
        for k in range(len(ds)):
            item = ds[k]
            assert bool(item["mask_image"] | item["mask_text"])
            if not item["mask_image"]:
                assert (item["image"] == 0).all() and item["mask_text"]
        unreadable = datamodule(recipes, image_dir=str(tmp_path)).dataset("val")
        assert not any(bool(unreadable[k]["mask_image"]) for k in range(len(unreadable)))
        names = "\n".join(n for i in range(len(dm.cache)) for n in dm.cache.image_names(i))
        (tmp_path / "exclude.txt").write_text(names)
        excluded = datamodule(recipes, exclude_images_file=str(tmp_path / "exclude.txt"))
        item = excluded.dataset("test")[0]
        assert not item["mask_image"] and (item["image"] == 0).all() and item["mask_text"]

    def test_bad_options(self, recipes, tmp_path):
        with pytest.raises(ConfigError, match="data.caption must be one of"):
            datamodule(recipes, caption="ingredients")
        with pytest.raises(ConfigError, match="data.caption_vocab_size"):
            datamodule(recipes, caption_vocab_size=3)
        with pytest.raises(ConfigError, match="data.max_caption_len"):
            datamodule(recipes, max_caption_len=1)
        missing = {"path": str(tmp_path / "vocab.bin"), "txt_path": None, "corpus": "x",
                   "train": {}}  # fmt: skip
        with pytest.raises(FileNotFoundError, match="jointgen-w2v"):
            datamodule(recipes, vocab=missing).setup("fit")


# --- training and sampling through the real configs -------------------------------------------


def tiny(recipes: Path) -> list[str]:
    return [
        "experiment=joint_recipe1m",
        f"data.data_dir={recipes}",
        "data.image_size=16",
        f"data.caption_vocab_size={VOCAB_SIZE}",
        f"data.max_caption_len={MAX_LEN}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.pin_memory=false",
        "model.z_dim=8",
        "model.net.text.hidden_dim=16",
        "data.vocab.dim=8",
        "model.net.text.w_dim=4",
        "model.net.image.expert_hidden=16",
        "model.net.image.net.num_channels=8",
        "model.net.image.net.num_groups_per_scale=1",
        "model.num_iw_samples_test=2",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.sample_grid.temperatures=[1.0]",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "final_samples=4",
    ]


def test_model_vocabulary_must_match_the_data(recipes, tmp_path):
    cfg = compose_cfg("train", [*tiny(recipes), "model.net.text.vocab_size=65"], tmp_path)
    with pytest.raises(ConfigError, match="vocab_size=65 but the data vocabulary has 64"):
        check_model_data(instantiate(cfg.model).net, instantiate(cfg.data))


def test_word2vec_init_callback(recipes, tmp_path):
    """The callback copies the word2vec rows into every matching caption embedding table and
    names the fix when the sizes differ."""
    cfg = compose_cfg("train", tiny(recipes), tmp_path)
    module, dm = instantiate(cfg.model), instantiate(cfg.data)
    trainer = SimpleNamespace(datamodule=dm)
    Word2VecInit(seed=0, freeze=True).setup(trainer, module, "fit")
    want = dm.caption_embeddings(seed=0)
    txt = module.net.branches["txt"]
    tables = [txt.encoder.embed, txt.decoder.embed]  # encoder and autoregressive decoder
    assert all(torch.equal(t.weight, want) and not t.weight.requires_grad for t in tables)
    cfg.model.net.text.embed_dim = 5
    with pytest.raises(ConfigError, match="model.net.text.embed_dim"):
        Word2VecInit().setup(trainer, instantiate(cfg.model), "fit")


def test_train_then_sample_cli(recipes, tmp_path):
    """jointgen-train experiment=joint_recipe1m writes a checkpoint and metrics; jointgen-sample
    (image_to_caption, caption_to_image) and jointgen-eval (the attribute-free part of the
    suite) run on that checkpoint."""
    (tmp_path / "eval").mkdir()
    res = run_cli(["jointgen-train", *tiny(recipes)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = sorted((tmp_path / "logs" / "train" / "runs").glob("*"))
    summary = json.loads((run / "metrics.json").read_text())
    m = summary["metrics"]
    for key in ("val/nelbo_best", "val/bpd_img", "val/nll_txt", "test/bpd_img", "test/nll_txt"):
        assert key in m and np.isfinite(m[key])
    ckpt = Path(summary["best_checkpoint"])
    assert ckpt.is_file() and Path(summary["files"]["samples"]).is_file()

    common = [f"ckpt_path={ckpt}", "num_samples=4", "temperatures=[1.0]", "device=cpu"]
    for mode in ("image_to_caption", "caption_to_image"):
        cwd = tmp_path / mode
        cwd.mkdir()
        res = run_cli(["jointgen-sample", *common, f"mode={mode}"], cwd)
        assert res.returncode == 0, res.stderr[-3000:]
        (out,) = sorted((cwd / "logs" / "sample" / "runs").glob("*"))
        assert (out / f"{mode}_t1.png").is_file()
        rows = [json.loads(r) for r in (out / "captions.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["mode"] == mode and r["source_caption"] for r in rows)
        if mode == "image_to_caption":
            assert all(isinstance(r["caption"], str) for r in rows)

    res = run_cli(["jointgen-eval", f"ckpt_path={ckpt}", "joint.num_samples=4"], tmp_path / "eval")
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = sorted((tmp_path / "eval" / "logs" / "eval" / "runs").glob("*"))
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert "coherence" not in metrics and "fd" not in metrics  # no attributes: skipped
    assert np.isfinite(metrics["likelihood"]["img_nelbo_bpd"])
    assert 0 <= metrics["captions"]["reconstruction"]["token_accuracy"] <= 1
    assert {"bleu4", "exact_match"} <= set(metrics["captions"]["i2c"])
