"""Spatial broadcast decoder for the light conv image branch.

Watters, Matthey, Burgess & Lerchner, "Spatial Broadcast Decoder: A Simple Architecture for
Learning Disentangled Representations in VAEs", arXiv 1901.07017 (2019). The latent is tiled
over the full image grid together with the pixel coordinates, and stride-1 convolutions map
every pixel to its output. Each pixel then computes its value from (latent, where it is), so
drawing a shape at another position or scale reuses the same weights; an up-sampling decoder
must learn every shape separately in every cell of its first 4x4 feature map. Only torch is
imported.
"""

from __future__ import annotations

import torch
from torch import nn


class AddCoords(nn.Module):
    """Appends the x and y pixel coordinates in [-1, 1] as two channels (CoordConv, Liu et al.,
    NeurIPS 2018, arXiv 1807.03247): a conv can then place a shape's outline by position."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = h.shape
        ys = torch.linspace(-1.0, 1.0, hh, device=h.device, dtype=h.dtype)
        xs = torch.linspace(-1.0, 1.0, ww, device=h.device, dtype=h.dtype)
        ys, xs = (
            ys.view(1, 1, hh, 1).expand(b, 1, hh, ww),
            xs.view(1, 1, 1, ww).expand(b, 1, hh, ww),
        )
        return torch.cat([h, xs, ys], dim=1)


class BroadcastDecoder(nn.Module):
    """``(N, in_dim)`` latents -> ``(N, out_channels, size, size)`` pre-activation outputs.

    The first layer is a 1x1 conv over [tiled latent, x, y], computed as a linear map of the
    latent plus a linear map of the coordinates (the same sum, without building the tiled
    tensor). Then ``layers`` CoordConv 3x3 convs (``AddCoords``) with SiLU, and a 1x1 conv to
    the outputs.

    Args:
        in_dim: size of the latent ([z, w]).
        out_channels: output channels.
        size: side of the square output.
        channels: width of every hidden layer.
        layers: 3x3 conv layers after the broadcast (their receptive field is 2·layers + 1).
    """

    def __init__(
        self, in_dim: int, out_channels: int, size: int, channels: int = 32, layers: int = 3
    ) -> None:
        super().__init__()
        if channels < 1 or layers < 0 or size < 1:
            raise ValueError(
                f"broadcast decoder needs channels >= 1, layers >= 0, size >= 1; got "
                f"{channels}, {layers}, {size}"
            )
        self.latent = nn.Linear(in_dim, channels)
        self.coords = nn.Conv2d(2, channels, 1, bias=False)
        grid = AddCoords()(torch.zeros(1, 0, size, size))  # (1, 2, size, size): x, y
        self.register_buffer("grid", grid, persistent=False)
        body: list[nn.Module] = [nn.SiLU()]
        for _ in range(layers):
            body += [AddCoords(), nn.Conv2d(channels + 2, channels, 3, padding=1), nn.SiLU()]
        body.append(nn.Conv2d(channels, out_channels, 1))
        self.body = nn.Sequential(*body)

    def forward(self, zw: torch.Tensor) -> torch.Tensor:
        h = self.latent(zw)[:, :, None, None] + self.coords(self.grid.to(zw.dtype))
        return self.body(h)
