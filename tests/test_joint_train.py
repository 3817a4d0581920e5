"""End-to-end joint VAE training through the real configs: conv and NVAE image branches."""

import json
from pathlib import Path

import pytest
import torch

from helpers import compose_cfg
from jointgen.models.joint_module import warmup_coeff
from jointgen.train import run_train
from jointgen.utils.checkpoint import model_from_checkpoint

JOINT_TINY = [
    "experiment=joint_shapes",
    "model.prior_fit_steps=20",  # the refit path, cheaply
    "data.level=1",
    "data.image_size=16",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=16",
    "model.net.text.hidden_dim=32",
    "model.net.text.embed_dim=16",
    "model.net.text.decoder_layers=1",
    "trainer.max_epochs=1",
    "logger=csv",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.temperatures=[1.0]",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "final_samples=4",
]
BRANCHES = {
    "conv": ["model/image_branch=conv", "model.net.image.hidden_channels=8"],
    "nvae": ["model/image_branch=nvae", "model.net.image.net.num_channels=8"],
}


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_joint_train_checkpoint_reload(tmp_path, branch):
    """Train one epoch, write the outputs, and reload the best checkpoint: the reloaded
    module gives the same image bound on the same batch and seed."""
    cfg = compose_cfg("train", JOINT_TINY + BRANCHES[branch], tmp_path)
    value = run_train(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    m = summary["metrics"]
    assert value == pytest.approx(m["val/nelbo_best"])
    for key in ("val/nelbo", "val/bpd_img", "val/nll_txt", "test/bpd_img", "test/kl/z"):
        assert key in m and m[key] == m[key]  # present and not NaN
    assert 0 < m["test/bpd_img"] < 16
    assert Path(summary["files"]["samples"]).is_file()

    module, _ = model_from_checkpoint(summary["best_checkpoint"])
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(0)
    a = module.image_nll(x)
    torch.manual_seed(0)
    b = module.image_nll(x)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_importance_weighting_tightens_the_image_bound():
    """With K importance samples the image bound is >= the ELBO on average (IWAE)."""
    from hydra.utils import instantiate

    cfg = compose_cfg("train", JOINT_TINY + BRANCHES["conv"], Path("/tmp/unused"))
    module = instantiate(cfg.model).eval()
    x = torch.rand(8, 3, 16, 16)
    torch.manual_seed(0)
    elbo = torch.stack([module.image_nll(x, K=1) for _ in range(20)]).mean()
    torch.manual_seed(0)
    iwae = torch.stack([module.image_nll(x, K=20) for _ in range(20)]).mean()
    assert iwae <= elbo


def test_warmup_coefficient_closed_form():
    assert warmup_coeff(0, 100, 0.3) == 0.0
    assert warmup_coeff(15, 100, 0.3) == pytest.approx(0.5)
    assert warmup_coeff(30, 100, 0.3) == 1.0 and warmup_coeff(90, 100, 0.3) == 1.0
    assert warmup_coeff(5, 100, 0.0) == 1.0  # no warm-up
    assert warmup_coeff(10, 100, 0.2, delay=0.1) == 0.0  # still in the delay
    assert warmup_coeff(0, 100, 0.3, floor=0.1) == 0.1
