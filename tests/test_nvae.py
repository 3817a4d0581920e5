"""NVAE network, distributions and objective: maths and behaviour on tiny configs."""

import math

import pytest
import torch
import torch.distributions as D

from jointgen.models.nvae import NVAE
from jointgen.models.nvae.distributions import DiscMixLogistic, Normal, standard_normal_like
from jointgen.models.nvae.flows import ARCell
from jointgen.models.nvae.layers import WNConv2d
from jointgen.models.nvae.objectives import (
    SpectralRegularizer,
    balance_alphas,
    balanced_kl,
    bn_loss,
    iw_log_likelihood,
    kl_coeff,
    lr_factor,
    reg_coeff,
)

TINY = dict(num_channels=8, image_size=16, num_groups_per_scale=2)
TINY_CONFIGS = [
    TINY,
    dict(TINY, num_nf=1),
    dict(TINY, num_latent_scales=2, ada_groups=True, image_size=16),
    dict(
        TINY,
        in_channels=1,
        image_size=14,
        pad_input=True,
        decoder_dist="bernoulli",
        num_latent_scales=2,
    ),
]


def nparams(m):
    return sum(p.numel() for p in m.parameters())


class TestBuild:
    # reference counts (spec nvae.md sections 4 and 7), checked on the meta device
    PAPER = {
        "mnist": (
            dict(
                in_channels=1,
                image_size=28,
                pad_input=True,
                decoder_dist="bernoulli",
                num_channels=32,
                num_preprocess_blocks=2,
                num_preprocess_cells=3,
                num_postprocess_blocks=2,
                num_postprocess_cells=3,
                num_latent_scales=2,
                num_groups_per_scale=10,
                ada_groups=True,
            ),
            33.4e6,
        ),
        "cifar10": (dict(num_channels=128, num_groups_per_scale=30, num_nf=1), 130.9e6),
        "celeba64": (
            dict(
                image_size=64,
                num_channels=64,
                num_latent_scales=3,
                num_groups_per_scale=20,
                ada_groups=True,
                num_nf=1,
            ),
            153.3e6,
        ),
        "imagenet32": (dict(num_channels=192, num_groups_per_scale=28, num_nf=1), 268.5e6),
        "celebahq256": (
            dict(
                image_size=256,
                num_channels=30,
                num_latent_scales=5,
                num_groups_per_scale=16,
                ada_groups=True,
                min_groups_per_scale=4,
                num_nf=2,
                num_x_bits=5,
            ),
            330.8e6,
        ),
    }

    @pytest.mark.parametrize("name", list(PAPER))
    def test_paper_parameter_counts(self, name):
        kwargs, ref = self.PAPER[name]
        with torch.device("meta"):
            net = NVAE(**kwargs)
        assert abs(nparams(net) - ref) / ref < 0.01

    def test_small_reference_counts_exact(self):
        # counts of the reference implementation on its CPU benchmark configs (spec section 7)
        assert nparams(NVAE()) == 197_040
        assert round(nparams(NVAE(num_nf=1)) / 1e6, 3) == 0.306
        assert round(nparams(NVAE(image_size=16)) / 1e6, 3) == 0.191
        assert (
            round(
                nparams(NVAE(in_channels=1, decoder_dist="bernoulli", num_latent_scales=2)) / 1e6,
                3,
            )
            == 0.815
        )

    def test_ada_groups(self):
        net = NVAE(
            num_channels=4,
            image_size=64,
            num_latent_scales=3,
            num_groups_per_scale=20,
            ada_groups=True,
        )
        assert net.groups == [20, 10, 5]

    def test_indivisible_size_is_refused(self):
        with pytest.raises(ValueError, match="not divisible"):
            NVAE(image_size=30, num_latent_scales=2)

    def test_non_positive_size_is_refused(self):
        with pytest.raises(ValueError, match="image_size must be positive"):
            NVAE(image_size=0)

    def test_weight_norm_initialisation(self):
        # exp(log(|w| + 0.01)) * w / (|w| + 1e-5): the default init, scaled per out-channel
        conv = WNConv2d(4, 6, 3, padding=1)
        norm = conv.weight.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expect = conv.weight * (norm + 1e-2) / (norm + 1e-5)
        assert torch.allclose(conv.normalized_weight(), expect, atol=1e-6)
        x = torch.randn(2, 4, 5, 5)
        ref = torch.nn.functional.conv2d(x, expect, conv.bias, padding=1)
        assert torch.allclose(conv(x), ref, atol=1e-5)


class TestForward:
    @pytest.mark.parametrize("cfg", TINY_CONFIGS)
    def test_forward_shapes_and_finite(self, cfg):
        net = NVAE(**cfg)
        c, s = net.in_channels, net.image_size
        x = torch.rand(3, c, s, s)
        if net.decoder_dist == "bernoulli":
            x = x.round()
        else:
            x = torch.round(x * 255) / 255
        out = net(x)
        assert out.kl.shape == (3, net.num_groups)
        ll = net.log_likelihood(out, x)
        assert ll.shape == (3,) and torch.isfinite(ll).all() and (ll < 0).all()
        assert net.sample(2, 0.7).shape == (2, c, s, s)
        assert net.reconstruct(x).shape == x.shape

    def test_channels_last_gives_the_same_model(self):
        a = NVAE(**TINY).eval()
        b = NVAE(**TINY, channels_last=True).eval()
        b.load_state_dict(a.state_dict())
        x = torch.round(torch.rand(2, 3, 16, 16) * 255) / 255
        torch.manual_seed(1)
        la = a.log_likelihood(a(x), x)
        torch.manual_seed(1)
        lb = b.log_likelihood(b(x), x)
        assert torch.allclose(la, lb, rtol=1e-4)

    def test_bernoulli_likelihood_is_cropped(self):
        net = NVAE(**TINY_CONFIGS[3])
        assert net.padded_size == 16 and net.image_size == 14
        out = net(torch.zeros(2, 1, 14, 14))
        assert out.dist.logits.shape[-2:] == (14, 14)

    def test_encode_gives_posterior_means(self):
        net = NVAE(**TINY)
        net.eval()
        x = torch.rand(2, 3, 16, 16)
        enc = net.encode(x)
        assert len(enc["mu"]) == net.num_groups
        assert enc["mu"][0].shape == (2, 20, 8, 8)
        assert enc["active"][0].dtype == torch.bool
        assert net.interpolate(x[0], x[1], steps=3).shape == (3, 3, 16, 16)

    def test_temperature_scales_prior_spread(self):
        net = NVAE(**TINY).eval()
        torch.manual_seed(1)
        _, rec_hot = net._walk(None, 64, 1.0)
        torch.manual_seed(1)
        _, rec_cold = net._walk(None, 64, 0.5)
        top_hot, top_cold = rec_hot[0][3], rec_cold[0][3]
        assert torch.allclose(top_cold, 0.5 * top_hot, atol=1e-6)

    def test_conditional_hierarchy(self):
        # the joint model's image branch: every prior, the top one included, depends on z
        net = NVAE(**TINY, cond_dim=5).eval()
        x = torch.round(torch.rand(3, 3, 16, 16) * 255) / 255
        c1, c2 = torch.randn(3, 5), torch.randn(3, 5)
        out = net(x, cond=c1)
        assert torch.isfinite(out.kl).all() and out.kl.shape == (3, 2)
        torch.manual_seed(2)
        s1 = net.sample(3, 1.0, cond=c1)
        torch.manual_seed(2)
        s2 = net.sample(3, 1.0, cond=c2)
        assert not torch.allclose(s1, s2)
        enc = net.encode_features(x)
        torch.manual_seed(3)
        a = net(x, cond=c1).kl
        torch.manual_seed(3)
        b = net(x, cond=c1, encoded=enc).kl
        assert torch.allclose(a, b)
        with pytest.raises(ValueError, match="conditional"):
            net.sample(2)

    def test_flow_is_autoregressive(self):
        # the Jacobian of a shift-only AR cell is unit lower-triangular in raster/channel order
        cell = ARCell(3, mirror=False)
        for p in cell.parameters():
            torch.nn.init.normal_(p, std=0.3)
        z = torch.randn(1, 3, 4, 4)
        jac = torch.autograd.functional.jacobian(
            lambda t: cell(t.view(1, 3, 4, 4)).flatten(), z.flatten()
        )
        # order: position-major then channel, so permute (C, H, W) -> (H, W, C)
        idx = torch.arange(48).view(3, 4, 4).permute(1, 2, 0).flatten()
        j = jac[idx][:, idx]
        assert torch.allclose(j.diagonal(), torch.ones(48))
        assert torch.allclose(j.triu(1), torch.zeros_like(j))
        assert j.tril(-1).abs().sum() > 0  # it does depend on the past


class TestDistributions:
    def test_dmol_sums_to_one_over_all_values(self):
        torch.manual_seed(3)
        m = 3
        params = torch.randn(1, DiscMixLogistic.num_params(3, m), 1, 1) * 2
        levels = torch.arange(256, dtype=torch.float32) / 255
        grid = torch.cartesian_prod(levels, levels, levels)  # all 256^3 RGB values
        total = 0.0
        for chunk in grid.split(2**20):
            x = chunk.view(-1, 3, 1, 1)
            dist = DiscMixLogistic(params.expand(len(x), -1, -1, -1), 3, m, 8)
            total += dist.log_prob(x).double().exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-3)

    @pytest.mark.parametrize("bits", [8, 5])
    def test_dmol_single_channel_per_channel_sum(self, bits):
        m = 10
        params = torch.randn(4, DiscMixLogistic.num_params(1, m), 1, 1) * 3
        n = 2**bits
        x = (torch.arange(n, dtype=torch.float32) / (n - 1)).view(n, 1, 1, 1)
        for i in range(4):
            dist = DiscMixLogistic(params[i : i + 1].expand(n, -1, -1, -1), 1, m, bits)
            assert dist.log_prob(x).exp().sum().item() == pytest.approx(1.0, abs=1e-4)

    def test_dmol_mean_and_sample_in_range(self):
        params = torch.randn(2, 100, 4, 4)
        dist = DiscMixLogistic(params, 3, 10, 8)
        assert dist.mean().min() >= 0 and dist.mean().max() <= 1
        s = dist.sample(1.0)
        assert torch.allclose(s * 255, torch.round(s * 255), atol=1e-4)

    def test_residual_normal_kl_matches_torch(self):
        mu_p, ls_p, dmu, dls = (torch.randn(5, 7) * 2 for _ in range(4))
        q, p = Normal(mu_p + dmu, ls_p + dls), Normal(mu_p, ls_p)
        ref = D.kl_divergence(D.Normal(q.mu, q.sigma), D.Normal(p.mu, p.sigma))
        assert torch.allclose(q.kl(p), ref, atol=1e-5)
        z = q.sample()[0]
        assert torch.allclose(q.log_prob(z), D.Normal(q.mu, q.sigma).log_prob(z), atol=1e-5)

    def test_normal_soft_clamp_and_floor(self):
        n = Normal(torch.tensor([10.0]), torch.tensor([-10.0]))
        assert n.mu.item() == pytest.approx(5.0 * math.tanh(2.0))
        assert n.sigma.item() == pytest.approx(math.exp(-5.0 * math.tanh(2.0)) + 0.01)


class TestObjective:
    def test_iw_bound_is_at_least_elbo(self):
        net = NVAE(**TINY).eval()
        x = torch.round(torch.rand(4, 3, 16, 16) * 255) / 255
        k = 8
        torch.manual_seed(5)
        iw = iw_log_likelihood(net, x, k)
        torch.manual_seed(5)
        elbos = []
        with torch.no_grad():
            for _ in range(k):
                out = net(x)
                elbos.append(net.log_likelihood(out, x) + (out.log_p - out.log_q).sum(1))
        assert (iw >= torch.stack(elbos).mean(0) - 1e-3).all()  # Jensen, same samples

    def test_kl_warmup_schedule(self):
        assert kl_coeff(0, 1000, 0.3, 1e-4, 1e-4) == 1e-4
        assert kl_coeff(150, 1000, 0.3, 0.0, 1e-4) == pytest.approx(0.5)
        assert kl_coeff(900, 1000, 0.3, 1e-4, 1e-4) == 1.0

    def test_lambda_anneal_follows_kl(self):
        assert reg_coeff(0.0, 1e-2, 1.0, True) == pytest.approx(1.0)
        assert reg_coeff(1.0, 1e-2, 1.0, True) == pytest.approx(1e-2)
        assert reg_coeff(0.5, 1e-2, 1.0, True) == pytest.approx(0.1)
        assert reg_coeff(0.5, 1e-2, 1.0, False) == 1e-2

    def test_lr_warmup_then_per_epoch_cosine(self):
        f = lambda s: lr_factor(s, 10, 2, 12, 1e-2, 1e-4)  # noqa: E731
        assert f(0) == pytest.approx(1 / 20) and f(19) == pytest.approx(1.0)
        assert f(20) == f(29) == pytest.approx(1.0)  # epoch 2: cosine not yet stepped
        assert f(30) == f(39) < 1.0  # stepped once per epoch
        assert f(119) * 1e-2 == pytest.approx(1e-4)  # T_max = 12 - 2 - 1 epochs

    def test_kl_balancing(self):
        alphas = balance_alphas([2, 1])  # decoder order: 1 top group (scale 0), then 2 groups
        assert alphas.tolist() == pytest.approx([1.0, 2.0, 2.0])
        kl = torch.tensor([[1.0, 4.0, 0.0], [3.0, 4.0, 0.0]], requires_grad=True)
        bal, c = balanced_kl(kl, alphas, 0.5)
        expect = torch.tensor([2.01, 4.01 / 2, 0.01 / 2])
        expect = expect / expect.mean()
        assert torch.allclose(c, expect, atol=1e-6) and c.mean().item() == pytest.approx(1.0)
        bal.sum().backward()
        assert torch.allclose(kl.grad, expect.expand(2, 3))  # coefficients are detached
        assert torch.equal(balanced_kl(kl, alphas, 1.0)[0], kl.sum(1))

    def test_spectral_norm_estimate(self):
        net = NVAE(**TINY)
        sr = SpectralRegularizer(net, iters=4, first_iters=200)
        est = sr(net)
        exact = 0.0
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.normalized_weight() if isinstance(m, WNConv2d) else m.weight
                exact += torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
        assert est.item() == pytest.approx(exact, rel=2e-2)
        assert bool(sr.initialized) and "u0" in sr.state_dict()
        est.backward()  # differentiable in the weights
        assert net.stem.log_weight_norm.grad is not None

    def test_bn_loss_is_sum_of_max_gamma(self):
        net = NVAE(**TINY)
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        bns[0].weight.data[3] = -5.0
        assert bn_loss(net).item() == pytest.approx(5.0 + (len(bns) - 1) * 1.0)


class TestMemoryLeanFormulations:
    """The memory-saving kernels give the numbers of the straightforward formulas."""

    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("chunk", [1, 1 << 10, 1 << 30])  # 1 image, 2 images, the batch
    def test_dmol_fused_matches_autograd(self, monkeypatch, channels_last, chunk):
        import jointgen.models.nvae.distributions as dist_mod

        monkeypatch.setitem(dist_mod._CHUNK_ELEMENTS, "cpu", chunk)
        torch.manual_seed(0)
        params = torch.randn(5, DiscMixLogistic.num_params(3, 4), 6, 7) * 2
        if channels_last:
            params = params.contiguous(memory_format=torch.channels_last)
        x = torch.round(torch.rand(5, 3, 6, 7) * 255) / 255
        x[:, :, 0] = 0.0  # edge levels take the open tails
        x[:, :, 1] = 1.0
        g = torch.randn(5, 6, 7)
        a = params.clone().requires_grad_()
        lp = DiscMixLogistic(a, 3, 4).log_prob(x)  # the fused, chunked kernel
        lp.backward(g)
        b = params.clone().requires_grad_()
        ref = DiscMixLogistic(b, 3, 4)._log_prob_autograd(x)
        ref.backward(g)
        assert torch.allclose(lp, ref, atol=1e-5)
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            assert torch.allclose(DiscMixLogistic(params, 3, 4).log_prob(x), ref, atol=1e-5)

    @pytest.mark.parametrize("channels_last", [False, True])
    def test_recomputed_bn_swish_matches_plain(self, channels_last):
        from jointgen.models.nvae.layers import BNSwish

        torch.manual_seed(0)
        plain, lean = BNSwish(6, recompute=False), BNSwish(6, recompute=True)
        with torch.no_grad():
            plain.bn.weight.uniform_(0.5, 1.5)
            plain.bn.bias.uniform_(-0.5, 0.5)
        lean.load_state_dict(plain.state_dict())
        x = torch.randn(4, 6, 5, 7) * 3 + 20  # a large mean stresses the input gradient
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(4, 6, 5, 7)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), lean(xb)
        ya.backward(g)
        yb.backward(g)
        assert torch.allclose(ya, yb, atol=1e-6)
        assert torch.allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
        for name in ("weight", "bias"):
            ga, gb = getattr(plain.bn, name).grad, getattr(lean.bn, name).grad
            assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(plain.bn, name), getattr(lean.bn, name))
        if channels_last:
            assert xb.grad.is_contiguous(memory_format=torch.channels_last)

    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("recompute", [False, True])
    def test_up_cell_at_low_resolution_matches_upsample_first(self, channels_last, recompute):
        import copy

        from jointgen.models.nvae.layers import InvertedResidual

        torch.manual_seed(0)
        ref = InvertedResidual(8, 4, 3, upsample=True, recompute=recompute)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        lean = copy.deepcopy(ref)
        ref._low_res = lambda: False  # the straightforward order: upsample, then the cell
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        ref.to(memory_format=fmt)
        lean.to(memory_format=fmt)
        x = (torch.randn(3, 8, 5, 6) * 2 + 1).contiguous(memory_format=fmt)
        g = torch.randn(3, 4, 10, 12)
        for _ in range(2):  # the running statistics of two batches
            results = []
            for m in (ref, lean):
                m.zero_grad()
                xx = x.clone().requires_grad_()
                y = m(xx)
                y.backward(g)
                results.append((y, xx.grad, {n: p.grad for n, p in m.named_parameters()}))
        (ya, gxa, gpa), (yb, gxb, gpb) = results

        def close(a, b, tol=1e-5):  # relative to the tensor's scale (sums of 360 products)
            return (a - b).abs().max() <= tol * a.abs().max().clamp(min=1.0)

        assert close(ya, yb) and close(gxa, gxb)
        for name in gpa:  # bn_in.bias has a zero gradient (the next BN removes any shift)
            assert close(gpa[name], gpb[name]), name
        for (name, a), b in zip(ref.named_buffers(), lean.buffers()):
            assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), name
        ref.eval()
        lean.eval()
        with torch.no_grad():
            assert torch.allclose(ref(x), lean(x), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("kind", ["post_up", "dec_up", "enc", "dec"])
    def test_checkpointed_cell_matches_plain(self, kind):
        import copy

        from jointgen.models.nvae.layers import Cell

        torch.manual_seed(0)
        plain = Cell(kind, 8, recompute=True).to(memory_format=torch.channels_last)
        ckpt = copy.deepcopy(plain)
        ckpt.checkpoint_cell = True
        x = torch.randn(3, 8, 6, 6).contiguous(memory_format=torch.channels_last)
        results = []
        for m in (plain, ckpt):
            for _ in range(2):
                m.zero_grad()
                xx = x.clone().requires_grad_()
                y = m(xx)
                y.backward(torch.ones_like(y))
            results.append((y, xx.grad, [p.grad for p in m.parameters()], list(m.buffers())))
        (ya, gxa, gpa, ba), (yb, gxb, gpb, bb) = results
        assert torch.allclose(ya, yb, atol=1e-6) and torch.allclose(gxa, gxb, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gpa, gpb))
        assert all(torch.equal(a, b) for a, b in zip(ba, bb))  # statistics counted once

    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("chunk", [1, 1 << 30])  # one image per chunk, the whole batch
    @pytest.mark.parametrize(
        "conv_kw",
        [
            dict(k=3, stride=1, bias=True, wn=True, groups=1),  # encoder cells
            dict(k=3, stride=2, bias=True, wn=True, groups=1),  # enc_down
            dict(k=5, stride=1, bias=False, wn=False, groups=6),  # inverted residual depthwise
            dict(k=1, stride=1, bias=False, wn=False, groups=1),  # inverted residual project
        ],
    )
    def test_fused_bn_swish_conv_matches_plain(self, monkeypatch, channels_last, chunk, conv_kw):
        import copy

        import torch.nn.functional as F

        import jointgen.models.nvae.layers as layers

        monkeypatch.setitem(layers._CHUNK_BYTES, "cpu", chunk)
        torch.manual_seed(0)
        k, groups = conv_kw["k"], conv_kw["groups"]
        act = layers.BNSwish(6, recompute=True)
        conv = layers.WNConv2d(
            6, 6, k, stride=conv_kw["stride"], padding=k // 2, groups=groups,
            bias=conv_kw["bias"], weight_norm=conv_kw["wn"],
        )  # fmt: skip
        with torch.no_grad():
            act.bn.weight.uniform_(0.5, 1.5)
            act.bn.bias.uniform_(-0.5, 0.5)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        conv = conv.to(memory_format=fmt)
        act2, conv2 = copy.deepcopy(act), copy.deepcopy(conv)
        x = (torch.randn(4, 6, 8, 10) * 3 + 20).contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layers.bn_swish_conv(act, conv, xa)  # the fused function
        # the plain formula: batch statistics, Swish, the conv with its effective weight
        bn = act2.bn
        xn = F.batch_norm(xb, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.05)
        w = conv2.normalized_weight()
        ref = F.conv2d(F.silu(xn), w, conv2.bias, conv2.stride, conv2.padding, 1, groups)
        g = torch.randn_like(ref)
        y.backward(g)
        ref.backward(g)

        def close(a, b, tol=1e-5):  # relative to the tensor's scale
            return (a - b).abs().max() <= tol * a.abs().max().clamp(min=1.0)

        assert close(y, ref) and close(xa.grad, xb.grad)
        for (name, pa), pb in zip(
            [*act.named_parameters(), *conv.named_parameters()],
            [*act2.parameters(), *conv2.parameters()],
        ):
            assert close(pa.grad, pb.grad), name
        assert torch.equal(act.bn.running_mean, bn.running_mean)
        assert torch.equal(act.bn.running_var, bn.running_var)
        assert int(act.bn.num_batches_tracked) == 1
        if channels_last:
            assert xa.grad.is_contiguous(memory_format=torch.channels_last)

    def test_chunked_up_depthwise_matches_upsample_first(self, monkeypatch):
        import torch.nn.functional as F

        import jointgen.models.nvae.layers as layers

        monkeypatch.setitem(layers._CHUNK_BYTES, "cpu", 1)  # one image per chunk
        torch.manual_seed(0)
        dw = layers.plain_conv(6, 6, 5, groups=6).to(memory_format=torch.channels_last)
        x = torch.randn(3, 6, 4, 5).contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layers.upsample_depthwise(xa, dw)
        ref = F.conv2d(
            F.interpolate(xb, scale_factor=2, mode="nearest"), dw.weight, None, 1, 2, 1, 6
        )
        g = torch.randn_like(ref)
        y.backward(g)
        wa, dw.weight.grad = dw.weight.grad, None
        ref.backward(g)
        assert torch.allclose(y, ref, atol=1e-5)
        assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
        assert torch.allclose(wa, dw.weight.grad, rtol=1e-4, atol=1e-5)

    def test_lean_normal_params_and_kl_match_autograd(self):
        from jointgen.models.nvae.distributions import _kl, soft_clamp5

        torch.manual_seed(0)
        raw = [torch.randn(3, 4, 5, 6) * 4 for _ in range(4)]  # saturating clamps included
        a = [r.clone().requires_grad_() for r in raw]
        b = [r.clone().requires_grad_() for r in raw]
        mu_q, sig_q = soft_clamp5(a[0]), torch.exp(soft_clamp5(a[1])) + 1e-2
        mu_p, sig_p = soft_clamp5(a[2]), torch.exp(soft_clamp5(a[3])) + 1e-2
        kl = _kl(mu_q, sig_q, mu_p, sig_p)  # plain autograd of the formulas
        q, p = Normal(b[0], b[1]), Normal(b[2], b[3])
        kl_lean = q.kl(p)
        assert torch.equal(q.mu, mu_q) and torch.equal(q.sigma, sig_q)
        assert torch.equal(kl_lean, kl)
        gs = [torch.randn_like(kl) for _ in range(3)]
        (kl * gs[0] + mu_q * gs[1] + sig_q * gs[2]).sum().backward()
        (kl_lean * gs[0] + q.mu * gs[1] + q.sigma * gs[2]).sum().backward()
        for x, y in zip(a, b):
            assert (x.grad - y.grad).abs().max() <= 1e-5 * x.grad.abs().max()
        top = standard_normal_like(q.mu)  # constant prior: gradients reach q only
        assert torch.allclose(q.kl(top), _kl(q.mu, q.sigma, top.mu, top.sigma))
