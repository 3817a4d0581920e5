"""Generation-time mixture priors of the joint VAE (``jointgen.models.joint.latent_prior``)."""

import math

import pytest
import torch

from jointgen.models.joint.latent_prior import (
    ConditionalMixturePrior,
    GaussianMixture,
    MixturePrior,
    mixture_nll,
)
from test_joint_core import Z, grads, run, tiny_batch, tiny_model


def _mixture(seed=0, B=3, K=4, D=5):
    g = torch.Generator().manual_seed(seed)
    log_w = torch.randn(B, K, generator=g).log_softmax(-1)
    return GaussianMixture(
        log_w, torch.randn(B, K, D, generator=g), 0.3 * torch.randn(B, K, D, generator=g)
    )


def test_log_prob_matches_torch_distributions():
    mix = _mixture()
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=mix.log_weights),
        torch.distributions.Independent(
            torch.distributions.Normal(mix.loc, mix.log_scale.exp()), 1
        ),
    )
    z = torch.randn(7, 3, 5)  # a sample axis in front of the batch
    torch.testing.assert_close(mix.log_prob(z), ref.log_prob(z))


def test_samples_follow_the_weights_and_temperature_zero_is_the_heaviest_mean():
    loc = torch.tensor([[[-10.0], [10.0]]]).expand(4000, 2, 1)
    log_w = torch.tensor([math.log(0.8), math.log(0.2)]).expand(4000, 2)
    mix = GaussianMixture(log_w, loc, torch.zeros(4000, 2, 1))
    torch.manual_seed(0)
    z = mix.sample()
    share = (z < 0).float().mean().item()
    assert abs(share - 0.8) < 0.03  # 4000 draws: sd 0.006
    assert abs(z[z < 0].std().item() - 1.0) < 0.1  # within a component: its Normal
    torch.testing.assert_close(mix.sample(temp=0.0), torch.full((4000, 1), -10.0))


def test_maximum_likelihood_fit_learns_a_bimodal_density():
    # two modes at +-3: the best single Gaussian has variance 10, NLL 0.5 log(2 pi e 10) = 2.57
    torch.manual_seed(0)
    prior = MixturePrior(1, 2)
    opt = torch.optim.Adam(prior.parameters(), lr=5e-2)
    keep = torch.ones(256, dtype=torch.bool)
    for _ in range(400):
        target = torch.randn(256, 1) * 0.5 + 3 * (torch.rand(256, 1) < 0.5).float() * 2 - 3
        loss = mixture_nll(prior(), target, keep)
        opt.zero_grad()
        loss.backward()
        opt.step()
    single = 0.5 * math.log(2 * math.pi * math.e * (9 + 0.25))
    exact = 0.5 * math.log(2 * math.pi * math.e * 0.25) + 0.0  # two well-separated equal halves
    assert loss.item() < single - 1.0
    assert abs(loss.item() - (exact + math.log(2))) < 0.15
    assert sorted(prior.loc.detach().flatten().tolist()) == pytest.approx([-3, 3], abs=0.2)


def test_conditional_prior_starts_near_the_expert_and_ignores_masked_samples():
    from jointgen.models.joint import Normal

    torch.manual_seed(0)
    expert = Normal(torch.randn(6, Z) * 5, torch.zeros(6, Z), clamp=False)
    prior = ConditionalMixturePrior(Z, 3, hidden=16)
    mix = prior(expert)
    assert mix.loc.shape == (6, 3, Z) and mix.log_weights.shape == (6, 3)
    assert (mix.loc - expert.loc.unsqueeze(1)).abs().max() < 2.0  # offsets from the expert
    keep = torch.tensor([True, True, False, False, True, False])
    target = torch.randn(6, Z)
    poisoned = target.clone()
    poisoned[~keep] = 1e6
    torch.testing.assert_close(mixture_nll(mix, target, keep), mixture_nll(mix, poisoned, keep))


def test_priors_train_only_themselves_and_drive_generation():
    batch = tiny_batch()
    plain = tiny_model(likelihood_scale="none", kl_align=("img",))
    fitted = tiny_model(
        likelihood_scale="none", kl_align=("img",), caption_prior_components=3,
        joint_prior_components=5, prior_hidden=16,
    )  # fmt: skip
    fitted.load_state_dict(plain.state_dict(), strict=False)
    out_plain, out_fitted = run(plain, batch), run(fitted, batch)
    # the bound and every branch gradient are unchanged; the priors get their own gradients
    torch.testing.assert_close(out_plain.bound, out_fitted.bound)
    g_plain, g_fitted = grads(plain), grads(fitted)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_fitted[name], g, msg=name)
    for prior in (fitted.caption_prior, fitted.joint_prior):
        g = grads(prior)
        assert g and all(v.abs().sum() > 0 for v in g.values())
    assert {"prior_nll/caption", "prior_nll/joint"} <= set(out_fitted.terms)
    # caption-to-image reads the caption prior: temp 0 is the heaviest component's mean
    with torch.no_grad():
        q = fitted.unimodal_posterior("txt", batch["tokens"])
        z0 = fitted.caption_prior(q).sample(0.0)
        want = fitted.branches["img"].generate(z0, 0.0)
        torch.testing.assert_close(fitted.caption_to_image(batch["tokens"], 0.0), want)
        torch.manual_seed(3)
        joint = fitted.sample_joint(4)
    assert joint["image"].shape == (4, 3, 8, 8) and joint["tokens"].shape[0] == 4


def test_bad_prior_settings_are_rejected():
    with pytest.raises(ValueError, match="caption_prior_components"):
        tiny_model(caption_prior_components=-1)
    with pytest.raises(ValueError, match="normal posteriors"):
        tiny_model(family="laplace", joint_prior_components=4)
    with pytest.raises(ValueError, match="components"):
        MixturePrior(4, 0)


def test_refit_lowers_the_priors_nll_and_leaves_the_network_alone():
    from functools import partial

    from jointgen.models.joint_module import JointLitModule

    torch.manual_seed(0)
    net = tiny_model(caption_prior_components=2, joint_prior_components=3, prior_hidden=16)
    module = JointLitModule(
        net, partial(torch.optim.Adam), z_dim=Z, prior_fit_steps=400, prior_fit_images=6,
        prior_fit_batch_size=64, prior_fit_lr=1e-2,
    )  # fmt: skip
    batch = tiny_batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        enc = net.encode_experts(batch)
        q_img, q_txt = enc.experts["img"], enc.experts["txt"]

        def nlls():
            target = q_img.rsample(64)  # (64, B, D): many draws per row
            cap = -net.caption_prior(q_txt).log_prob(target).mean()
            return float(cap), float(-net.joint_prior().log_prob(target).mean())

        torch.manual_seed(1)
        cap0, joint0 = nlls()
    with torch.inference_mode():  # as in Lightning's validation loop
        module.refit_priors([batch])
    with torch.no_grad():
        torch.manual_seed(1)
        cap1, joint1 = nlls()
    # the cross-entropy E_q[-log p] is at least the entropy of q(z | image): the fit reaches it
    entropy = float(q_img.entropy().mean())
    assert cap0 > entropy + 0.4 and joint0 > entropy + 0.9
    assert cap1 == pytest.approx(entropy, abs=0.15) and joint1 == pytest.approx(entropy, abs=0.15)
    for k, v in net.state_dict().items():
        if not k.startswith(("caption_prior.", "joint_prior.")):
            assert torch.equal(v, before[k]), k
    assert net.training  # the refit restores the mode it found
