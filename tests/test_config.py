"""Every experiment composes with every hardware/precision choice; bad values fail early."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from jointgen import CONF_DIR
from jointgen.utils.checks import ConfigError, check_hardware, check_model_data

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (Path(CONF_DIR) / "hardware").glob("*.yaml"))
PRECISION = ["fp32", "bf16", "fp16"]
LOGGERS = ["csv", "wandb", "tensorboard", "none"]
PARAMS = {  # paper counts (spec nvae.md section 4)
    "nvae_mnist": 33.4e6,
    "nvae_cifar10": 130.9e6,
    "nvae_celeba64": 153.3e6,
    "nvae_imagenet32": 268.5e6,
    "nvae_celebahq256": 330.8e6,
    "nvae_ffhq256": 330.8e6,
}


def _compose(name="train", overrides=()):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(experiment):
    extra = ["model.net.pretrained=false"] if experiment.startswith("seje_") else []
    cfg = _compose(overrides=[f"experiment={experiment}", *extra])  # no ImageNet weights here
    assert cfg.data._target_.startswith("jointgen.")
    with torch.device("meta"):
        model = instantiate(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    if experiment in PARAMS:
        assert abs(n - PARAMS[experiment]) / PARAMS[experiment] < 0.01
    dm = instantiate(cfg.data)  # constructors do not touch the disk
    # joint_recipe1m reads its caption vocabulary from the prepared data, so its check runs in
    # tests/test_joint_recipe1m.py
    if experiment.startswith(("nvae_", "joint_")) and experiment != "joint_recipe1m":
        check_model_data(model.net, dm)  # the network is built for the data's images


def test_model_data_mismatch_is_named():
    cfg = _compose(overrides=["experiment=joint_shapes", "model.net.text.vocab_size=50"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    with pytest.raises(ConfigError, match="vocab_size=50"):
        check_model_data(model.net, instantiate(cfg.data))


@pytest.mark.parametrize("hardware", HARDWARE)
@pytest.mark.parametrize("precision", PRECISION)
@pytest.mark.parametrize("logger", LOGGERS)
def test_groups_compose(hardware, precision, logger):
    cfg = _compose(
        overrides=[f"hardware={hardware}", f"precision={precision}", f"logger={logger}"]
    )
    assert cfg.trainer.precision in ("32-true", "bf16-mixed", "16-mixed")
    if hardware in ("multi_gpu", "multi_node", "ddp_cpu"):
        assert cfg.trainer.strategy == "ddp"
        assert cfg.trainer.sync_batchnorm == (hardware != "ddp_cpu")  # torch: GPU-only


def test_fp16_on_cpu_is_refused_with_alternatives():
    cfg = _compose(overrides=["precision=fp16"])
    with pytest.raises(ConfigError, match="precision=bf16 or precision=fp32"):
        check_hardware(cfg)


@pytest.mark.parametrize("root", ["eval", "sample"])
def test_other_roots_compose(root):
    cfg = _compose(root, ["ckpt_path=x.ckpt"])
    assert cfg.ckpt_path == "x.ckpt"


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="no_such_key"):
        _compose(overrides=["model.no_such_key=1"])


def test_configs_ship_inside_the_wheel(tmp_path):
    """An installed wheel (not only the editable checkout) finds conf/."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(repo),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = tmp_path.glob("jointgen-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    code = (
        "import jointgen, pathlib; from hydra import compose, initialize_config_dir;\n"
        "assert pathlib.Path(jointgen.__file__).is_relative_to(pathlib.Path(r'%s'))\n"
        "with initialize_config_dir(version_base='1.3', config_dir=jointgen.CONF_DIR):\n"
        "    cfg = compose('train', overrides=['experiment=nvae_cifar10'])\n"
        "print(cfg.model.net.num_channels)"
    ).replace("%s", str(site))
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "128"
