"""The noise schedule and the timesteps a sampler visits.

The forward process (DDPM Eq. 4) is x_t = alpha_t x_0 + sigma_t eps with alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), abar_t = prod_{s<=t} (1 - beta_s), and SNR(t) = alpha_t^2 / sigma_t^2.
The betas are the paper's linear schedule or the cosine schedule of Nichol & Dhariwal 2021; a
sampler visits some of the T timesteps (uniform, quadratic or uniform in log-SNR), on the
respaced schedule of those. Every tensor of a schedule is float64 [T] (or [S]); timesteps are
0-based.
"""
import math

import torch
from torch.nn import functional as F

BETA_SCHEDULES = ("linear", "cosine")
COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal Eq. 17
LARGEST_BETA = 0.999  # their clip, which keeps the cosine schedule's last steps finite


def linear_betas(beta_1, beta_T, T):
    """The paper's linear schedule beta_1 .. beta_T, float64 [T]. Spaced in float32 first, as the
    original, so that every coefficient is the original's to the last bit."""
    return torch.linspace(beta_1, beta_T, T).double()


def cosine_alphas_bar(t, T, s=COSINE_OFFSET):
    """Nichol & Dhariwal Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) pi / 2),
    for t [N] (float64) in 0..T."""
    def f(t):
        return torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return f(t) / f(torch.zeros((), dtype=torch.float64))


def cosine_betas(T):
    """The betas of the cosine schedule, float64 [T]: beta_t = 1 - abar(t) / abar(t - 1) of
    Eq. 17 at the paper's t = 1..T, clipped at 0.999."""
    t = torch.arange(T + 1, dtype=torch.float64)
    alphas_bar = cosine_alphas_bar(t, T)
    return (1. - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=LARGEST_BETA)


def betas_of(beta_schedule, beta_1, beta_T, T):
    """The betas of beta_schedule ("linear": beta_1 .. beta_T; "cosine": Eq. 17, which has no
    beta_1 or beta_T), float64 [T]."""
    return linear_betas(beta_1, beta_T, T) if beta_schedule == "linear" else cosine_betas(T)


def sampling_timesteps(T, steps, skip_type="uniform"):
    """The timesteps tau_0 < ... < tau_{S-1} that a sampler visits (0-based), long [S], as the DDIM
    paper chooses them (Song et al. 2021, Sec. 4.2 and Appendix D.2):

        uniform:    tau_i = floor(i T / S)                          (every T/S-th step)
        quadratic:  tau_i = floor(c i^2), the last one floor(0.8 T)   (denser near the data)

    for i = 0 .. S-1. Where the quadratic rule repeats a step (S > sqrt(0.8 T) + 1), each repeat
    is moved one past its predecessor, so that every one of the S network evaluations counts.
    steps == T with "uniform" is every step 0 .. T-1, the original's Algorithm 2.
    """
    if skip_type == "uniform":
        return torch.arange(steps, dtype=torch.float64).mul(T / steps).floor().long()
    quadratic = torch.linspace(0., math.sqrt(0.8 * T), steps, dtype=torch.float64).square().long()
    offsets = torch.arange(steps)
    return torch.cummax(quadratic - offsets, dim=0).values + offsets


def logsnr_timesteps(alphas_bar, steps, split_snr=0.):
    """`steps` timesteps of a schedule of T, long [steps], ascending, uniform in lambda_t: the
    values evenly spaced from lambda(T-1) to lambda(0), each mapped back to a real t on the
    piecewise-linear lambda(t) of the discrete schedule and rounded. Where rounding repeats a
    step (near t = 0, where one step spans more lambda than the spacing), each repeat is moved one
    past its predecessor, as sampling_timesteps does, and where that would run past T-1 the ones
    before are held back, so that the result always holds 0 and T-1 (steps == T: every step;
    steps == 1: T-1 alone). alphas_bar: float64 [T], of the full schedule.

    split_snr > 0 inside the schedule's SNR range (the solvers' noise window, eta_min_snr): half
    the steps (steps // 2) uniform in lambda below lambda_split = log(split_snr) / 2, the others
    uniform from it to lambda(0), the first of those at the largest t whose SNR is at least
    split_snr (rounded down), so that every step from there on draws noise."""
    T = len(alphas_bar)
    if not 1 <= steps <= T:
        raise ValueError(f"logsnr_timesteps: steps must be between 1 and T = {T} (one network "
                         f"evaluation per visited timestep), got {steps}")
    lambda_t = 0.5 * (alphas_bar.log() - torch.log1p(-alphas_bar))  # falls with t
    split = 0.5 * math.log(split_snr) if split_snr > 0 else math.inf
    below = steps // 2 if steps >= 3 and lambda_t[-1] < split < lambda_t[0] else 0
    if below:
        targets = torch.cat([_evenly(lambda_t[-1], split, below + 1, alphas_bar.device)[:-1],
                             _evenly(split, lambda_t[0], steps - below, alphas_bar.device)])
    else:
        targets = _evenly(lambda_t[-1], lambda_t[0], steps, alphas_bar.device)
    t = inverse_lambda(lambda_t, targets.flip(0)).round().long()  # ascending t
    if below:  # the split, rounded down to t with SNR >= split_snr
        t[steps - below - 1] = inverse_lambda(lambda_t, targets[below:below + 1]).floor().long()
    offsets = torch.arange(steps, device=alphas_bar.device)
    return torch.cummax(t - offsets, dim=0).values.clamp(max=T - steps) + offsets


def _evenly(start, end, count, device):
    """`count` values evenly spaced from start to end (floats or 0-dim tensors), float64 [count]."""
    return start + (end - start) * torch.linspace(0., 1., count, dtype=torch.float64, device=device)


def inverse_lambda(lambda_t, targets):
    """The real t where the piecewise-linear lambda(t) through lambda_t [T] (falling) meets each
    of `targets`."""
    upper = torch.searchsorted(-lambda_t, -targets).clamp(1, len(lambda_t) - 1)
    lower = upper - 1
    return lower + (lambda_t[lower] - targets) / (lambda_t[lower] - lambda_t[upper])


def respaced_betas(betas, timesteps):
    """The betas of the shorter diffusion that visits only `timesteps` (Nichol & Dhariwal 2021,
    Sec. 4): beta_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}, so that its alphas_bar are those of the
    full schedule at tau. float64 [S]. Every step visited: `betas` itself, to the last bit."""
    if len(timesteps) == len(betas):
        return betas
    alphas_bar = torch.cumprod(1. - betas, dim=0)[timesteps]
    return 1. - alphas_bar / F.pad(alphas_bar, [1, 0], value=1.)[:-1]
