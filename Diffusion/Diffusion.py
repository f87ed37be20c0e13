"""Gaussian diffusion (Ho et al. 2020): training by Algorithm 1, sampling by Algorithm 2, on all
T steps or on a shorter respaced schedule (Nichol & Dhariwal 2021). `Sampler` is the reverse
process every sampler shares (DDIM's steps are in DDIM.py, the ODE solvers' in Solvers.py); what
the latents x_t hold (Sec. 4.3-4.4) is in Latents.py.

Notation of the paper: betas beta_t, alphas alpha_t = 1 - beta_t, alphas_bar
abar_t = prod_{s<=t} alpha_s. Timesteps are 0-based here: index t = 0..T-1 is the paper's
t = 1..T. The schedule is computed in float64 and each coefficient is cast to float32 when
used, as the original.
"""
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from Diffusion.Likelihood import bound_estimate
from Diffusion.Schedule import (  # noqa: F401 (linear_betas, sampling_timesteps: this module's before)
    betas_of,
    linear_betas,
    respaced_betas,
    sampling_timesteps,
)


PREDICTIONS = ("eps", "x0", "v", "mu")
# sigma_t^2 of p_theta(x_{t-1} | x_t): fixed (Sec. 3.2) or learned, from img_channels more outputs
VARIANCES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")


def extract(v, t, x_shape):
    """v[t] as float32 [B, 1, 1, 1], to broadcast against x [B, C, H, W]."""
    return v[t].float().view(-1, *[1] * (len(x_shape) - 1))


def alpha_and_sigma(diffusion, t, x):
    """alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t) of a trainer's or sampler's schedule
    at t [B], as float32 [B, 1, 1, 1] for x [B, C, H, W]."""
    return (extract(diffusion.sqrt_alphas_bar, t, x.shape),
            extract(diffusion.sqrt_one_minus_alphas_bar, t, x.shape))


def eps_and_x0(prediction, output, x_t, alpha, sigma, alpha_step=None):
    """The network's output [B, C, H, W] read as the `prediction` it was trained for, as
    (eps, x_0), with alpha_t, sigma_t [B, 1, 1, 1] of x_t = alpha_t x_0 + sigma_t eps. The
    network predicts eps (the paper's), x_0, v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022),
    or mu, the posterior mean mu~_t (Table 2's baseline), with alpha_step the one-step
    1 - beta_t [B, 1, 1, 1] of the network's schedule at t:

        eps:  eps = output,                      x_0 = (x_t - sigma_t eps) / alpha_t
        x0:   x_0 = output,                      eps = (x_t - alpha_t x_0) / sigma_t
        v:    x_0 = alpha_t x_t - sigma_t v,     eps = sigma_t x_t + alpha_t v
        mu:   eps = (x_t - sqrt(1 - beta_t) mu) sigma_t / beta_t         (Eq. 11 solved for eps)
    (v: alpha_t^2 + sigma_t^2 = 1)."""
    if prediction == "eps":
        return output, (x_t - sigma * output) / alpha
    if prediction == "x0":
        return (x_t - alpha * output) / sigma, output
    if prediction == "mu":
        eps = (x_t - alpha_step.sqrt() * output) * sigma / (1. - alpha_step)
        return eps, (x_t - sigma * eps) / alpha
    return sigma * x_t + alpha * output, alpha * x_t - sigma * output


def target_of(prediction, x_0, eps, alpha, sigma, alpha_step=None):
    """What the network is trained to output at x_t = alpha_t x_0 + sigma_t eps: eps, x_0,
    v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, Sec. 4), or the posterior mean of
    q(x_{t-1} | x_t, x_0) (Eqs. 7 and 10), with alpha_step = 1 - beta_t [B, 1, 1, 1]:

        mu~_t = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps)      [B, C, H, W]"""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x_0
    if prediction == "mu":
        x_t = alpha * x_0 + sigma * eps
        return (x_t - (1. - alpha_step) / sigma * eps) / alpha_step.sqrt()
    return alpha * eps - sigma * x_0


def split_output(output, img_channels):
    """The network's output [B, C', H, W] as (its prediction [B, img_channels, H, W], its
    variance channels [B, img_channels, H, W], or None when it has none: a fixed variance)."""
    prediction, *variance = output.split(img_channels, dim=1)
    return prediction, (variance[0] if variance else None)


def clipped_posterior_variances(betas):
    """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Eq. 7) [T], the first (0: x_0 is known)
    replaced by the second, so that its log is finite: the decoder's variance."""
    alphas_bar = torch.cumprod(1. - betas, dim=0)
    alphas_bar_prev = F.pad(alphas_bar, [1, 0], value=1.)[:-1]
    posterior_var = betas * (1. - alphas_bar_prev) / (1. - alphas_bar)
    return torch.cat([posterior_var[1:2], posterior_var[1:]])


def fixed_variances(betas, variance):
    """sigma_t^2 [T] of a fixed variance (Sec. 3.2): beta_t ("fixedlarge") or beta~_t
    ("fixedsmall"); the first entry, which adds no noise when sampling, the clipped beta~ for
    both (the decoder's variance of the likelihood), as the original and the official code."""
    clipped = clipped_posterior_variances(betas)
    return torch.cat([clipped[:1], (betas if variance == "fixedlarge" else clipped)[1:]])


def learned_log_variance(variance, output, log_beta, log_beta_tilde):
    """log Sigma_theta(x_t, t) [B, C, H, W] of the network's variance channels `output`:
    "learned", log Sigma itself (Table 2's learned diagonal Sigma); "learned_range", Improved
    DDPM's interpolation (Nichol & Dhariwal 2021, Eq. 15) between the fixed variances,

        Sigma_theta = exp(v log beta_t + (1 - v) log beta~_t),   v = output,

    with log beta_t, log beta~_t (clipped) [B, 1, 1, 1]."""
    if variance == "learned":
        return output
    return output * log_beta + (1. - output) * log_beta_tilde


def min_snr_weight(prediction, snr, gamma):
    """The loss weight of Min-SNR-gamma (Hang et al. 2023) for each prediction target, so that
    every target weighs the x_0 error by min(SNR, gamma): min(SNR, gamma) / SNR for eps,
    min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v. snr [B, 1, 1, 1]."""
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1.)


class GaussianDiffusionTrainer(nn.Module):
    """Algorithm 1: the noise-prediction loss || eps - eps_theta(x_t, t) ||^2.

    The other rows of Table 2 and the follow-ups' options: prediction "mu", the network trained
    to output the posterior mean mu~_t, or "x0" or "v" = alpha_t eps - sigma_t x_0; loss "bound",
    the true variational bound L of Eq. 5, or "hybrid", L_simple + vlb_weight L_vlb (Improved
    DDPM, Likelihood.py); variance "learned" or "learned_range", the variance of p_theta from
    img_channels more outputs of the network; beta_schedule "cosine" (Nichol & Dhariwal Eq. 17);
    loss_weight "min_snr", each image's error weighted by Min-SNR-gamma with snr_gamma (Hang et
    al. 2023). The defaults are the paper's: L_simple, eps, the linear schedule."""

    def __init__(self, model, beta_1, beta_T, T, beta_schedule="linear", prediction="eps",
                 loss_weight="none", snr_gamma=5., loss="simple", variance="fixedlarge", vlb_weight=0.001):
        super().__init__()
        self.model = model
        self.T = T
        self.prediction, self.loss_weight, self.snr_gamma = prediction, loss_weight, snr_gamma
        self.loss, self.vlb_weight = loss, vlb_weight
        self.register_buffer("betas", betas_of(beta_schedule, beta_1, beta_T, T))
        alphas_bar = torch.cumprod(1. - self.betas, dim=0)
        self.register_buffer("alphas_bar", alphas_bar)
        self.register_buffer("sqrt_alphas_bar", alphas_bar.sqrt())
        self.register_buffer("sqrt_one_minus_alphas_bar", (1. - alphas_bar).sqrt())
        self.register_buffer("snr", alphas_bar / (1. - alphas_bar))
        # p_theta(x_{t-1} | x_t) of the network's output, for the bound's terms
        self.p_theta = GaussianDiffusionSampler(None, beta_1, beta_T, T, variance=variance,
                                                beta_schedule=beta_schedule, prediction=prediction)

    def forward(self, x_0, *condition, t=None, noise=None):
        """x_0 [B, C, H, W] in [-1, 1] -> the loss of each element [B, C, H, W], not reduced:
        with L_simple (Eq. 14) the squared error

            (eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t))^2

        at t ~ Uniform{0..T-1} [B] and eps ~ N(0, I) [B, C, H, W], drawn here unless given (the
        training run draws them so that an image gets the same ones whatever the number of
        processes). With another prediction, its target in place of eps; with min_snr, times
        its weight; with loss "bound" or "hybrid", Likelihood.py's. `condition` goes to the
        model after t (the class labels [B] of the conditional model)."""
        if t is None:
            t = torch.randint(self.T, (x_0.shape[0],), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        alpha, sigma = alpha_and_sigma(self, t, x_0)
        x_t = alpha * x_0 + sigma * noise
        output, variance_output = split_output(self.model(x_t, t, *condition), x_0.shape[1])
        target = target_of(self.prediction, x_0, noise, alpha, sigma, extract(1. - self.betas, t, x_0.shape))
        error = F.mse_loss(output, target, reduction="none")
        if self.loss_weight == "min_snr":
            error = error * min_snr_weight(self.prediction, extract(self.snr, t, x_0.shape), self.snr_gamma)
        if self.loss == "simple":
            return error
        # Improved DDPM's L_vlb sees the mean as a constant: only the variance learns from it
        mean_output = output.detach() if self.loss == "hybrid" else output
        mean, var, _ = self.p_theta.p_of_output(x_t, t, mean_output, variance_output)
        bound = bound_estimate(x_0, x_t, t, mean, var, self.alphas_bar).to(error.dtype)
        return bound if self.loss == "bound" else error + self.vlb_weight * bound


class Sampler(nn.Module):
    """What every sampler shares: the reverse process from x_T ~ N(0, I) to x_0 over `timesteps`
    (default: all T), last to first, for a network trained with `beta_schedule` and
    `prediction` (the paper's: linear, eps).

    Sampling runs the network in exactly one place, `denoise`; the guided model plugs in there
    (as the model), and so do the speed options. Coefficient tensors are indexed by i, the
    position in `timesteps` (equal to t when every step is taken). A sampler either defines
    `step` (one step at a time) or replaces `reverse_steps` (a multistep solver that keeps its
    history).
    """

    def __init__(self, model, beta_1, beta_T, T, timesteps=None, clip_denoised=False,
                 beta_schedule="linear", prediction="eps"):
        super().__init__()
        self.model = model
        self.T = T
        self.clip_denoised, self.prediction = clip_denoised, prediction
        self.register_buffer("timesteps", torch.arange(T) if timesteps is None else torch.as_tensor(timesteps))
        betas = betas_of(beta_schedule, beta_1, beta_T, T)
        self.register_buffer("betas", respaced_betas(betas, self.timesteps))
        # the network's own one-step alpha_t = 1 - beta_t at each visited t (prediction "mu")
        self.register_buffer("network_alphas", (1. - betas)[self.timesteps])
        alphas_bar = torch.cumprod(1. - self.betas, dim=0)
        self.register_buffer("alphas_bar", alphas_bar)
        self.register_buffer("alphas_bar_prev", F.pad(alphas_bar, [1, 0], value=1.)[:-1])
        self.register_buffer("sqrt_alphas_bar", alphas_bar.sqrt())
        self.register_buffer("sqrt_one_minus_alphas_bar", (1. - alphas_bar).sqrt())

    def denoise(self, x_t, i, *condition):
        """eps_theta(x_t, t) at t = timesteps[i] and the x_0 predicted from it, both [B, C, H, W]
        (x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), Eq. 4 solved for x_0, DDIM Eq. 9);
        i [B]: positions in `timesteps`. The network's output is read as the prediction it was
        trained for (eps_and_x0); a learned variance's channels are not used here. With
        clip_denoised, x_0 is clipped to [-1, 1] and eps is the one that the clipped x_0 implies."""
        output, _ = split_output(self.model(x_t, self.timesteps[i], *condition), x_t.shape[1])
        return self.read_prediction(x_t, i, output)

    def read_prediction(self, x_t, i, output):
        """The network's prediction `output` [B, C, H, W] at x_t and positions i [B] as (eps, x_0),
        x_0 clipped to [-1, 1] with clip_denoised (see denoise)."""
        alpha, sigma = alpha_and_sigma(self, i, x_t)
        eps, x_0 = eps_and_x0(self.prediction, output, x_t, alpha, sigma,
                              extract(self.network_alphas, i, x_t.shape))
        if not self.clip_denoised:
            return eps, x_0
        return eps_and_x0("x0", x_0.clamp(-1., 1.), x_t, alpha, sigma)

    def step(self, x_t, i, *condition, last):
        """One reverse step from x_t at positions i [B]: (x_{t-1}, predicted x_0). `last`: the
        step to the data, which adds no noise."""
        raise NotImplementedError

    def reverse_steps(self, x_T, *condition, start=None):
        """The reverse process, one `step` per visited timestep: yields (x_t, the x_0 predicted
        from it, x_{t-1}) for t from the last visited timestep (or position `start` of
        `timesteps`: x_T is then that step's x_t) down to the first."""
        x_t = x_T
        for index in reversed(range(self.positions(start))):
            i = torch.full((x_T.shape[0],), index, dtype=torch.long, device=x_T.device)
            x_prev, x_0 = self.step(x_t, i, *condition, last=index == 0)
            yield x_t, x_0, x_prev
            x_t = x_prev

    def positions(self, start=None):
        """How many steps a run from position `start` of `timesteps` takes (None: from x_T, all)."""
        return len(self.timesteps) if start is None else start + 1

    @torch.no_grad()
    def forward(self, x_T, *condition, progress=True, on_step=None, start=None):
        """x_T [B, C, H, W] ~ N(0, I) -> x_0 [B, C, H, W], clipped to [-1, 1].
        on_step(x_t, x_0): called at each step with x_t and the x_0 predicted from it.
        start: begin at position `start` of `timesteps`, x_T being that step's x_t, q(x_t | x_0)
        or an earlier run's (None: at the last)."""
        x_prev = x_T
        has_nan = torch.zeros((), dtype=torch.bool, device=x_T.device)
        for x_t, x_0, x_prev in tqdm(self.reverse_steps(x_T, *condition, start=start),
                                     total=self.positions(start),
                                     desc="sampling", disable=not progress, leave=False, dynamic_ncols=True):
            if on_step is not None:
                on_step(x_t, x_0)
            has_nan |= x_prev.isnan().any()  # stays on the device: no sync inside the loop
        if has_nan:
            raise FloatingPointError(
                "sampling produced NaN: the model's weights hold NaN or inf, or diverged in "
                "training; check the checkpoint (test_load_weight) and that beta_1, beta_T and T "
                "are the ones it was trained with")
        return x_prev.clip(-1., 1.)


class GaussianDiffusionSampler(Sampler):
    """Algorithm 2: x_T ~ N(0, I), then for t = T..1

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) + sigma_t z

    with z ~ N(0, I) except at the last step. variance: sigma_t^2 = beta_t ("fixedlarge", the
    original's) or the posterior variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    ("fixedsmall"), the paper's two choices (Sec. 3.2); or Sigma_theta(x_t, t) of a network that
    learned it ("learned", "learned_range": learned_log_variance). clip_denoised: compute the
    mean through the predicted x_0, clipped to [-1, 1], as the paper's own sampler did for its
    CIFAR-10 FID (Eq. 7). With fewer `timesteps` than T, this is Algorithm 2 on the respaced
    betas (Nichol & Dhariwal 2021).
    """

    def __init__(self, model, beta_1, beta_T, T, clip_denoised=False, variance="fixedlarge",
                 timesteps=None, **diffusion):
        super().__init__(model, beta_1, beta_T, T, timesteps, clip_denoised, **diffusion)
        self.variance = variance
        betas, alphas_bar, alphas_bar_prev = self.betas, self.alphas_bar, self.alphas_bar_prev
        alphas = 1. - betas
        self.register_buffer("coeff1", (1. / alphas).sqrt())
        self.register_buffer("coeff2", self.coeff1 * betas / (1. - alphas_bar).sqrt())
        # Posterior q(x_{t-1} | x_t, x_0), Eqs. 6-7: the two weights of its mean.
        self.register_buffer("posterior_mean_coef1", betas * alphas_bar_prev.sqrt() / (1. - alphas_bar))
        self.register_buffer("posterior_mean_coef2", (1. - alphas_bar_prev) * alphas.sqrt() / (1. - alphas_bar))
        if variance in LEARNED_VARIANCES:  # the two ends of learned_range
            self.register_buffer("log_betas", betas.log())
            self.register_buffer("log_posterior_var", clipped_posterior_variances(betas).log())
        else:  # its first entry adds no noise when sampling; the likelihood's decoder uses it
            self.register_buffer("sample_var", fixed_variances(betas, variance))

    def step(self, x_t, i, *condition, last):
        """Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z with z ~ N(0, I), and z = 0
        on the `last` step (t = 1). Returns (x_{t-1}, the x_0 predicted from x_t)."""
        mean, var, x_0 = self.p_mean_variance_and_x0(x_t, i, *condition)
        if last:
            return mean, x_0
        return mean + var.sqrt() * torch.randn_like(x_t), x_0

    def mean(self, x_t, i, eps, x_0):
        """mu_theta(x_t, t) [B, C, H, W]: Eq. 11, or with clip_denoised the posterior mean of Eq. 7
        at the clipped x_0, mu~_t = coef1 x_0 + coef2 x_t."""
        if self.clip_denoised:
            return (extract(self.posterior_mean_coef1, i, x_t.shape) * x_0
                    + extract(self.posterior_mean_coef2, i, x_t.shape) * x_t)
        return self.predict_xt_prev_mean_from_eps(x_t, i, eps)

    def predict_xt_prev_mean_from_eps(self, x_t, t, eps):
        """mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) (Eq. 11) [B, C, H, W];
        t [B]: positions in `timesteps`."""
        return extract(self.coeff1, t, x_t.shape) * x_t - extract(self.coeff2, t, x_t.shape) * eps

    def p_mean_variance(self, x_t, t, *condition):
        """The mean and variance of p_theta(x_{t-1} | x_t): [B, C, H, W] and [B, 1, 1, 1] (a learned
        variance: [B, C, H, W]); t [B]: positions in `timesteps`."""
        return self.p_mean_variance_and_x0(x_t, t, *condition)[:2]

    def p_mean_variance_and_x0(self, x_t, t, *condition):
        """p_mean_variance and the x_0 predicted from x_t [B, C, H, W], of one network call."""
        output = self.model(x_t, self.timesteps[t], *condition)
        return self.p_of_output(x_t, t, *split_output(output, x_t.shape[1]))

    def p_of_output(self, x_t, i, output, variance_output=None):
        """p_theta(x_{t-1} | x_t) of the network's prediction `output` and variance channels
        `variance_output` (None: a fixed variance), [B, C, H, W] each, at positions i [B]: its
        mean, its variance and the x_0 predicted (as p_mean_variance_and_x0)."""
        eps, x_0 = self.read_prediction(x_t, i, output)
        return self.mean(x_t, i, eps, x_0), self.sigma_squared(x_t, i, variance_output), x_0

    def sigma_squared(self, x_t, i, variance_output):
        """sigma_t^2 at positions i [B]: the fixed variance [B, 1, 1, 1], or the learned one
        [B, C, H, W] of the network's variance channels."""
        if self.variance not in LEARNED_VARIANCES:
            return extract(self.sample_var, i, x_t.shape)
        return learned_log_variance(self.variance, variance_output, extract(self.log_betas, i, x_t.shape),
                                    extract(self.log_posterior_var, i, x_t.shape)).exp()
