"""The variational bound of Ho et al. 2020 (Eq. 5, Sec. 3.3) against independent formulas, hand
computed bin probabilities, the exact entropy of Gaussian data, and the sum of its own terms."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from Diffusion.Diffusion import GaussianDiffusionSampler
from Diffusion.Likelihood import (bits_per_dim, bound_term, discretized_gaussian_log_likelihood,
                                  normal_kl, posterior_mean_variance, prior_kl, variational_bound)
from Diffusion.Model import UNet

BETAS = torch.linspace(1e-4, 0.02, 1000).double()
ALPHAS_BAR = torch.cumprod(1. - BETAS, dim=0)


def Phi(z):
    """The standard normal CDF, by math.erfc (accurate in the lower tail)."""
    return 0.5 * math.erfc(-z / math.sqrt(2.))


def bin_probabilities(mu, s):
    """P(k) for k = 0..255 of N(mu, s^2) rounded to the nearest bin centre k / 127.5 - 1 and
    clipped to [-1, 1]: the edge bins hold the tails."""
    edges = [Phi(((k + 0.5) / 127.5 - 1. - mu) / s) for k in range(255)]
    return torch.tensor([b - a for a, b in zip([0.] + edges, edges + [1.])], dtype=torch.float64)


def test_normal_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean_1, mean_2 = torch.randn(2, 50, dtype=torch.float64, generator=generator)
    var_1, var_2 = torch.rand(2, 50, dtype=torch.float64, generator=generator) * 2. + 1e-4
    expected = kl_divergence(Normal(mean_1, var_1.sqrt()), Normal(mean_2, var_2.sqrt()))
    torch.testing.assert_close(normal_kl(mean_1, var_1, mean_2, var_2), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("index", [0, 1, 2, 500, 999])
def test_posterior_is_bayes_rule_of_the_two_forward_gaussians(index):
    # q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): as a function of
    # x_{t-1}, N(x_t / sqrt(alpha_t), beta_t / alpha_t) times N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}),
    # whose product has precision the sum of the precisions, mean the precision-weighted mean.
    x_0, x_t = 0.3, -0.7
    alpha, beta = 1. - BETAS[index].item(), BETAS[index].item()
    abar_prev = ALPHAS_BAR[index - 1].item() if index > 0 else 1.
    mean, var = posterior_mean_variance(torch.full((1, 1, 1, 1), x_0, dtype=torch.float64),
                                        torch.full((1, 1, 1, 1), x_t, dtype=torch.float64),
                                        torch.tensor([index]), ALPHAS_BAR)
    if index == 0:  # abar_{t-1} = 1: x_{t-1} is x_0 itself
        assert mean.item() == pytest.approx(x_0, rel=1e-12) and var.item() == 0.
        return
    precision = alpha / beta + 1. / (1. - abar_prev)
    expected_mean = (math.sqrt(alpha) / beta * x_t
                     + math.sqrt(abar_prev) / (1. - abar_prev) * x_0) / precision
    assert mean.item() == pytest.approx(expected_mean, rel=1e-9)
    assert var.item() == pytest.approx(1. / precision, rel=1e-9)


def test_prior_kl_is_the_closed_form_summed_over_dimensions():
    x_0 = torch.tensor([[[[-1., 0.25], [0.5, 1.]]], [[[0., 0.], [0., 0.]]]], dtype=torch.float64)
    abar_T = 0.05
    # KL(N(m, v) || N(0, 1)) = (v + m^2 - 1 - log v) / 2 per dimension, m = sqrt(abar_T) x_0
    v = 1. - abar_T
    expected = [sum(v + abar_T * x * x - 1. - math.log(v) for x in image.flatten().tolist()) / 2.
                for image in x_0]
    torch.testing.assert_close(prior_kl(x_0, abar_T), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("k, mean, scale", [(127, 0., 0.01), (128, 0.05, 0.2), (200, 0.6, 0.006),
                                            (200, 0.54, 0.006), (0, -0.9, 0.1), (255, 0.95, 0.02)])
def test_decoder_is_the_gaussian_mass_of_the_pixel_bin(k, mean, scale):
    # (200, 0.6, 0.006) and (200, 0.54, 0.006): bins 4 and 5 standard deviations out, below and above
    x = k / 127.5 - 1.
    lower = Phi((x - 1. / 255. - mean) / scale) if k > 0 else 0.  # the edge bins are open
    upper = Phi((x + 1. / 255. - mean) / scale) if k < 255 else 1.
    got = discretized_gaussian_log_likelihood(torch.tensor([[[[x]]]], dtype=torch.float64),
                                              torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(math.log(scale), dtype=torch.float64))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(math.log(upper - lower), rel=1e-9)


def test_decoder_clamps_the_probability_of_a_bin_far_in_the_tail_at_1e_12():
    x_0 = torch.tensor([0., -1., 1.], dtype=torch.float64).view(3, 1, 1, 1)
    mean = torch.tensor([0.9, 1., -1.], dtype=torch.float64).view(3, 1, 1, 1)
    got = discretized_gaussian_log_likelihood(x_0, mean, torch.tensor(math.log(0.01), dtype=torch.float64))
    torch.testing.assert_close(got, torch.full_like(got, math.log(1e-12)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mean, scale", [(0., 0.01), (0.3, 0.5), (-1.2, 0.05), (1.5, 3.), (0.01, 1e-4)])
def test_decoder_probabilities_over_the_256_bins_sum_to_1(mean, scale):
    bins = (torch.arange(256, dtype=torch.float64) / 127.5 - 1.).view(256, 1, 1, 1)
    log_probabilities = discretized_gaussian_log_likelihood(
        bins, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(scale), dtype=torch.float64))
    # bins holding less than 1e-12 count as 1e-12: at most 256e-12 over
    assert log_probabilities.exp().sum().item() == pytest.approx(1., abs=1e-9)


def gaussian_reverse_process(mu, s, exact_variance):
    """p(x_{t-1} | x_t) of the continuous data N(mu, s^2) through the forward process: x_{t-1}
    and x_t are jointly Gaussian, so its mean is the linear regression of x_{t-1} on x_t. Its
    variance: the exact conditional one (exact_variance) or the posterior beta~_t (beta~ of
    index 1 at index 0, as improved-diffusion's clipped log variance)."""
    def p_mean_variance(x_t, t):
        abar = ALPHAS_BAR[t].view(-1, 1, 1, 1)
        abar_prev = torch.where(t > 0, ALPHAS_BAR[(t - 1).clamp(min=0)], 1.).view(-1, 1, 1, 1)
        var_prev, var_t = abar_prev * s ** 2 + 1. - abar_prev, abar * s ** 2 + 1. - abar
        cov = (abar / abar_prev).sqrt() * var_prev  # Cov(x_{t-1}, x_t) = sqrt(alpha_t) Var(x_{t-1})
        mean = abar_prev.sqrt() * mu + cov / var_t * (x_t - abar.sqrt() * mu)
        if exact_variance:
            return mean, var_prev - cov ** 2 / var_t
        t = t.clamp(min=1)
        return mean, (BETAS[t] * (1. - ALPHAS_BAR[t - 1]) / (1. - ALPHAS_BAR[t])).view(-1, 1, 1, 1)
    return p_mean_variance


# 0.09% of the mass is clipped into the edge bins. The model below is exact for the unclipped
# Gaussian only: with MU = 0.5 (5% clipped) its bound is 0.14 bits/dim above the entropy.
MU, S = 0., 0.3


@pytest.fixture(scope="module")
def gaussian_images():
    """64 images [1, 32, 32] of N(MU, S^2) samples rounded to the 256 bins and clipped."""
    generator = torch.Generator().manual_seed(0)
    x = MU + S * torch.randn(64, 1, 32, 32, dtype=torch.float64, generator=generator)
    return ((x + 1.) * 127.5).round().clamp(0., 255.) / 127.5 - 1.


def entropy_bits(P):
    return (-(P * P.log()).sum() / math.log(2.)).item()


def test_bound_on_gaussian_data_with_the_exact_reverse_process_is_its_entropy(gaussian_images):
    # Any model's bound is >= the entropy of the data (Gibbs). The exact reverse process of the
    # continuous Gaussian, decoded into bins, has the discretized Gaussian as its marginal: what
    # remains is the KL of its posterior over x_1 (spread over the bin) from q(x_1 | x_0) (at the
    # bin centre), 0.002 bits/dim (0.0021 +- 0.0014 measured on a million dimensions), under this
    # test's Monte-Carlo error (0.007 with 65536 dimensions: 7.3001 against 7.3002). So: within
    # 0.05 above, and not below by more than 4 standard errors.
    H = entropy_bits(bin_probabilities(MU, S))  # 7.30 bits/dim
    bound = variational_bound(gaussian_images, gaussian_reverse_process(MU, S, True), ALPHAS_BAR,
                              generator=torch.Generator().manual_seed(1))
    total = bound["total"]
    standard_error = (total.std() / math.sqrt(len(total))).item()
    assert standard_error < 0.01
    assert H - 4. * standard_error <= total.mean().item() <= H + 0.05
    assert bound["prior"].max().item() < 1e-4  # q(x_T | x_0) is N(0, I) to 1e-5 bits/dim


def test_bound_with_the_posterior_variance_is_clearly_above_the_entropy(gaussian_images):
    # With beta~_t in place of the exact variance beta~_t + coef1_t^2 Var[x_0 | x_t], the KLs of
    # the first steps, where the two differ by a factor of about 1 + 1/t, cost 0.75 bits/dim
    # (8.06 against 7.30; two thirds of it at indices 0..2): why learned variances improve the
    # bound (Nichol & Dhariwal 2021, Fig. 2). Far above the Monte-Carlo error (0.01), so Gibbs'
    # inequality holds outright.
    H = entropy_bits(bin_probabilities(MU, S))
    bound = variational_bound(gaussian_images, gaussian_reverse_process(MU, S, False), ALPHAS_BAR,
                              generator=torch.Generator().manual_seed(1))
    assert H + 0.5 < bound["total"].mean().item() < H + 1.


@pytest.fixture(scope="module")
def tiny_sampler():
    """The repo's sampler of Algorithm 2 with a tiny random UNet, T = 20, on 8x8 images."""
    torch.manual_seed(0)
    model = UNet(T=20, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.).eval()
    return GaussianDiffusionSampler(model, 1e-4, 0.2, 20)


@pytest.fixture(scope="module")
def images():
    """Two 8x8 RGB images on the pixel grid k / 127.5 - 1, float32 as a data loader gives them."""
    return torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(2)) / 127.5 - 1.


def p_mean_variance_of(sampler):
    return lambda x_t, t: sampler.p_mean_variance(x_t, t)[:2]  # (mean, var[, x_0])


def test_variational_bound_is_the_sum_of_its_terms_one_at_a_time(tiny_sampler, images):
    steps = []
    bound = variational_bound(images, p_mean_variance_of(tiny_sampler), tiny_sampler.alphas_bar,
                              generator=torch.Generator().manual_seed(3), on_step=lambda: steps.append(1))
    assert len(steps) == 20
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        terms = [bound_term(images, p_mean_variance_of(tiny_sampler), tiny_sampler.alphas_bar, index,
                            torch.randn(images.shape, generator=generator))[0]
                 for index in range(20)]
        prior = prior_kl(images, tiny_sampler.alphas_bar[-1])
    dims = 3 * 8 * 8
    for name, nats in (("prior", prior), ("decoder", terms[0]), ("diffusion", sum(terms[1:]))):
        torch.testing.assert_close(bound[name], bits_per_dim(nats, dims), rtol=1e-12, atol=0)


def test_total_is_finite_positive_and_prior_plus_diffusion_plus_decoder(tiny_sampler, images):
    bound = variational_bound(images, p_mean_variance_of(tiny_sampler), tiny_sampler.alphas_bar,
                              generator=torch.Generator().manual_seed(5))
    for name in ("total", "prior", "diffusion", "decoder"):
        assert bound[name].shape == (2,) and bound[name].dtype == torch.float64
        assert bound[name].isfinite().all() and (bound[name] > 0).all()
    torch.testing.assert_close(bound["total"], bound["prior"] + bound["diffusion"] + bound["decoder"],
                               rtol=1e-15, atol=0)
