"""Offline evaluation of the joint caption-image VAE (`evaluate_joint`, `jointgen-eval`) and the
cross-coherence training callback."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch import nn

from helpers import compose_cfg, run_cli
from jointgen.callbacks.joint_coherence import CrossCoherence
from jointgen.data.shapes import ShapesDataModule, Vocabulary
from jointgen.eval import FD_LABEL, AttributeClassifier
from jointgen.eval.coherence import parse_captions
from jointgen.eval.joint_likelihood import likelihood_metrics, unimodal_nelbo
from jointgen.eval.joint_runner import coherence_suite, evaluate_joint, seeded, take
from jointgen.utils.runtime import ConfigInCheckpoint
from test_joint_sample import TINY_JOINT, tiny_net


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    dm = ShapesDataModule(
        data_dir=str(tmp_path_factory.mktemp("shapes")), level=3, num_train=32, num_val=24,
        num_test=32, batch_size=8, heldout_fraction=0.2,
    )  # fmt: skip
    dm.setup("test")
    return dm


def _fractions(d: dict) -> list[float]:
    return [v for k, v in d.items() if k in ("strict", "parsed") or k.startswith("acc/")]


class TestEvaluateJoint:
    def test_writes_results_with_sane_values(self, shapes, tmp_path):
        net, clf = tiny_net(), AttributeClassifier(3).eval()  # untrained: FD plumbing only
        torch.manual_seed(5)
        expected_next = torch.rand(3)
        torch.manual_seed(5)
        res = evaluate_joint(
            net, shapes, num_samples=20, probe_samples=32, probe_train=16,
            classifier=clf, classifier_accuracy={"shape": 0.5, "train_seconds": 1.0},
            out_dir=tmp_path, seed=3,
        )  # fmt: skip
        torch.testing.assert_close(torch.rand(3), expected_next)  # global RNG untouched
        on_disk = json.loads((tmp_path / "results" / "metrics.json").read_text())
        assert on_disk["coherence"]["c2i"]["strict"] == res["coherence"]["c2i"]["strict"]
        md = (tmp_path / "results" / "results.md").read_text()
        assert "Txt→Img Strict" in md and "likelihood/img_nelbo_bpd_continuous" in md
        for block in ("coherence", "coherence_heldout"):
            for mode, metrics in res[block].items():
                assert all(0.0 <= v <= 1.0 for v in _fractions(metrics)), (block, mode)
        assert set(res["coherence"]) == {"c2i", "i2c", "joint"}
        assert set(res["coherence_heldout"]) == {"c2i", "i2c"}
        for metrics in res["captions"].values():
            assert all(0.0 <= v <= 1.0 for v in metrics.values())
        lik = res["likelihood"]
        bpd = lik["img_nelbo_nats"] / (3 * 32 * 32 * math.log(2))
        assert lik["img_nelbo_bpd_continuous"] == pytest.approx(bpd)
        assert lik["img_nelbo_bpd_8bit_approx"] == pytest.approx(bpd + 8)
        assert "continuous" in lik["img_kind"] and "img_nelbo_bpd" not in lik
        assert lik["txt_perplexity_bound"] == pytest.approx(
            math.exp(lik["txt_nelbo_nats_per_token"])
        )
        assert res["fd"]["label"] == FD_LABEL
        assert all(res["fd"][k] >= 0 for k in ("reconstruction", "c2i", "prior"))
        assert res["classifier"] == {"acc/shape": 0.5}
        for name in ("z", "w_img", "w_txt"):
            probes = res["probes"][name]
            assert all(0.0 <= v <= 1.0 for v in probes.values())
            assert set(probes) >= {f"probe/{a}" for a in shapes.attr_names}
        assert "r2/rotation" in res["probes"]["private_from_w_img"]

    def test_deterministic_given_the_seed(self, shapes):
        net, data = tiny_net(), take(shapes.datasets["test"], 12)
        runs = []
        for _ in range(2):
            metrics, gen = coherence_suite(net, data, shapes.space, temperature=1.0, num_joint=6)
            with seeded(7):
                lik = likelihood_metrics(net, data["images"].float() / 255, data["tokens"])
            runs.append((metrics, gen["joint"]["captions"], lik))
        assert runs[0] == runs[1]

    def test_importance_sampling_tightens_the_bound(self, shapes):
        net = tiny_net().eval()
        x = shapes.datasets["test"].images[:16].float() / 255
        torch.manual_seed(0)
        elbo = unimodal_nelbo(net, "img", x, K=1).mean()
        iwae = unimodal_nelbo(net, "img", x, K=32).mean()
        assert iwae <= elbo

    def test_bad_arguments(self, shapes):
        with pytest.raises(ValueError, match="image_attributes"):
            evaluate_joint(tiny_net(), shapes, image_attributes="magic")
        with pytest.raises(ValueError, match="split"):
            evaluate_joint(tiny_net(), shapes, split="train")


# --- a perfect oracle -----------------------------------------------------------------------


class OracleNet(nn.Module):
    """Answers every query with real data: the image of a caption's attributes, the caption of
    an image, real pairs as prior samples. ``shift`` pairs everything with the wrong sample."""

    fusion = "oracle"

    def __init__(self, dataset, level: int, shift: int = 0) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.branches = {"txt": type("Txt", (), {"max_len": dataset.tokens.shape[1]})}
        self.images, self.tokens, self.level = dataset.images, dataset.tokens, level
        self.shift, self.vocab = shift, Vocabulary.from_grammar()
        self.by_attrs = {tuple(a): i for i, a in enumerate(dataset.attrs.tolist())}
        self.by_image = {img.numpy().tobytes(): i for i, img in enumerate(dataset.images)}

    def _pick(self, idx: list[int]) -> list[int]:
        return [(i + self.shift) % len(self.images) for i in idx]

    def caption_to_image(self, tokens, temp=1.0):
        rows = parse_captions([self.vocab.decode(t.tolist()) for t in tokens], self.level)
        return self.images[self._pick([self.by_attrs[tuple(r)] for r in rows])].float() / 255

    def image_to_caption(self, images, greedy=True, temp=1.0):
        keys = [(x * 255).round().byte().numpy().tobytes() for x in images]
        return self.tokens[self._pick([self.by_image[k] for k in keys])]

    def sample_joint(self, n, temp=1.0):
        return {
            "image": self.images[:n].float() / 255,
            "tokens": self.tokens[self._pick(range(n))],
        }


@pytest.mark.parametrize("shift", [0, 1])
def test_oracle_is_perfectly_coherent(shapes, shift):
    ds = shapes.datasets["test"]
    data = take(ds, len(ds))
    metrics, _ = coherence_suite(
        OracleNet(ds, 3, shift), data, shapes.space, temperature=1.0, num_joint=len(ds)
    )
    for mode in ("c2i", "i2c", "joint"):
        if shift == 0:
            assert metrics[mode]["strict"] == 1.0, (mode, metrics[mode])
        else:  # mismatched pairs must be caught
            assert metrics[mode]["strict"] < 0.5, (mode, metrics[mode])


# --- the training callback ------------------------------------------------------------------


def test_callback_compute_on_a_joint_vae(shapes):
    cb = CrossCoherence(num_samples=8)
    data = take(shapes.datasets["val"], 8)
    scalars, gen = cb.compute(tiny_net(), data, shapes.space)
    for mode in ("c2i", "i2c", "joint"):
        assert 0.0 <= scalars[f"val/coherence/{mode}_strict"] <= 1.0
        for a in shapes.attr_names:
            assert 0.0 <= scalars[f"val/coherence/{mode}/{a}"] <= 1.0
    assert gen["c2i"]["images"].shape == (8, 3, 32, 32)


class MediaLogger(CSVLogger):
    """A CSV logger that also takes images and tables, as the WandbLogger does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.images, self.tables = [], []

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images.append((key, images))

    def log_table(self, key, columns=None, data=None, step=None, **kwargs) -> None:
        self.tables.append((key, columns, data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny epoch with the coherence callback; returns (trainer, logger, run dir, ckpt)."""
    root = tmp_path_factory.mktemp("joint_run")
    cfg = compose_cfg("train", [*TINY_JOINT, "callbacks=joint"], root)
    OmegaConf.set_struct(cfg, False)
    cfg.paths.data_dir = str(root / "data")
    cb_cfg = cfg.callbacks.cross_coherence
    cb_cfg.num_samples, cb_cfg.num_media = 8, 4
    pl.seed_everything(0)
    model, dm = instantiate(cfg.model), instantiate(cfg.data)
    logger = MediaLogger(str(root / "logs"))
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu",
        logger=logger, callbacks=[instantiate(cb_cfg), ConfigInCheckpoint(cfg)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    ckpt = root / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    return trainer, logger, root, ckpt


def test_callback_logs_keys_and_media_in_a_run(trained):
    trainer, logger, root, _ = trained
    keys = set(trainer.callback_metrics)
    for mode in ("c2i", "i2c", "joint"):
        assert f"val/coherence/{mode}_strict" in keys
        assert {f"val/coherence/{mode}/{a}" for a in ("shape", "size", "colour")} <= keys
    assert (root / "out" / "coherence" / "epoch_000_c2i.png").is_file()
    assert {k for k, _ in logger.images} == {"coherence/c2i", "coherence/i2c", "coherence/joint"}
    ((key, columns, rows),) = logger.tables
    assert key == "coherence/samples" and len(rows) == 4 and len(rows[0]) == len(columns)


def test_eval_cli_on_a_joint_checkpoint(trained, tmp_path):
    ckpt = trained[3]
    args = [
        "jointgen-eval", f"ckpt_path={ckpt}", "joint.num_samples=8", "joint.probe_samples=16",
        "joint.probe_train=8", "joint.frechet=false", "+data.batch_size=4",
    ]  # fmt: skip
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = sorted((tmp_path / "logs" / "eval" / "runs").glob("*"))
    metrics = json.loads((run / "results" / "metrics.json").read_text())
    assert metrics["meta"]["checkpoint"] == str(ckpt) and metrics["meta"]["num_samples"] == 8
    assert 0.0 <= metrics["coherence"]["joint"]["strict"] <= 1.0
    assert "fd" not in metrics and (run / "results" / "results.md").is_file()
