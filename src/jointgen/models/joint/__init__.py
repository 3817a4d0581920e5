"""Joint caption–image VAE core: posterior families, fusion operators, branches and bounds.

Plain ``nn.Module``s and functions (torch only); the LightningModule lives elsewhere. Spec:
``shared/spec/joint_vae.md`` §3. The branch interface is documented in
``jointgen.models.joint.image_conv``.
"""

from jointgen.models.joint.branch import BranchTerms, FlatPrivate, ModalityBranch
from jointgen.models.joint.collapse import active_units, free_bits, mutual_information
from jointgen.models.joint.distributions import (
    Laplace,
    Normal,
    log_mean_exp,
    make_dist,
    soft_clamp,
    standard,
)
from jointgen.models.joint.fusion import (
    FUSIONS,
    Mixture,
    SubsetMixture,
    mmvae_plus,
    moe,
    mopoe,
    nonempty_subsets,
    poe,
)
from jointgen.models.joint.image_conv import ConvImageBranch
from jointgen.models.joint.network import JointOutput, JointVAE
from jointgen.models.joint.objectives import resolve_likelihood_scales
from jointgen.models.joint.text import CaptionEncoder, NonAutoregressiveDecoder
from jointgen.models.joint.text_ar import AutoregressiveDecoder, word_dropout
from jointgen.models.joint.text_branch import TextBranch

__all__ = [
    "FUSIONS",
    "AutoregressiveDecoder",
    "BranchTerms",
    "CaptionEncoder",
    "ConvImageBranch",
    "FlatPrivate",
    "JointOutput",
    "JointVAE",
    "Laplace",
    "Mixture",
    "ModalityBranch",
    "NonAutoregressiveDecoder",
    "Normal",
    "SubsetMixture",
    "TextBranch",
    "active_units",
    "free_bits",
    "log_mean_exp",
    "make_dist",
    "mmvae_plus",
    "moe",
    "mopoe",
    "mutual_information",
    "nonempty_subsets",
    "poe",
    "resolve_likelihood_scales",
    "soft_clamp",
    "standard",
    "word_dropout",
]
