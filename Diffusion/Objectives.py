"""The training objectives of DDPM's Table 2 and of Improved DDPM (Nichol & Dhariwal 2021):

    "simple"  L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2           (Eq. 14)
              (for prediction "mu": the unweighted MSE || mu~_t - mu_theta ||^2, Table 2)
    "bound"   the true variational bound L = L_T + sum_{t>1} L_{t-1} + L_0         (Eq. 5)
    "hybrid"  L_simple + lambda L_vlb, lambda = vlb_weight (0.001), with the mean held constant
              in L_vlb, so that L_vlb trains only the learned variance (IDDPM Sec. 3.1)

The bound is trained one term at a time, at t ~ Uniform{1..T}: T L_{t-1} is an unbiased estimate
of the sum (L_T has no parameter and is left out). Its terms are those of the NLL (Likelihood.py):

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))
            = 1/(2 sigma_t^2) || mu~_t - mu_theta ||^2 + C_t   for a fixed sigma_t^2     (Eq. 8)
            = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) || eps - eps_theta ||^2 + C_t  (Eq. 12)
    L_0     = -log p_theta(x_0 | x_1), the discretized decoder (Sec. 3.3)

Where L_vlb is the whole loss, its terms differ in size by orders of magnitude and the
estimate is noisy; `ImportanceSampling` draws t with p_t proportional to sqrt(E[L_t^2]) and weighs
each term by 1 / (T p_t) (IDDPM Sec. 3.3, Eq. 18), which keeps the estimate unbiased.

Timesteps are 0-based: index t = 0..T-1 is the paper's t = 1..T, index 0's term the decoder.
"""
import math

import torch

from Diffusion.Likelihood import discretized_gaussian_log_likelihood, normal_kl, posterior_mean_variance

LOSSES = ("simple", "bound", "hybrid")
T_SAMPLINGS = ("uniform", "importance")
HISTORY = 10  # the last values of L_t that estimate E[L_t^2] (IDDPM's)
UNIFORM_SHARE = 0.001  # of p_t, spread uniformly over t, so that no term goes unseen (IDDPM's)


def bound_terms_of_elements(x_0, x_t, t, mean, var, alphas_bar):
    """The bound's term L_{t-1} at each image's t [B] (0-based), element by element, in nats:
    float64 [B, C, H, W], whose sum over an image is its term of the NLL (Likelihood.bound_term).

    KL(q(x_{t-1} | x_t, x_0) || N(mean, var)) where t >= 1, the discretized decoder's
    -log N(x_0; mean, var) over the pixel's bin at t = 0. x_0, x_t, mean [B, C, H, W]; var
    broadcastable to them; alphas_bar float64 [T]."""
    mean, var = mean.double(), var.double()
    posterior_mean, posterior_var = posterior_mean_variance(x_0, x_t, t, alphas_bar)
    kl = normal_kl(posterior_mean, posterior_var, mean, var)  # inf at t = 0, where it is not used
    decoder = -discretized_gaussian_log_likelihood(x_0, mean, 0.5 * var.log())
    return torch.where((t == 0).view(-1, *[1] * (x_0.dim() - 1)), decoder, kl)


def bound_estimate(x_0, x_t, t, mean, var, alphas_bar):
    """T L_{t-1} in bits, element by element [B, C, H, W]: at t ~ Uniform, an unbiased estimate of
    the bound L - L_T (Eq. 5), whose mean over the elements is in bits per dimension."""
    return bound_terms_of_elements(x_0, x_t, t, mean, var, alphas_bar) * (len(alphas_bar) / math.log(2.))


class UniformTimesteps:
    """t ~ Uniform{0..T-1}, the paper's: each image's term weighs 1."""
    learns_from_terms = False

    def __init__(self, T):
        self.T = T

    def draw(self, draws, local_size, device):
        """(t [local_size] from `draws`, a GlobalBatchRandomness; the weight of each term, 1)."""
        return draws.randint(self.T, local_size, device), torch.ones(local_size, device=device)

    def record(self, t, terms):
        """Nothing to learn from the terms."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """Nothing to restore."""


class ImportanceSampling(UniformTimesteps):
    """Importance sampling of t (IDDPM Sec. 3.3): p_t proportional to sqrt(E[L_t^2]), estimated from
    the last HISTORY values of each term, with UNIFORM_SHARE of p spread uniformly; t ~ Uniform until
    every t has its HISTORY values. Each term is weighed by 1 / (T p_t):

        E_{t ~ p}[L_t / (T p_t)] = (1/T) sum_t L_t = E_{t ~ Uniform}[L_t]                (Eq. 18)

    The history is part of the training state, so that a resumed run draws the same t."""
    learns_from_terms = True

    def __init__(self, T):
        super().__init__(T)
        self.history = torch.zeros(T, HISTORY, dtype=torch.float64)
        self.counts = torch.zeros(T, dtype=torch.long)

    def probabilities(self):
        """p_t, float64 [T]: uniform while a term has fewer than HISTORY values."""
        if (self.counts < HISTORY).any():
            return torch.full((self.T,), 1. / self.T, dtype=torch.float64)
        p = self.history.square().mean(1).sqrt()
        return p / p.sum() * (1. - UNIFORM_SHARE) + UNIFORM_SHARE / self.T

    def draw(self, draws, local_size, device):
        """(t [local_size] ~ p_t, from `draws`, a GlobalBatchRandomness; their weights 1 / (T p_t),
        float32 [local_size])."""
        p = self.probabilities()
        t = draws.multinomial(p, local_size, device)
        return t, (1. / (self.T * p.to(device)[t])).float()

    def record(self, t, terms):
        """Keep the terms [N] (any number, in the global batch's order: the same in every process)
        drawn at t [N], each term's newest HISTORY."""
        for step, term in zip(t.tolist(), terms.detach().double().cpu()):
            self.history[step] = torch.cat([self.history[step, 1:], term.view(1)])
            self.counts[step] += 1

    def state_dict(self):
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state):
        self.history, self.counts = state["history"].clone(), state["counts"].clone()


def timestep_sampler(t_sampling, T):
    """The sampler of t that `t_sampling` names: "uniform" or "importance"."""
    return ImportanceSampling(T) if t_sampling == "importance" else UniformTimesteps(T)
