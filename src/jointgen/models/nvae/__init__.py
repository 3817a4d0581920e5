"""NVAE network, distributions and objectives (plain torch, importable without Lightning)."""

from jointgen.models.nvae.network import NVAE, NVAEOutput, groups_per_scale

__all__ = ["NVAE", "NVAEOutput", "groups_per_scale"]
