"""Algorithms 1 and 2 of Ho et al. 2020 against hand computations with a known eps_theta."""
import math

import pytest
import torch
from torch import nn

from Diffusion.Diffusion import GaussianDiffusionSampler, GaussianDiffusionTrainer

BETA_1, BETA_T = 1e-4, 0.02


class KnownEps(nn.Module):
    """A deterministic eps_theta(x_t, t) = scale * x_t + shift * t; records every t it sees."""

    def __init__(self, scale=0.5, shift=0.01):
        super().__init__()
        self.scale, self.shift = scale, shift
        self.seen_t = []

    def eps(self, x_t, t):
        return self.scale * x_t + self.shift * t.float().view(-1, *[1] * (x_t.dim() - 1))

    def forward(self, x_t, t):
        self.seen_t.append(t.clone())
        return self.eps(x_t, t)


class ConstantEps(nn.Module):
    """eps_theta(x_t, t) = a fixed tensor."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x_t, t):
        return self.eps.expand_as(x_t)


def schedule(T):
    """The paper's quantities in float64, by hand: betas, alphas, alphas_bar [T]."""
    betas = torch.tensor([BETA_1 + (BETA_T - BETA_1) * i / (T - 1) for i in range(T)], dtype=torch.float64)
    alphas = 1. - betas
    alphas_bar = torch.tensor([math.prod(alphas[:i + 1].tolist()) for i in range(T)], dtype=torch.float64)
    return betas, alphas, alphas_bar


def test_sampler_coefficients_match_the_original_schedule(golden):
    expected = golden["schedule_T1000_1e-4_0.02"]
    sampler = GaussianDiffusionSampler(None, 1e-4, 0.02, 1000)
    for name in ("coeff1", "coeff2", "sample_var"):
        got = getattr(sampler, name)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected[name], rtol=1e-12, atol=0)


def test_trainer_gives_algorithm_1_unreduced_at_the_given_t_and_noise():
    T = 10
    torch.manual_seed(0)
    model = KnownEps()
    trainer = GaussianDiffusionTrainer(model, BETA_1, BETA_T, T)
    x_0 = torch.rand(4, 3, 5, 5) * 2 - 1
    noise = torch.randn_like(x_0)
    t = torch.tensor([0, 3, 7, 9])

    got = trainer(x_0, t=t, noise=noise)

    _, _, alphas_bar = schedule(T)
    a = alphas_bar[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x_0 + (1 - a).sqrt() * noise).float()  # q(x_t | x_0), Eq. 4
    expected = (noise - model.eps(x_t, t)) ** 2
    assert got.shape == x_0.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.seen_t[0], t)


def test_training_draws_every_timestep_in_0_to_T_minus_1_uniformly():
    T = 10
    torch.manual_seed(0)
    model = KnownEps()
    trainer = GaussianDiffusionTrainer(model, BETA_1, BETA_T, T)
    loss = trainer(torch.zeros(5000, 1, 1, 1))
    t = model.seen_t[0]
    assert loss.shape == (5000, 1, 1, 1)
    assert t.dtype == torch.long
    counts = torch.bincount(t, minlength=T)
    assert len(counts) == T  # nothing at T or beyond
    assert counts.min() > 5000 / T * 0.8 and counts.max() < 5000 / T * 1.2


def test_training_passes_the_condition_to_the_model_after_t():
    class ConditionalZero(nn.Module):
        def forward(self, x_t, t, labels):
            self.seen = (t, labels)
            return torch.zeros_like(x_t)

    model = ConditionalZero()
    GaussianDiffusionTrainer(model, BETA_1, BETA_T, 10)(torch.zeros(3, 3, 2, 2), torch.tensor([1, 0, 2]))
    t, labels = model.seen
    assert t.shape == (3,) and labels.tolist() == [1, 0, 2]


def test_sampler_matches_algorithm_2_with_seeded_noise():
    T = 4
    model = KnownEps(scale=0.3, shift=0.02)
    sampler = GaussianDiffusionSampler(model, BETA_1, BETA_T, T)
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.2

    torch.manual_seed(7)
    got = sampler(x_T, progress=False)

    betas, alphas, alphas_bar = schedule(T)
    torch.manual_seed(7)  # the same z, drawn in the same order
    x = x_T.double()
    for step in reversed(range(T)):
        t = torch.full((3,), step)
        eps = model.eps(x.float(), t).double()
        mean = (x - betas[step] / (1 - alphas_bar[step]).sqrt() * eps) / alphas[step].sqrt()
        # sigma_t^2 = beta_t, and no noise at the last step (the paper's t = 1)
        x = mean + betas[step].sqrt() * torch.randn_like(x_T).double() if step > 0 else mean
    assert x.abs().max() < 1  # so clipping does not hide a difference
    torch.testing.assert_close(got, x.float(), rtol=1e-5, atol=1e-5)
    assert [t[0].item() for t in model.seen_t] == [3, 2, 1, 0]


def test_sampler_mean_at_t_0_is_algorithm_2_without_noise():
    T = 10
    model = KnownEps()
    sampler = GaussianDiffusionSampler(model, BETA_1, BETA_T, T)
    x_t = torch.randn(2, 3, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    mean, var = sampler.p_mean_variance(x_t, t)
    betas, alphas, alphas_bar = schedule(T)
    expected = (x_t - betas[0] / (1 - alphas_bar[0]).sqrt() * model.eps(x_t, t)) / alphas[0].sqrt()
    torch.testing.assert_close(mean, expected.float(), rtol=1e-5, atol=1e-6)
    assert var.shape == (2, 1, 1, 1)


def test_sampler_variance_is_beta_t_after_the_first_step():
    T = 10
    sampler = GaussianDiffusionSampler(None, BETA_1, BETA_T, T)
    betas, _, alphas_bar = schedule(T)
    torch.testing.assert_close(sampler.sample_var[1:], betas[1:], rtol=1e-6, atol=0)
    posterior_var_1 = betas[1] * (1 - alphas_bar[0]) / (1 - alphas_bar[1])  # Eq. 7 at the paper's t = 2
    torch.testing.assert_close(sampler.sample_var[0], posterior_var_1, rtol=1e-6, atol=0)


def test_sampler_output_is_clipped_to_minus_1_1():
    torch.manual_seed(0)
    sampler = GaussianDiffusionSampler(ConstantEps(torch.zeros(())), BETA_1, BETA_T, 5)
    x_T = torch.full((2, 3, 4, 4), 3.)
    x_T[0] = -3.
    out = sampler(x_T, progress=False)  # eps = 0: |x| grows by 1/sqrt(alpha_t), noise ~0.3
    assert torch.equal(out[0], torch.full_like(out[0], -1.))
    assert torch.equal(out[1], torch.full_like(out[1], 1.))


@pytest.mark.parametrize("step", [0, 4, 9])
def test_clip_denoised_mean_equals_the_plain_mean_when_predicted_x0_is_in_range(step):
    T = 10
    torch.manual_seed(0)
    _, _, alphas_bar = schedule(T)
    a = alphas_bar[step]
    eps = torch.randn(2, 3, 4, 4)
    t = torch.full((2,), step)

    def means(x_0):
        x_t = (a.sqrt() * x_0 + (1 - a).sqrt() * eps).float()  # so that the predicted x_0 is x_0
        plain = GaussianDiffusionSampler(ConstantEps(eps), BETA_1, BETA_T, T)
        clipped = GaussianDiffusionSampler(ConstantEps(eps), BETA_1, BETA_T, T, clip_denoised=True)
        return plain.p_mean_variance(x_t, t), clipped.p_mean_variance(x_t, t)

    (plain_mean, plain_var), (clipped_mean, clipped_var) = means(torch.rand(2, 3, 4, 4) * 1.8 - 0.9)
    torch.testing.assert_close(clipped_mean, plain_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clipped_var, plain_var)

    (plain_mean, _), (clipped_mean, _) = means(torch.full((2, 3, 4, 4), 3.))
    assert (clipped_mean - plain_mean).abs().min() > 1e-3


def test_sampling_with_a_model_that_returns_nan_raises_floating_point_error():
    sampler = GaussianDiffusionSampler(ConstantEps(torch.tensor(float("nan"))), BETA_1, BETA_T, 5)
    with pytest.raises(FloatingPointError, match="NaN"):
        sampler(torch.randn(2, 3, 4, 4), progress=False)
