"""Denoising diffusion implicit models (Song, Meng & Ermon 2021, arXiv:2010.02502): sampling a
model trained by Algorithm 1 in S << T steps, deterministic at eta = 0.

With x_t at t = tau_i, s = tau_{i-1} the timestep visited next (abar_s = 1 after tau_0), and
x_0 predicted from x_t (Eq. 9), Eq. 12:

    x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma_i^2) eps_theta(x_t, t) + sigma_i z
    sigma_i = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)          (Eq. 16)

eta = 1 with every step visited is Algorithm 2 with the posterior variance ("fixedsmall");
eta = 0 is an ODE whose steps can also be run forwards, from an image to its x_T (`encode`).
"""
import torch
from tqdm import tqdm

from Diffusion.Diffusion import Sampler, alpha_and_sigma, eps_and_x0, extract, split_output


class DDIMSampler(Sampler):
    """DDIM over `timesteps` (see Diffusion.sampling_timesteps), with stochasticity eta in [0, 1].
    clip_denoised: the predicted x_0 is clipped to [-1, 1], and the eps used for the direction
    to x_t is the one that clipped x_0 implies."""

    def __init__(self, model, beta_1, beta_T, T, timesteps=None, eta=0., clip_denoised=False, **diffusion):
        super().__init__(model, beta_1, beta_T, T, timesteps, clip_denoised, **diffusion)
        self.eta = eta
        alphas_bar, alphas_bar_prev = self.alphas_bar, self.alphas_bar_prev
        sigmas = eta * ((1. - alphas_bar_prev) / (1. - alphas_bar) * (1. - alphas_bar / alphas_bar_prev)).sqrt()
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("sqrt_alphas_bar_prev", alphas_bar_prev.sqrt())
        self.register_buffer("direction_coef", (1. - alphas_bar_prev - sigmas ** 2).clamp(min=0.).sqrt())

    def step(self, x_t, i, *condition, last):
        """Eq. 12: (x at the previous visited timestep, predicted x_0)."""
        eps, x_0 = self.denoise(x_t, i, *condition)
        x_prev = (extract(self.sqrt_alphas_bar_prev, i, x_t.shape) * x_0
                  + extract(self.direction_coef, i, x_t.shape) * eps)
        if self.eta > 0 and not last:
            x_prev = x_prev + extract(self.sigmas, i, x_t.shape) * torch.randn_like(x_t)
        return x_prev, x_0

    @torch.no_grad()
    def encode(self, x_0, *condition, progress=True):
        """The deterministic (eta = 0) steps run forwards: image x_0 [B, C, H, W] -> its x_T.
        Each step reuses eps_theta at the lower timestep (Song et al. 2021, Sec. 5.4), so
        sampling from the result gives back x_0 up to the discretisation error."""
        x = x_0
        steps = len(self.timesteps)
        for index in tqdm(range(steps), desc="encoding", disable=not progress, leave=False,
                          dynamic_ncols=True):
            i = torch.full((x_0.shape[0],), index, dtype=torch.long, device=x_0.device)
            # x sits at abar_{tau_{i-1}}; eps and x_0 as a step down from tau_i would see them
            alpha, sigma = alpha_and_sigma(self, i, x)
            output, _ = split_output(self.model(x, self.timesteps[i], *condition), x.shape[1])
            eps, _ = eps_and_x0(self.prediction, output, x, alpha, sigma, extract(self.network_alphas, i, x.shape))
            x_0_predicted = (x - (1. - extract(self.alphas_bar_prev, i, x.shape)).sqrt() * eps) \
                / extract(self.sqrt_alphas_bar_prev, i, x.shape)
            x = alpha * x_0_predicted + sigma * eps
        return x
