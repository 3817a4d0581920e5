"""Generation API, captioned grids and `jointgen-sample` for the joint caption-image VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from helpers import compose_cfg, run_cli
from jointgen.data.shapes import ShapesDataModule, Vocabulary
from jointgen.generate import MODES, annotate, generate, render_samples, take_result
from jointgen.models.joint import ConvImageBranch, JointVAE, TextBranch
from jointgen.utils.images import captioned_grid, render_captioned_grid

# a joint model small enough for a CPU test (the joint_shapes experiment, shrunk)
TINY_JOINT = [
    "experiment=joint_shapes",
    "model.prior_fit_steps=20",  # the refit path, cheaply
    "model/image_branch=conv",
    "data.num_train=32",
    "data.num_val=16",
    "data.num_test=16",
    "data.batch_size=8",
    "model.z_dim=8",
    "model.net.image.hidden_channels=4",
    "model.net.image.w_dim=4",
    "model.net.text.embed_dim=8",
    "model.net.text.hidden_dim=16",
    "model.net.text.decoder_layers=1",
    "model.net.text.num_heads=2",
]


def tiny_net(seed: int = 0) -> JointVAE:
    torch.manual_seed(seed)
    vocab = Vocabulary.from_grammar()
    image = ConvImageBranch(32, z_dim=8, w_dim=4, hidden_channels=4)
    text = TextBranch(len(vocab), 16, z_dim=8, w_dim=2, embed_dim=8, hidden_dim=16,
                      decoder_layers=1, num_heads=2)  # fmt: skip
    return JointVAE(image, text)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    dm = ShapesDataModule(
        data_dir=str(tmp_path_factory.mktemp("shapes")), level=3, num_train=16, num_val=16,
        num_test=16, batch_size=8,
    )  # fmt: skip
    dm.setup("test")
    return dm


class TestGenerate:
    @pytest.mark.parametrize("mode", MODES)
    def test_modes_grids_and_records(self, mode, shapes, tmp_path):
        ds = shapes.datasets["test"]
        out = generate(
            tiny_net(), mode, 6, 0.8, tokens=ds.tokens, images=ds.images, attrs=ds.attrs
        )
        assert out["mode"] == mode and len(out["index"]) == 6
        if mode != "image_to_caption":
            assert out["images"].shape == (6, 3, 32, 32)
            assert 0 <= out["images"].min() and out["images"].max() <= 1
        if mode != "caption_to_image":
            assert len(out["captions"]) == 6 and out["tokens"].shape == (6, 16)
        records = annotate(out, shapes.space)
        assert len(records) == 6
        for r in records:
            json.dumps(r)  # JSON-ready
            assert set(r["right"]) == set(shapes.attr_names)
            assert r["strict"] == all(r["right"].values())
        if mode in ("caption_to_image", "image_to_caption", "reconstruct"):
            assert records[0]["target_attrs"] == shapes.space.describe(tuple(ds.attrs[0].tolist()))
            assert records[0]["source_caption"] == str(ds.captions[0])
        path = render_samples(out, records, tmp_path / f"{mode}.png")
        width, height = Image.open(path).size
        assert width > 96 and height > 96

    def test_seeded_generation_is_reproducible(self):
        net = tiny_net()
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(generate(net, "joint", 4, 1.0)["images"])
        torch.testing.assert_close(runs[0], runs[1])
        torch.manual_seed(3)
        other = generate(net, "caption_to_image", captions=["a large red star"])
        assert other["source_captions"] == ["a large red star"]

    def test_training_flag_restored_and_bad_input(self):
        net = tiny_net().train()
        generate(net, "joint", 2)
        assert net.training
        with pytest.raises(ValueError, match="needs captions"):
            generate(net, "caption_to_image", 2)
        with pytest.raises(ValueError, match="mode must be"):
            generate(net, "dream", 2)
        with pytest.raises(TypeError, match="not a joint VAE"):
            generate(torch.nn.Linear(2, 2), "joint", 2)

    def test_wrong_caption_is_flagged(self, shapes):
        # a source caption that contradicts the given attributes must not check out
        ds = shapes.datasets["test"]
        out = generate(tiny_net(), "image_to_caption", images=ds.images[:2], attrs=ds.attrs[:2])
        out["captions"] = [str(ds.captions[0]), str(ds.captions[0])]
        records = annotate(out, shapes.space)
        assert records[0]["strict"]
        same = (ds.attrs[1] == ds.attrs[0]).all()
        assert records[1]["strict"] == bool(same)
        assert take_result(out, 1)["captions"] == [str(ds.captions[0])]


def test_captioned_grid_layout(tmp_path):
    images = torch.rand(5, 3, 16, 16)
    grid = captioned_grid(images, ["a"] * 5, ncol=3, cell=32)
    assert grid.size[0] > 3 * 32 and grid.size[1] > 2 * 32
    # the image cells are nearest-neighbour upscaled (x2) copies of the inputs
    pixel = np.asarray(grid)[4 + 3, 4 + 3]
    expected = (images[0, :, 1, 1] * 255).round().byte().numpy()
    np.testing.assert_array_equal(pixel, expected)
    path = render_captioned_grid(images[:1], ["one " * 30], tmp_path / "g.png", cell=32)
    assert path.is_file()
    with pytest.raises(ValueError, match="one caption per image"):
        captioned_grid(images, ["a"])


# --- jointgen-sample ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained joint checkpoint in the format jointgen-train writes (config inside)."""
    root = tmp_path_factory.mktemp("joint_ckpt")
    cfg = compose_cfg("train", TINY_JOINT, root / "run")
    OmegaConf.set_struct(cfg, False)
    cfg.paths.data_dir = str(root / "data")
    model = instantiate(cfg.model)
    path = root / "joint.ckpt"
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt = {"state_dict": model.state_dict(), "jointgen_config": config}
    torch.save(ckpt, path)
    return root, path


def _single_run(root: Path, task: str = "sample") -> Path:
    (run,) = sorted((root / "logs" / task / "runs").glob("*"))
    return run


def test_sample_cli_joint_modes(joint_ckpt, tmp_path):
    root, ckpt = joint_ckpt
    args = [f"ckpt_path={ckpt}", "num_samples=4", "temperatures=[0.5,1.0]", "device=cpu"]
    res = run_cli(["jointgen-sample", *args, "mode=reconstruct"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = _single_run(tmp_path)
    assert (run / "reconstruct_t0.5.png").is_file() and (run / "reconstruct_t1.png").is_file()
    rows = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["temperature"] for r in rows} == {0.5, 1.0}
    assert all(r["mode"] == "reconstruct" and "right_caption" in r for r in rows)

    other = tmp_path / "c2i"
    other.mkdir()
    res = run_cli(
        ["jointgen-sample", *args, "mode=caption_to_image", "captions=[a large red star]"], other
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (_single_run(other) / "captions.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    assert first["source_caption"] == "a large red star"
    assert first["target_attrs"] == {"shape": "star", "size": "large", "colour": "red"}


def test_sample_cli_refuses_old_pixel_mode(tmp_path):
    res = run_cli(["jointgen-sample", "ckpt_path=x.ckpt", "mode=sample"], tmp_path)
    assert res.returncode == 2
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "pixel_mode" in line
