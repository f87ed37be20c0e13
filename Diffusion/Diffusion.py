"""Gaussian diffusion (Ho et al. 2020): training by Algorithm 1, sampling by Algorithm 2.

Notation of the paper: betas beta_t, alphas alpha_t = 1 - beta_t, alphas_bar
abar_t = prod_{s<=t} alpha_s. Timesteps are 0-based here: index t = 0..T-1 is the paper's
t = 1..T. The schedule is computed in float64 and each coefficient is cast to float32 when
used, as the original.
"""
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from Diffusion.Randomness import GlobalBatch

SINGLE_PROCESS = GlobalBatch()  # draws from torch's global generator


def linear_betas(beta_1, beta_T, T):
    """The paper's linear schedule beta_1 .. beta_T, float64 [T]. Spaced in float32 first, as the
    original, so that every coefficient is the original's to the last bit."""
    return torch.linspace(beta_1, beta_T, T).double()


def extract(coefficients, t, x_shape):
    """coefficients[t] as float32 [B, 1, 1, 1], to broadcast against x [B, C, H, W]."""
    return coefficients[t].float().view(-1, *[1] * (len(x_shape) - 1))


class GaussianDiffusionTrainer(nn.Module):
    """Algorithm 1: the noise-prediction loss || eps - eps_theta(x_t, t) ||^2."""

    def __init__(self, model, beta_1, beta_T, T):
        super().__init__()
        self.model = model
        self.T = T
        self.register_buffer("betas", linear_betas(beta_1, beta_T, T))
        alphas_bar = torch.cumprod(1. - self.betas, dim=0)
        self.register_buffer("sqrt_alphas_bar", alphas_bar.sqrt())
        self.register_buffer("sqrt_one_minus_alphas_bar", (1. - alphas_bar).sqrt())

    def forward(self, x_0, *condition, batch=SINGLE_PROCESS):
        """x_0 [B, C, H, W] in [-1, 1] -> per-element squared error [B, C, H, W] at a random
        t ~ Uniform{0..T-1} and eps ~ N(0, I). `condition` goes to the model after t (the
        class labels [B] of the conditional model). `batch` draws t and eps (a GlobalBatch:
        an image gets the same ones whatever the number of training processes)."""
        t = batch.randint(self.T, x_0.shape[0], x_0.device)
        noise = batch.randn_like(x_0)
        return self.noise_prediction_error(x_0, t, noise, *condition)

    def noise_prediction_error(self, x_0, t, noise, *condition):
        """(eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t))^2, not reduced."""
        x_t = (extract(self.sqrt_alphas_bar, t, x_0.shape) * x_0
               + extract(self.sqrt_one_minus_alphas_bar, t, x_0.shape) * noise)
        return F.mse_loss(self.model(x_t, t, *condition), noise, reduction="none")


class GaussianDiffusionSampler(nn.Module):
    """Algorithm 2: x_T ~ N(0, I), then for t = T..1

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) + sigma_t z

    with z ~ N(0, I) except at the last step, and sigma_t^2 = beta_t (the paper's "fixedlarge"
    choice, as the original). clip_denoised: compute the mean through the predicted x_0,
    clipped to [-1, 1], as the paper's own sampler did for its CIFAR-10 FID (Eq. 7 with
    x_0 = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)).
    """

    def __init__(self, model, beta_1, beta_T, T, clip_denoised=False):
        super().__init__()
        self.model = model
        self.T = T
        self.clip_denoised = clip_denoised
        self.register_buffer("betas", linear_betas(beta_1, beta_T, T))
        alphas = 1. - self.betas
        alphas_bar = torch.cumprod(alphas, dim=0)
        alphas_bar_prev = F.pad(alphas_bar, [1, 0], value=1.)[:T]

        self.register_buffer("coeff1", (1. / alphas).sqrt())
        self.register_buffer("coeff2", self.coeff1 * self.betas / (1. - alphas_bar).sqrt())
        # Posterior q(x_{t-1} | x_t, x_0), Eqs. 6-7: its variance and the two weights of its mean.
        posterior_var = self.betas * (1. - alphas_bar_prev) / (1. - alphas_bar)
        self.register_buffer("posterior_mean_coef1", self.betas * alphas_bar_prev.sqrt() / (1. - alphas_bar))
        self.register_buffer("posterior_mean_coef2", (1. - alphas_bar_prev) * alphas.sqrt() / (1. - alphas_bar))
        self.register_buffer("sqrt_recip_alphas_bar", (1. / alphas_bar).sqrt())
        self.register_buffer("sqrt_recipm1_alphas_bar", (1. / alphas_bar - 1.).sqrt())
        # sigma_t^2 = beta_t; the first entry (no noise is added there) is the posterior
        # variance instead, as the original.
        self.register_buffer("sample_var", torch.cat([posterior_var[1:2], self.betas[1:]]))

    def noise_estimate(self, x_t, t, *condition):
        """eps_theta(x_t, t): [B, C, H, W]. The guided sampler replaces this."""
        return self.model(x_t, t, *condition)

    def p_mean_variance(self, x_t, t, *condition):
        """The mean and variance of p_theta(x_{t-1} | x_t): [B, C, H, W] and [B, 1, 1, 1]."""
        eps = self.noise_estimate(x_t, t, *condition)
        if self.clip_denoised:
            x_0 = (extract(self.sqrt_recip_alphas_bar, t, x_t.shape) * x_t
                   - extract(self.sqrt_recipm1_alphas_bar, t, x_t.shape) * eps).clamp(-1., 1.)
            mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
                    + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        else:
            mean = extract(self.coeff1, t, x_t.shape) * x_t - extract(self.coeff2, t, x_t.shape) * eps
        return mean, extract(self.sample_var, t, x_t.shape)

    @torch.no_grad()
    def forward(self, x_T, *condition, progress=True):
        """x_T [B, C, H, W] ~ N(0, I) -> x_0 [B, C, H, W], clipped to [-1, 1]."""
        x_t = x_T
        has_nan = torch.zeros((), dtype=torch.bool, device=x_T.device)
        for step in tqdm(reversed(range(self.T)), total=self.T, desc="sampling",
                         disable=not progress, leave=False, dynamic_ncols=True):
            t = torch.full((x_T.shape[0],), step, dtype=torch.long, device=x_T.device)
            mean, var = self.p_mean_variance(x_t, t, *condition)
            x_t = (mean + var.sqrt() * torch.randn_like(x_t)) if step > 0 else mean
            has_nan |= x_t.isnan().any()  # stays on the device: no sync inside the loop
        if has_nan:
            raise FloatingPointError(
                "sampling produced NaN: the model's weights hold NaN or inf, or diverged in "
                "training; check the checkpoint (test_load_weight) and that beta_1, beta_T and T "
                "are the ones it was trained with")
        return x_t.clip(-1., 1.)
