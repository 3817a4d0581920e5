"""jointgen: joint image-caption generative modelling (NVAE, SEJE, joint caption-image VAE)."""

from pathlib import Path

__version__ = "0.1.0"

# Hydra configs: a link to the repository's conf/ in a checkout, real files in an installed wheel
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
