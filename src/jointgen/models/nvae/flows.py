"""Volume-preserving autoregressive flows on NVAE posteriors (``num_nf``).

Each unit of ``num_nf`` adds a pair of autoregressive cells per latent group; the second cell
uses spatially mirrored masks (reverse raster order). A cell predicts a shift ``mu`` from the
preceding positions only and applies ``z <- z - mu``: a shift-only IAF with log-det 0
(NVAE, Vahdat & Kautz 2020, arXiv 2007.03898, Sec. 3 and appendix).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from jointgen.models.nvae.layers import WNConv2d


def ar_mask(cout: int, cin: int, k: int, zero_diag: bool, mirror: bool, groups: int = 1):
    """Raster-order mask over space, channel order within the centre pixel.

    Output channel o may see input channel i at the centre pixel when ``i < o`` (``<=`` when the
    diagonal is kept). Channels are compared in units of the output/input channel blocks so that
    expansions (20 -> 120 channels) keep the autoregressive order.
    """
    cin_per_group = cin // groups
    m = torch.ones(cout, cin_per_group, k, k)
    c = k // 2
    m[:, :, c, c + 1 :] = 0
    m[:, :, c + 1 :, :] = 0
    if groups == 1:
        # assign each channel an order in [0, n): out o has order o * n_in // cout, etc.
        n = min(cin, cout)
        o_ord = torch.arange(cout) * n // cout
        i_ord = torch.arange(cin) * n // cin
        allowed = (
            i_ord[None, :] <= o_ord[:, None] if not zero_diag else i_ord[None, :] < o_ord[:, None]
        )
        m[:, :, c, c] = allowed.float()
    elif zero_diag:
        m[:, :, c, c] = 0  # depthwise: a channel may see its own centre only if the diag is kept
    if mirror:
        m = torch.flip(m, dims=(2, 3))
    return m


class MaskedConv2d(WNConv2d):
    """Weight-normalised conv whose kernel is multiplied by a fixed autoregressive mask."""

    def __init__(self, cin, cout, k, zero_diag, mirror, groups=1, bias=True, init_scale=1.0):
        super().__init__(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
        self.register_buffer("mask", ar_mask(cout, cin, k, zero_diag, mirror, groups))
        with torch.no_grad():  # the norm is taken over the *masked* kernel
            self.log_weight_norm.copy_(
                torch.log(self._weight_norm(self.weight * self.mask) + 1e-2) + math.log(init_scale)
            )

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight * self.mask
        return self.log_weight_norm.exp() * w / (self._weight_norm(w) + 1e-5)


class ARCell(nn.Module):
    """Masked 3x3 (E=6, no diagonal), ELU, masked depthwise 5x5, ELU, masked 1x1 (x0.1) = mu."""

    def __init__(self, cz: int, mirror: bool, expand: int = 6) -> None:
        super().__init__()
        hidden = cz * expand
        self.net = nn.Sequential(
            MaskedConv2d(cz, hidden, 3, zero_diag=True, mirror=mirror, bias=False),
            nn.ELU(),
            MaskedConv2d(
                hidden, hidden, 5, zero_diag=False, mirror=mirror, groups=hidden, bias=False
            ),
            nn.ELU(),
            MaskedConv2d(hidden, cz, 1, zero_diag=False, mirror=mirror, init_scale=0.1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.net(z)


class FlowStack(nn.Module):
    """``num_pairs`` pairs of AR cells (normal + mirrored). Log-det is 0 (volume preserving)."""

    def __init__(self, cz: int, num_pairs: int) -> None:
        super().__init__()
        cells = []
        for _ in range(num_pairs):
            cells += [ARCell(cz, mirror=False), ARCell(cz, mirror=True)]
        self.cells = nn.ModuleList(cells)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for cell in self.cells:
            z = cell(z)
        return z
