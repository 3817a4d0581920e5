"""Building blocks of NVAE: weight-normalised convs, Squeeze-and-Excitation, residual cells.

NVAE: A Deep Hierarchical Variational Autoencoder (Vahdat & Kautz, NeurIPS 2020),
https://arxiv.org/abs/2007.03898, official code https://github.com/NVlabs/NVAE (not used here:
this is an independent implementation from the paper and the jointgen spec).

Only torch is imported, so every block can be built and tested without Lightning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BN_MOMENTUM = 0.05  # NVAE uses 0.05 (PyTorch convention) for every BatchNorm
BN_EPS = 1e-5
RES_SCALE = 0.1  # fixed scale of every residual branch; not learned


# --- weight-normalised convolution ----------------------------------------------------------


class WNConv2d(nn.Conv2d):
    """Conv2d with NVAE-style weight normalisation.

    The effective weight is ``exp(log_weight_norm) * w / (||w|| + 1e-5)`` with the norm taken
    per output channel over (Cin, kh, kw). ``log_weight_norm`` starts at ``log(||w|| + 0.01)``
    so the initial effective weight equals PyTorch's default initialisation.
    """

    def __init__(self, *args, weight_norm: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_weight_norm = weight_norm
        if weight_norm:
            init = torch.log(self._weight_norm(self.weight.detach()) + 1e-2)
            self.log_weight_norm = nn.Parameter(init)
        else:
            self.register_parameter("log_weight_norm", None)

    @staticmethod
    def _weight_norm(w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)

    def normalized_weight(self) -> torch.Tensor:
        """The weight the convolution actually applies (what spectral regularisation reads)."""
        if not self.use_weight_norm:
            return self.weight
        # eps 1e-5 in the denominator keeps backward finite when a kernel's norm collapses
        return self.log_weight_norm.exp() * self.weight / (self._weight_norm(self.weight) + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


def conv(cin: int, cout: int, k: int = 3, stride: int = 1, **kw) -> WNConv2d:
    """A weight-normalised conv with bias and 'same' padding (the NVAE default conv)."""
    return WNConv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, **kw)


def plain_conv(cin: int, cout: int, k: int = 1, groups: int = 1) -> WNConv2d:
    """A conv without weight norm and bias: the convs inside inverted residuals."""
    return WNConv2d(
        cin, cout, k, padding=(k - 1) // 2, groups=groups, bias=False, weight_norm=False
    )


def batch_norm(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


# --- memory-lean BatchNorm + Swish -----------------------------------------------------------


class BNSwish(nn.Module):
    """BatchNorm followed by Swish.

    With ``recompute=True`` the pair runs under activation checkpointing, so only the BN input
    is stored for backward (the trick the NVAE paper credits with ~18% memory savings).
    """

    def __init__(self, c: int, recompute: bool = False) -> None:
        super().__init__()
        self.bn = batch_norm(c)
        self.recompute = recompute

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and x.requires_grad:
            return checkpoint(self._f, x, use_reentrant=False)
        return F.silu(self.bn(x))


# --- Squeeze-and-Excitation and skips --------------------------------------------------------


class SE(nn.Module):
    """Squeeze-and-Excitation (Hu et al., 2018): pool, Linear(C, max(C/16, 4)), ReLU, Linear, sigmoid."""

    def __init__(self, c: int) -> None:
        super().__init__()
        hidden = max(c // 16, 4)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Down-sampling skip: Swish, then four shifted 1x1 stride-2 convs concatenated."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        quarter = cout // 4
        sizes = [quarter, quarter, quarter, cout - 3 * quarter]
        self.convs = nn.ModuleList(conv(cin, c, k=1, stride=2) for c in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        # for even sizes the shifted inputs give the same output size as the unshifted one
        return torch.cat([c(xs) for c, xs in zip(self.convs, shifted)], dim=1)


class UpSkip(nn.Module):
    """Up-sampling skip: bilinear x2 (align_corners=True), then a 1x1 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv(cin, cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(x)


# --- residual cells --------------------------------------------------------------------------


class BNSwishConv(nn.Module):
    """BN, Swish, Conv3x3 (WN, bias): the op of encoder and pre-process cells."""

    def __init__(self, cin: int, cout: int, stride: int = 1, recompute: bool = False) -> None:
        super().__init__()
        self.act = BNSwish(cin, recompute)
        self.conv = conv(cin, cout, k=3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(x))


class InvertedResidual(nn.Module):
    """[up x2] BN, 1x1 expand, BN, Swish, depthwise 5x5, BN, Swish, 1x1 project, BN.

    The convs here have neither weight norm nor bias since a BN follows each (spec 1.2).
    """

    def __init__(
        self, cin: int, cout: int, expand: int, upsample: bool = False, recompute: bool = False
    ) -> None:
        super().__init__()
        hidden = cin * expand
        self.upsample = upsample
        self.bn_in = batch_norm(cin)
        self.expand = plain_conv(cin, hidden, 1)
        self.act1 = BNSwish(hidden, recompute)
        self.dw = plain_conv(hidden, hidden, 5, groups=hidden)
        self.act2 = BNSwish(hidden, recompute)
        self.project = plain_conv(hidden, cout, 1)
        self.bn_out = batch_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.act1(self.expand(self.bn_in(x)))
        x = self.act2(self.dw(x))
        return self.bn_out(self.project(x))


class Cell(nn.Module):
    """A residual cell: ``skip(x) + 0.1 * SE(ops(x))``.

    Args:
        kind: one of ``enc`` (normal encoder/pre-process), ``enc_down`` (stride 2, channels x2),
            ``dec`` (decoder normal, inverted residual E=6), ``dec_up`` (x2, channels /2),
            ``post`` (inverted residual E=3), ``post_up``.
        cin: input channels; the output has ``2*cin`` for ``*_down``, ``cin/2`` for ``*_up``.
        use_se: Squeeze-and-Excitation on the residual branch (on in every published run).
        recompute: recompute BN+Swish in backward to save memory.
        checkpoint_cell: activation checkpointing of the whole cell (more memory saved).
    """

    def __init__(
        self,
        kind: str,
        cin: int,
        use_se: bool = True,
        recompute: bool = False,
        checkpoint_cell: bool = False,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.checkpoint_cell = checkpoint_cell
        if kind == "enc":
            cout, self.skip = cin, None
            self.ops = nn.Sequential(
                BNSwishConv(cin, cin, 1, recompute), BNSwishConv(cin, cin, 1, recompute)
            )
        elif kind == "enc_down":
            cout = 2 * cin
            self.skip = FactorizedReduce(cin, cout)
            self.ops = nn.Sequential(
                BNSwishConv(cin, cout, 2, recompute), BNSwishConv(cout, cout, 1, recompute)
            )
        elif kind in ("dec", "post"):
            cout, self.skip = cin, None
            self.ops = InvertedResidual(cin, cin, 6 if kind == "dec" else 3, recompute=recompute)
        elif kind in ("dec_up", "post_up"):
            cout = cin // 2
            self.skip = UpSkip(cin, cout)
            expand = 6 if kind == "dec_up" else 3
            self.ops = InvertedResidual(cin, cout, expand, upsample=True, recompute=recompute)
        else:
            raise ValueError(f"unknown cell kind {kind!r}")
        self.cout = cout
        self.se = SE(cout) if use_se else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x if self.skip is None else self.skip(x)
        return s + RES_SCALE * self.se(self.ops(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_cell and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


# --- combiners -------------------------------------------------------------------------------


class EncCombiner(nn.Module):
    """Encoder combiner: ``enc_feature + Conv1x1(dec_state)``."""

    def __init__(self, c_enc: int, c_dec: int) -> None:
        super().__init__()
        self.conv = conv(c_dec, c_enc, k=1)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return enc + self.conv(dec)


class DecCombiner(nn.Module):
    """Decoder combiner: ``Conv1x1(concat(dec_state, z))`` back to the decoder width."""

    def __init__(self, c_dec: int, c_z: int) -> None:
        super().__init__()
        self.conv = conv(c_dec + c_z, c_dec, k=1)

    def forward(self, dec: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([dec, z], dim=1))
