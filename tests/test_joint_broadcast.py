"""Spatial broadcast decoder (models/joint/broadcast.py) and its use in the conv image branch."""

import pytest
import torch
import torch.nn.functional as F

from jointgen.models.joint import ConvImageBranch
from jointgen.models.joint.broadcast import BroadcastDecoder


def _grid(size: int) -> torch.Tensor:
    lin = torch.linspace(-1.0, 1.0, size)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xs, ys])[None]


def test_first_layer_is_a_1x1_conv_over_the_tiled_latent_and_coordinates():
    torch.manual_seed(0)
    dec = BroadcastDecoder(in_dim=5, out_channels=3, size=6, channels=7, layers=0)
    z = torch.randn(4, 5)
    h = dec.latent(z)[:, :, None, None] + dec.coords(dec.grid)
    tiled = torch.cat([z[:, :, None, None].expand(4, 5, 6, 6), _grid(6).expand(4, 2, 6, 6)], 1)
    weight = torch.cat([dec.latent.weight, dec.coords.weight[:, :, 0, 0]], 1)[:, :, None, None]
    torch.testing.assert_close(h, F.conv2d(tiled, weight, dec.latent.bias), atol=1e-5, rtol=0)
    assert dec(z).shape == (4, 3, 6, 6)


def test_learns_to_draw_a_dot_where_the_latent_says():
    # the latent is the dot's position; a decoder that reads (latent, coordinates) per pixel
    # must put the peak there, including at positions it never saw in training
    torch.manual_seed(0)
    size = 8
    dec = BroadcastDecoder(in_dim=2, out_channels=1, size=size, channels=16, layers=1)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    grid = _grid(size)[0]

    def target(pos: torch.Tensor) -> torch.Tensor:
        d2 = ((grid[None] - pos[:, :, None, None]) ** 2).sum(1, keepdim=True)
        return torch.exp(-d2 / 0.05)

    train_pos = torch.rand(512, 2) * 1.6 - 0.8
    train_pos = train_pos[(train_pos[:, 0] < 0) | (train_pos[:, 1] < 0)]  # no top-right quadrant
    for _ in range(300):
        idx = torch.randint(0, len(train_pos), (64,))
        loss = F.mse_loss(dec(train_pos[idx]), target(train_pos[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    unseen = torch.tensor([[0.5, 0.5], [0.3, 0.6]])
    with torch.no_grad():
        out = dec(unseen)[:, 0]
    peak = out.flatten(1).argmax(1)
    cols, rows = peak % size, peak // size
    lin = torch.linspace(-1.0, 1.0, size)
    assert torch.allclose(lin[cols], unseen[:, 0], atol=0.3)
    assert torch.allclose(lin[rows], unseen[:, 1], atol=0.3)


def test_conv_branch_with_a_broadcast_decoder():
    torch.manual_seed(0)
    branch = ConvImageBranch(16, z_dim=4, w_dim=2, hidden_channels=4, decoder="broadcast",
                             broadcast_channels=8, broadcast_layers=2)  # fmt: skip
    assert isinstance(branch.decoder, BroadcastDecoder)
    out = branch.decode(torch.randn(3, 5, 4), torch.randn(3, 5, 2))
    assert out.shape == (3, 5, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="decoder must be one of"):
        ConvImageBranch(16, decoder="mlp")
