"""SEJE Lightning module: training on structured fake batches learns, schedule, configs, reload."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from jointgen.models.seje import SEJE
from jointgen.models.seje_module import SEJELitModule, TwoStagePlateau

K_CLASSES, K_SUB, VOCAB, V_KT = 8, 4, 40, 10


class FakeRecipes(Dataset):
    """Pairs whose image and recipe share a class (colour / words / key term) and a sub-type
    (stripe pattern / extra words): 32 distinguishable kinds, the rest is noise."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.cls = torch.randint(0, K_CLASSES, (n,), generator=g)
        self.sub = torch.randint(0, K_SUB, (n,), generator=g)
        palette = torch.Generator().manual_seed(99)
        colours = torch.rand(K_CLASSES, 3, 1, 1, generator=palette) * 2 - 1
        xx = torch.arange(16).float()
        rows, cols = xx[:, None].expand(16, 16), xx[None, :].expand(16, 16)
        patterns = [
            torch.sin((cols if k % 2 else rows) * f) for k, f in enumerate((0.8, 0.8, 2, 2))
        ]
        self.images = torch.stack(
            [colours[c] + patterns[s] for c, s in zip(self.cls, self.sub)]
        ) + 0.3 * torch.randn(n, 3, 16, 16, generator=g)
        # word ids: class words 2..17 (two per class), sub words 18..25, filler 26..39
        words = torch.randint(26, VOCAB, (n, 3, 4), generator=g)
        words[:, 0, 0] = 2 + 2 * self.cls
        words[:, 0, 1] = 3 + 2 * self.cls
        words[:, 1, 0] = 18 + 2 * self.sub
        self.words = words
        self.keyterms = torch.zeros(n, V_KT)
        self.keyterms[torch.arange(n), self.cls.clamp(max=V_KT - 1)] = 1.0

    def __len__(self) -> int:
        return len(self.cls)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "instructions": self.words[i],
            "num_instructions": torch.tensor(3),
            "instruction_lengths": torch.tensor([4, 4, 4]),
            "ingredients": self.words[i, 0],
            "num_ingredients": torch.tensor(4),
            "title": self.words[i, 1],
            "title_length": torch.tensor(4),
            "keyterms": self.keyterms[i],
            "category": self.cls[i] + 1,
            "id": f"{i:05d}",
        }


class FakeRecipeData(pl.LightningDataModule):
    vocab_size, num_keyterms, num_classes = VOCAB, V_KT, K_CLASSES + 1
    word_vectors_path = None
    keyterm_word_ids = torch.arange(V_KT) + 2

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.sets = {"train": FakeRecipes(320, 0), "val": FakeRecipes(96, 1)}
        self.sets["test"] = FakeRecipes(128, 2)

    def train_dataloader(self):
        return DataLoader(self.sets["train"], self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.sets["val"], 64)

    def test_dataloader(self):
        return DataLoader(self.sets["test"], 64)


def tiny_module(**kw) -> SEJELitModule:
    net = SEJE(
        image_encoder="small_cnn", cnn_width=8, embed_dim=32, word_dim=16, sentence_hidden=16,
        instr_hidden=32, disc_hidden=(16, 16),
    )  # fmt: skip
    args = dict(
        optimizer=partial(torch.optim.Adam, lr=3e-3),
        disc_optimizer=partial(torch.optim.Adam, lr=1e-4, betas=(0.5, 0.999)),
        plateau=None, val_bag_size=64, val_bags=3, test_bag_sizes=(64, 128), test_bags=(5, 2),
    )  # fmt: skip
    return SEJELitModule(net, **(args | kw))


def _trainer(tmp_path, epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )  # fmt: skip


@pytest.fixture
def one_thread():
    # tiny ops: OpenMP threads only add contention (10-50x slower on a shared 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("adv", ["bce", "wgan_gp"])
def test_training_learns_and_checkpoint_reloads(tmp_path, adv, one_thread):
    torch.manual_seed(0)
    dm = FakeRecipeData()
    plateau = None if adv == "bce" else {"lr_patience": 1, "stop_patience": 1, "lr_after": 1e-4}
    negatives = "instance_class" if adv == "bce" else "instance"
    model = tiny_module(adv_loss=adv, negatives=negatives, plateau=plateau)
    trainer = _trainer(tmp_path, 6 if adv == "bce" else 1)
    if adv != "bce":  # a smoke run of the other alignment loss
        trainer.limit_train_batches = 3
    assert not model.net.built
    trainer.fit(model, datamodule=dm)
    assert model.net.built and model.net.sizes()["num_classes"] == K_CLASSES + 1
    for key in ("val/score", "val/score_best", "val/medr_r2i", "val/r1_i2r", "train/loss"):
        assert key in trainer.callback_metrics, key
    res = trainer.test(model, datamodule=dm, verbose=False)[0]
    for key in ("test/medr_i2r_64", "test/r10_r2i_128", "test/bags_128"):
        assert key in res
    chance = 128 / 2
    if adv == "bce":  # the long run must learn: median rank far below chance
        assert res["test/medr_i2r_128"] < chance / 4, res
        assert res["test/medr_r2i_128"] < chance / 4, res
    # a fresh, unbuilt module rebuilds itself from the saved weights (jointgen-eval path)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    fresh = tiny_module(adv_loss=adv)
    fresh.load_state_dict(state)
    model.eval(), fresh.eval()
    batch = next(iter(dm.test_dataloader()))
    assert torch.allclose(model.net(batch).rec, fresh.net(batch).rec, atol=1e-6)


def test_two_stage_plateau_schedule():
    opts = [torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-4) for _ in range(2)]
    trainer = SimpleNamespace(
        sanity_checking=False, callback_metrics={}, optimizers=opts, should_stop=False
    )
    module = SimpleNamespace(log=lambda *a, **k: None)
    cb = TwoStagePlateau(lr_patience=3, stop_patience=2, lr_after=1e-5)
    scores = [1.0, 2.0, 1.5, 1.9, 1.0]  # best at epoch 2, then 3 stale -> stage 2
    for s in scores:
        trainer.callback_metrics["val/score"] = torch.tensor(s)
        cb.on_validation_end(trainer, module)
    assert cb.stage == 2 and cb.stale == 0
    assert all(g["lr"] == 1e-5 for o in opts for g in o.param_groups)
    trainer.callback_metrics["val/score"] = torch.tensor(3.0)  # a new best resets the count
    cb.on_validation_end(trainer, module)
    for s in (2.0, 2.5):
        assert not trainer.should_stop
        trainer.callback_metrics["val/score"] = torch.tensor(s)
        cb.on_validation_end(trainer, module)
    assert trainer.should_stop
    restored = TwoStagePlateau()
    restored.load_state_dict(cb.state_dict())
    assert restored.state_dict() == cb.state_dict()


@pytest.mark.parametrize("experiment", ["seje_synthetic", "seje_recipe1m"])
def test_experiment_configs_compose(tmp_path, experiment):
    from helpers import compose_cfg

    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.model._target_.endswith("SEJELitModule")
    assert cfg.callbacks.model_checkpoint.mode == "max"
    assert cfg.optimized_metric == "val/score_best"
    if experiment == "seje_recipe1m":
        assert cfg.data.batch_size == 100 and cfg.model.optimizer.lr == 1e-4
        assert cfg.model.net.image_encoder == "resnext101_32x8d" and cfg.trainer.max_epochs == 500
        assert cfg.model.gamma == 16.0 and cfg.model.adv_weight == 0.005
    else:
        model = instantiate(cfg.model)
        assert isinstance(model, SEJELitModule) and not model.net.built
        assert model.hparams.init_seed == cfg.seed  # the data-sized parts' own seed
        path = tmp_path / "hparams.pt"  # Hydra containers would break weights_only loading
        torch.save(dict(model.hparams), path)
        assert torch.load(path, weights_only=True)["plateau"]["lr_patience"] == 3


def test_run_seje_eval_writes_json_table_and_embeddings(tmp_path, one_thread):
    import json

    import numpy as np
    from omegaconf import OmegaConf

    from jointgen.eval.retrieval_eval import run_seje_eval

    cfg = OmegaConf.create(
        {
            "split": "test",
            "paths": {"output_dir": str(tmp_path)},
            "logger": None,
            "seje": {"bag_sizes": [32, 100], "n_bags": [3, 2]},
            "trainer": {
                "_target_": "lightning.pytorch.Trainer",
                "accelerator": "cpu",
                "devices": 1,
                "enable_progress_bar": False,
                "enable_model_summary": False,
            },
        }
    )
    res = run_seje_eval(cfg, tiny_module(), "m.ckpt", datamodule=FakeRecipeData())
    saved = json.loads((tmp_path / "results" / "retrieval.json").read_text())
    assert saved["metrics"] == pytest.approx(res["metrics"])
    assert saved["n_bags"] == [3, 2] and saved["metrics"]["n_100"] == 100
    table = (tmp_path / "results" / "retrieval.txt").read_text()
    assert "MedR" in table and len(table.strip().splitlines()) == 6
    emb = np.load(tmp_path / "results" / "embeddings.npz")
    assert emb["img"].shape == emb["rec"].shape == (128, 32)
    assert list(emb["ids"]) == sorted(emb["ids"])


def test_word_vectors_and_image_category_classifier_from_files(tmp_path, one_thread):
    import numpy as np

    from jointgen.data.word2vec import save_vectors
    from jointgen.models.seje import build_backbone

    words = [f"w{i}" for i in range(VOCAB - 4)] + ["apple_pie", "pad", "thai", "soup"]
    vectors = np.random.default_rng(0).normal(size=(VOCAB - 2, 16)).astype(np.float32)
    save_vectors(tmp_path / "vocab.bin", words[: VOCAB - 2], vectors)
    (tmp_path / "classes.txt").write_text("apple_pie\npad_thai\nunknown_dish\n")
    clf, _ = build_backbone("small_cnn", width=4, num_classes=3)
    torch.save(clf.state_dict(), tmp_path / "clf.pt")
    dm = FakeRecipeData()
    dm.word_vectors_path = str(tmp_path / "vocab.bin")
    model = tiny_module(
        category_classifier=str(tmp_path / "clf.pt"),
        category_class_names=str(tmp_path / "classes.txt"),
    )
    model.net.category_arch, model.net.cnn_width = "small_cnn", 4
    trainer = _trainer(tmp_path, 1)
    trainer.limit_train_batches = 1
    trainer.fit(model, datamodule=dm)
    emb = model.net.recipe.words.weight.detach()
    assert torch.allclose(emb[2:3], torch.from_numpy(vectors[:1]), atol=1e-2)  # one Adam step
    tokens = model.net.category.class_tokens
    assert tokens[0, 0] == words.index("apple_pie") + 2 and tokens[2].eq(0).all()
