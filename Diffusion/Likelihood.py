"""The variational bound of DDPM on held-out images (Ho et al. 2020, Eq. 5 and Sec. 3.3), in
bits per dimension as its Table 1 reports NLL:

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0                                        (Eq. 5)
    L_T     = KL(q(x_T | x_0) || N(0, I))                                   (the prior)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),  x_t ~ q(x_t | x_0)
    L_0     = -log p_theta(x_0 | x_1)         (the discretized decoder of Sec. 3.3)

in nats, reported as L / (D ln 2) for D = C H W dimensions. Images x_0 are in [-1, 1], the
pixel value k of 0..255 at k / 127.5 - 1. Timesteps are 0-based: index t = 0..T-1 is the
paper's t = 1..T, so index 0's term is the decoder L_0.

The model is reached only through p_mean_variance(x_t, t) -> (mean, var) of
p_theta(x_{t-1} | x_t), so any sampler network can be scored (GaussianDiffusionSampler's
p_mean_variance is one). The KLs are small numbers summed T times: all the arithmetic of the
bound is float64, whatever the model returns.

The same terms, summed from L_T down, are the rate of progressive coding (Sec. 4.3, Fig. 5):
rate_and_distortion gives it at every step, with the distortion of the x_0 predicted there.

The bound is also a training objective (Table 2, at the end of this module), `loss`:

    "simple"  L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2           (Eq. 14)
              (for prediction "mu": the unweighted MSE || mu~_t - mu_theta ||^2, Table 2)
    "bound"   the bound L, trained one term at a time at t ~ Uniform{1..T}: T L_{t-1} is an
              unbiased estimate of L - L_T (L_T has no parameter)
    "hybrid"  L_simple + lambda L_vlb, lambda = vlb_weight (0.001), with the mean held constant
              in L_vlb, so that L_vlb trains only the learned variance (IDDPM Sec. 3.1)

For a fixed sigma_t^2 the KL terms are the paper's weighted MSEs,

    L_{t-1} = 1/(2 sigma_t^2) || mu~_t - mu_theta ||^2 + C_t                              (Eq. 8)
            = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) || eps - eps_theta ||^2 + C_t  (Eq. 12)

Where L_vlb is the whole loss, its terms differ in size by orders of magnitude and the
estimate is noisy; `ImportanceSampling` draws t with p_t proportional to sqrt(E[L_t^2]) and weighs
each term by 1 / (T p_t) (IDDPM Sec. 3.3, Eq. 18), which keeps the estimate unbiased.
"""
import math

import torch

BIN_HALF_WIDTH = 1. / 255.  # the 256 bins of [-1, 1] are 2/255 wide
MIN_PROBABILITY = 1e-12  # a bin's probability is clamped here before the log (improved-diffusion)


def normal_kl(mean_1, var_1, mean_2, var_2):
    """KL(N(mean_1, var_1) || N(mean_2, var_2)) elementwise, in nats (tensors that broadcast):

        1/2 (log(var_2 / var_1) + (var_1 + (mean_1 - mean_2)^2) / var_2 - 1)
    """
    return 0.5 * (torch.log(var_2) - torch.log(var_1) + (var_1 + (mean_1 - mean_2) ** 2) / var_2 - 1.)


def per_image(x):
    """The sum over all dimensions but the first: [B, C, H, W] -> [B]."""
    return x.flatten(1).sum(1)


def at(coefficients, t, x):
    """coefficients[t] as float64 [B, 1, 1, 1], to broadcast against x [B, C, H, W]."""
    return coefficients[t].double().view(-1, *[1] * (x.dim() - 1))


def prior_kl(x_0, abar_T):
    """L_T = KL(q(x_T | x_0) || N(0, I)), q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I)
    (Eq. 4): x_0 [B, C, H, W], abar_T the last of alphas_bar -> nats per image [B]."""
    x_0 = x_0.double()
    abar_T = torch.as_tensor(abar_T, dtype=torch.float64, device=x_0.device)
    return per_image(normal_kl(abar_T.sqrt() * x_0, 1. - abar_T, torch.zeros_like(x_0), torch.ones_like(x_0)))


def posterior_mean_variance(x_0, x_t, t, alphas_bar):
    """q(x_{t-1} | x_t, x_0) = N(mean, beta~_t I), Eqs. 6-7:

        mean    = coef1 x_0 + coef2 x_t
        coef1   = sqrt(abar_{t-1}) beta_t / (1 - abar_t)
        coef2   = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)
        beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t

    with alpha_t = abar_t / abar_{t-1}, beta_t = 1 - alpha_t and abar_{t-1} = 1 at index 0
    (where beta~ = 0: x_0 is known). x_0, x_t [B, C, H, W], t long [B] (0-based), alphas_bar
    float64 [T] -> mean float64 [B, C, H, W], beta~_t float64 [B, 1, 1, 1]."""
    abar = at(alphas_bar, t, x_t)
    abar_prev = torch.where(t > 0, alphas_bar[(t - 1).clamp(min=0)].double(), 1.).view_as(abar)
    alpha = abar / abar_prev
    beta = 1. - alpha
    coef1 = abar_prev.sqrt() * beta / (1. - abar)
    coef2 = alpha.sqrt() * (1. - abar_prev) / (1. - abar)
    return coef1 * x_0.double() + coef2 * x_t.double(), (1. - abar_prev) / (1. - abar) * beta


def discretized_gaussian_log_likelihood(x_0, mean, log_scale):
    """log p(x_0) elementwise for N(mean, exp(log_scale)^2) integrated over the bin of x_0
    (Sec. 3.3): x_0 [B, C, H, W] on the bin centres k / 127.5 - 1, mean and log_scale
    broadcastable to it -> log-probabilities float64 [B, C, H, W], in nats.

        log(Phi((x + 1/255 - mean) / s) - Phi((x - 1/255 - mean) / s))

    except at the edges, whose bins are open: x = -1 integrates from -inf (log Phi(upper)),
    x = 1 to +inf (log Phi(-lower)). Each probability is clamped at 1e-12 before the log."""
    x_0, mean, log_scale = x_0.double(), mean.double(), log_scale.double()
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x_0 - mean + BIN_HALF_WIDTH)
    lower = inv_scale * (x_0 - mean - BIN_HALF_WIDTH)
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): for a bin above the mean, the second form subtracts
    # two small numbers instead of two close to 1, and keeps its digits far in the tail
    above_mean = lower > 0
    inside = torch.where(above_mean, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                         torch.special.ndtr(upper) - torch.special.ndtr(lower))
    probability = torch.where(x_0 < -0.999, torch.special.ndtr(upper),
                              torch.where(x_0 > 0.999, torch.special.ndtr(-lower), inside))
    return probability.clamp(min=MIN_PROBABILITY).log()


def bits_per_dim(nats, dims):
    """nats / (dims ln 2): a negative log-likelihood in nats per image -> bits per dimension."""
    return nats / (dims * math.log(2.))


def q_sample(x_0, alphas_bar, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise ~ q(x_t | x_0) (Eq. 4), computed in float64,
    in x_0's dtype for the model: x_0, noise [B, C, H, W], t long [B] (0-based)."""
    abar = at(alphas_bar, t, x_0)
    return (abar.sqrt() * x_0.double() + (1. - abar).sqrt() * noise.double()).to(x_0.dtype)


def model_at(x_0, predict, alphas_bar, t, noise):
    """x_t ~ q(x_t | x_0) of `noise` (q_sample) and the model's p_theta(x_{t-1} | x_t): (x_t, mean
    float64 [B, C, H, W], var float64 broadcastable, [the rest of what predict returned])."""
    x_t = q_sample(x_0, alphas_bar, t, noise)
    mean, var, *rest = predict(x_t, t)
    return x_t, mean.double(), var.double(), rest


def diffusion_kl(x_0, x_t, t, mean, var, alphas_bar):
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || N(mean, var)) for t >= 1: nats per image [B]."""
    posterior_mean, posterior_var = posterior_mean_variance(x_0, x_t, t, alphas_bar)
    return per_image(normal_kl(posterior_mean, posterior_var, mean, var))


def decoder_nll(x_0, mean, var):
    """L_0 = -log p_theta(x_0 | x_1), the discretized N(mean, var): nats per image [B]."""
    return -per_image(discretized_gaussian_log_likelihood(x_0, mean, 0.5 * var.log()))


def bound_term(x_0, predict, alphas_bar, index, noise):
    """The bound's term at timestep `index` for a batch, at x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) noise: the decoder L_0 at index 0, the KL L_{t-1} after it.

    x_0, noise [B, C, H, W]; predict(x_t, t) -> (mean [B, C, H, W], var broadcastable, ...) of
    p_theta(x_{t-1} | x_t); alphas_bar float64 [T]. Returns (nats per image, float64 [B], [the rest
    of what predict returned], such as the x_0 it predicts)."""
    t = torch.full((x_0.shape[0],), index, dtype=torch.long, device=x_0.device)
    x_t, mean, var, rest = model_at(x_0, predict, alphas_bar, t, noise)
    if index == 0:  # the posterior variance is 0 there: x_0 is scored by the decoder
        return decoder_nll(x_0, mean, var), rest
    return diffusion_kl(x_0, x_t, t, mean, var, alphas_bar), rest


def bound_terms(x_0, predict, alphas_bar, generator=None, on_step=None):
    """Each term of the bound in turn, index t = 0, 1, .., T-1: (t, bound_term's two results), with
    one x_t ~ q(x_t | x_0) per index and image, its noise drawn with randn(x_0.shape) from
    `generator` (torch's global one if None). on_step(): called after each index."""
    for index in range(len(alphas_bar)):
        noise = torch.randn(x_0.shape, generator=generator, dtype=x_0.dtype, device=x_0.device)
        yield (index, *bound_term(x_0, predict, alphas_bar, index, noise))
        if on_step is not None:
            on_step()


@torch.no_grad()
def variational_bound(x_0, p_mean_variance, alphas_bar, generator=None, on_step=None):
    """The bound L of Eq. 5 for each image of x_0 [B, C, H, W] in [-1, 1], in bits per dimension.

    One x_t ~ q(x_t | x_0) per index t and image, its noise drawn with randn(x_0.shape) from
    `generator` (torch's global one if None), in the order t = 0, 1, .., T-1. on_step(): called
    after each index. Nothing leaves the device inside the loop.

    Returns float64 [B] tensors: "prior" L_T, "diffusion" sum_{t=2}^{T} L_{t-1}, "decoder" L_0
    and "total", their sum."""
    dims = x_0[0].numel()
    diffusion = torch.zeros(x_0.shape[0], dtype=torch.float64, device=x_0.device)
    for index, term, _ in bound_terms(x_0, p_mean_variance, alphas_bar, generator, on_step):
        if index == 0:
            decoder = term
        else:
            diffusion = diffusion + term
    bits = {"prior": bits_per_dim(prior_kl(x_0, alphas_bar[-1]), dims),
            "diffusion": bits_per_dim(diffusion, dims), "decoder": bits_per_dim(decoder, dims)}
    return {"total": bits["prior"] + bits["diffusion"] + bits["decoder"], **bits}


@torch.no_grad()
def rate_and_distortion(x_0, predict, alphas_bar, generator=None, on_step=None):
    """Progressive coding (Sec. 4.3, Fig. 5) of each image of x_0 [B, C, H, W] in [-1, 1]: after
    T - t steps of the reverse process the receiver holds x_t, for which the sender has sent

        rate(t)       = L_T + sum_{s=t}^{T-1} L_s    bits/dim (rate(0) adds L_0: the bound L)
        distortion(t) = sqrt(||x_0 - x0_hat(x_t)||^2 / D)    RMSE on the [0, 255] scale

    with x0_hat the x_0 the model predicts from x_t (the receiver's best guess; 0 at t = 0).
    The terms are bound_terms', as variational_bound's: with the same generator both give the
    same terms. predict(x_t, t) -> (mean, var, x_0 predicted) of p_theta(x_{t-1} | x_t), t 0-based.
    on_step(): called after each index.

    Returns float64 [T + 1, B] tensors indexed by the paper's t = 0 .. T: "rate" in bits/dim and
    "squared_error", the mean over the D dimensions of the squared error on [0, 255]; and
    "decoder" [B], L_0 in bits/dim (the distortion in bits: rate(0) - rate(1))."""
    T, dims = len(alphas_bar), x_0[0].numel()
    terms = torch.zeros(T, x_0.shape[0], dtype=torch.float64, device=x_0.device)
    squared_error = torch.zeros(T + 1, x_0.shape[0], dtype=torch.float64, device=x_0.device)
    for index, term, (x0_hat,) in bound_terms(x_0, predict, alphas_bar, generator, on_step):
        terms[index] = bits_per_dim(term, dims)
        squared_error[index + 1] = (127.5 * (x0_hat.double() - x_0.double())).square().flatten(1).mean(1)
    sent_after = terms.flip(0).cumsum(0).flip(0)  # [T]: sum_{s >= index} of the terms
    prior = bits_per_dim(prior_kl(x_0, alphas_bar[-1]), dims)
    rate = prior + torch.cat([sent_after, torch.zeros_like(sent_after[:1])])
    return {"rate": rate, "squared_error": squared_error, "decoder": terms[0]}


# --- The bound as a training objective (Table 2, Improved DDPM) -------------------------------
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
