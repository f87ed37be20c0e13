"""DPM-Solver++ and UniPC (Diffusion/Solvers.py): the same samples as diffusers' schedulers, the
order of convergence on Gaussian data (where the ODE is solved in closed form), one network
evaluation per step, and the lambda-uniform timesteps."""
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from torch import nn

from Diffusion.Schedule import linear_betas, logsnr_timesteps, sampling_timesteps
from Diffusion.Solvers import dpm_solver_pp, unipc

T = 1000
BETAS = linear_betas(1e-4, 0.02, T)  # the repo's schedule, float64
ALPHAS_BAR = torch.cumprod(1. - BETAS, dim=0)
SOLVERS = {"dpm_solver_pp": dpm_solver_pp, "unipc": unipc}
# diffusers' set_timesteps calls np.array on a tensor, which numpy 2 warns about: theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def alpha_sigma(t):
    """alpha_t, sigma_t at integer timestep t, float32 (0-dim)."""
    return ALPHAS_BAR[t].sqrt().float(), (1. - ALPHAS_BAR[t]).sqrt().float()


def analytic_eps(mu, wiggle=0.2):
    """eps_theta(x, t) in closed form: the exact one for data N(mu, 0.5^2 I), plus a smooth
    nonlinear term so that x_0 is not linear in x."""
    def eps(x, t):
        alpha, sigma = alpha_sigma(t)
        return sigma * (x - alpha * mu) / (alpha ** 2 * 0.25 + sigma ** 2) + wiggle * alpha * torch.sin(3. * x)
    return eps


class TinyEpsNet(nn.Module):
    """A fixed random network eps_theta(x, t) = x + a small residual: two 3x3 convolutions with
    the timestep added as sinusoids between them. (eps close to x keeps x_0 = (x - sigma eps) /
    alpha bounded at high noise, as a trained model's is; a residual of gain above 1 would make
    the ODE blow up.)"""

    def __init__(self, channels=3, hidden=8, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.frequencies = torch.rand(hidden, generator=generator) * 0.02
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1

    @torch.no_grad()
    def forward(self, x, t):
        time = torch.sin(t * self.frequencies).view(1, -1, 1, 1)
        return x + self.conv_out(torch.nn.functional.silu(self.conv_in(x) + time))


def guided(eps_conditional, eps_unconditional, w=3.):
    """The classifier-free guided estimate (1 + w) eps_c - w eps_null."""
    return lambda x, t: (1. + w) * eps_conditional(x, t) - w * eps_unconditional(x, t)


EPS = {
    "analytic": analytic_eps(0.3),
    "network": TinyEpsNet(),
    "guided": guided(analytic_eps(0.3), analytic_eps(-0.2, wiggle=-0.1)),
}


def timesteps_of(rule, steps):
    """Our visited timesteps, ascending: the repo's uniform rule or logsnr_timesteps."""
    return sampling_timesteps(T, steps, "uniform") if rule == "uniform" else logsnr_timesteps(ALPHAS_BAR, steps)


def data_prediction_of(eps, timesteps, clip=False):
    """data_prediction(x, index) = (x - sigma eps(x, t)) / alpha at t = timesteps[index]."""
    def data_prediction(x, index):
        t = int(timesteps[index])
        alpha, sigma = alpha_sigma(t)
        x_0 = (x - sigma * eps(x, t)) / alpha
        return x_0.clamp(-1., 1.) if clip else x_0
    return data_prediction


def our_sample(solver, eps, timesteps, x_T, order):
    *_, (_, _, sample) = solver(data_prediction_of(eps, timesteps), x_T, ALPHAS_BAR[timesteps], order)
    return sample


def diffusers_scheduler(solver, order, timesteps):
    """diffusers' scheduler for `solver`, set to visit `timesteps` (ascending; it runs them
    descending). DPMSolverMultistepScheduler takes them in set_timesteps. UniPC's set_timesteps
    takes only a count (and sigmas only for flow models), so it is set for that count and its
    `timesteps` and `sigmas` replaced by what its own set_timesteps computes for given integer
    timesteps (the branch without Karras, exponential, beta or flow sigmas): sigma =
    sqrt((1 - abar) / abar) interpolated at each timestep, then 0 (final_sigmas_type="zero"),
    float32. step() reads nothing else of the schedule: the timesteps locate the step index, the
    sigmas give alpha_t and sigma_t."""
    descending = timesteps.flip(0).tolist()
    common = dict(num_train_timesteps=T, trained_betas=BETAS.numpy(), solver_order=order,
                  lower_order_final=True, final_sigmas_type="zero")
    if solver == "dpm_solver_pp":
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
        scheduler.set_timesteps(timesteps=descending)
        return scheduler
    scheduler = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
    scheduler.set_timesteps(len(descending))
    alphas_cumprod = scheduler.alphas_cumprod
    sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    sigmas = np.interp(descending, np.arange(len(sigmas)), sigmas)
    scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.]]).astype(np.float32))
    scheduler.timesteps = torch.tensor(descending, dtype=torch.int64)
    return scheduler


def diffusers_sample(scheduler, eps, x):
    """Runs the scheduler on eps (prediction_type "epsilon"); returns the sample and the
    timesteps the model was evaluated at."""
    evaluated = []
    for t in scheduler.timesteps:
        evaluated.append(int(t))
        x = scheduler.step(eps(x, int(t)), t, x).prev_sample
    return x, evaluated


def x_T_of(seed=0, shape=(2, 3, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_same_sample(ours, theirs):
    assert torch.isfinite(theirs).all()
    difference = (ours - theirs).abs().max() / theirs.abs().max()
    assert difference < 1e-4, f"max |ours - diffusers| / max |diffusers| = {difference:.2e}"


# Max |ours - diffusers| / max |diffusers| as measured: 6e-7 .. 1.4e-5 for the analytic eps,
# 1e-6 .. 8e-6 for the network, 4e-6 .. 4.2e-5 with guidance (w = 3 scales eps up): float32
# rounding, diffusers computing its coefficients in float32 (from a float32 cumprod of the betas),
# we in float64.
@pytest.mark.parametrize("rule", ["uniform", "logsnr"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver", ["dpm_solver_pp", "unipc"])
def test_solver_gives_diffusers_sample(solver, order, steps, rule):
    timesteps = timesteps_of(rule, steps)
    scheduler = diffusers_scheduler(solver, order, timesteps)
    theirs, evaluated = diffusers_sample(scheduler, EPS["analytic"], x_T_of())
    assert evaluated == timesteps.flip(0).tolist()
    assert_same_sample(our_sample(SOLVERS[solver], EPS["analytic"], timesteps, x_T_of(), order), theirs)


@pytest.mark.parametrize("eps", ["network", "guided"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver", ["dpm_solver_pp", "unipc"])
def test_solver_gives_diffusers_sample_for_a_network_and_with_guidance(solver, order, eps):
    timesteps = timesteps_of("logsnr", 10)
    theirs, _ = diffusers_sample(diffusers_scheduler(solver, order, timesteps), EPS[eps], x_T_of(1))
    assert_same_sample(our_sample(SOLVERS[solver], EPS[eps], timesteps, x_T_of(1), order), theirs)


@pytest.mark.parametrize("rule", ["uniform", "logsnr"])
def test_unipc_scheduler_is_set_as_its_own_set_timesteps_would(rule):
    """The sigmas put into UniPC are those diffusers' DPMSolverMultistepScheduler computes from
    the same betas when given the timesteps."""
    timesteps = timesteps_of(rule, 10)
    unipc_scheduler = diffusers_scheduler("unipc", 2, timesteps)
    dpm_scheduler = diffusers_scheduler("dpm_solver_pp", 2, timesteps)
    assert torch.equal(unipc_scheduler.sigmas, dpm_scheduler.sigmas)
    assert torch.equal(unipc_scheduler.timesteps, dpm_scheduler.timesteps)


# Convergence on x_0 ~ N(mu, s^2 I): the exact data prediction is
#     E[x_0 | x_t] = mu + alpha_t s^2 (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2),
# and the probability-flow ODE keeps (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant.
# The schedule is continuous: S points uniform in lambda from 5 (position 0) to -5 (x_T), where
# abar = sigmoid(2 lambda). The error is that of the state after the second-to-last step, at
# position 0 (the last step, to sigma = 0, is exact only in the limit), in float64.
#
# Measured rms errors at S = 128, 256, 512 and the slopes log2(e_S / e_2S):
#     DPM-Solver++(1)   9.7e-3 4.9e-3 2.4e-3   slopes 1.00 1.00
#     DPM-Solver++(2M)  1.9e-4 4.8e-5 1.2e-5   slopes 2.01 2.01
#     DPM-Solver++(3M)  6.6e-5 1.6e-5 4.0e-6   slopes 2.04 2.02
#     UniPC-1           5.8e-4 1.4e-4 3.6e-5   slopes 2.01 2.01
#     UniPC-2           2.0e-5 2.5e-6 3.1e-7   slopes 3.01 3.01
#     UniPC-3           6.6e-7 4.3e-8 2.5e-9   slopes 3.94 4.08
# DPM-Solver++(3M) is of order 2, not 3: as published (Lu et al.'s dpm_solver_pytorch.py,
# diffusers, k-diffusion, and so here) its D2 term has phi_3 where the Taylor expansion has
# 2 phi_3, so it is exact for x_0 linear in lambda but not quadratic (see Solvers.py). UniPC-p
# is of order p + 1 where the corrector acts (Zhao et al., Theorem 3.1); UniPC-3's first
# correction (UniC-1) and last prediction (UniP-2, uncorrected) are of order 3, but at the two
# ends of the schedule, where the errors of x_0 are damped by alpha^2 or sigma^2, so order 4 is
# what shows here. At 8, 16, 32, 64, 128 steps the slopes are not yet all asymptotic
# (2M: 0.09 1.86 2.00 2.01; 3M: 3.97 2.66 2.29 2.10; UniPC-3: 6.68 4.84 2.65 3.70).
CONVERGENCE_ORDER = {("dpm_solver_pp", 1): 1, ("dpm_solver_pp", 2): 2, ("dpm_solver_pp", 3): 2,
                     ("unipc", 1): 2, ("unipc", 2): 3, ("unipc", 3): 4}


def gaussian_data(steps, mu, s):
    """Data N(mu, s^2 I) on a continuous schedule of `steps` points uniform in lambda, from 5 down
    to -5 (float64): lambdas, alphas_bar, alpha, spread = sqrt(alpha^2 s^2 + sigma^2) [steps],
    the exact data prediction E[x_0 | x_t] at each point, and an x_T [1, 4, 32, 32]."""
    lambdas = torch.linspace(5., -5., steps, dtype=torch.float64)
    alphas_bar = torch.sigmoid(2. * lambdas)
    alpha, sigma = alphas_bar.sqrt(), (1. - alphas_bar).sqrt()
    spread = (alpha ** 2 * s ** 2 + sigma ** 2).sqrt()

    def data_prediction(x, index):
        return mu + alpha[index] * s ** 2 * (x - alpha[index] * mu) / spread[index] ** 2

    x_T = torch.randn(1, 4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return lambdas, alphas_bar, alpha, spread, data_prediction, x_T


def gaussian_ode_error(solver, order, steps, mu=0.3, s=0.5):
    _, alphas_bar, alpha, spread, data_prediction, x_T = gaussian_data(steps, mu, s)
    exact = alpha[0] * mu + spread[0] * (x_T - alpha[-1] * mu) / spread[-1]
    *_, (_, _, x_at_position_0), _ = SOLVERS[solver](data_prediction, x_T, alphas_bar, order)
    assert x_at_position_0.dtype == torch.float64
    return (x_at_position_0 - exact).square().mean().sqrt().item()


@pytest.mark.parametrize("solver, order", list(CONVERGENCE_ORDER))
def test_solver_error_falls_at_its_order_on_gaussian_data(solver, order):
    errors = [gaussian_ode_error(solver, order, steps) for steps in (128, 256, 512)]
    slopes = [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]
    expected = CONVERGENCE_ORDER[solver, order]
    assert all(abs(slope - expected) < 0.6 for slope in slopes), (errors, slopes)


@pytest.mark.parametrize("rule", ["uniform", "logsnr"])
@pytest.mark.parametrize("steps", [10, 15, 20, 25])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver", ["dpm_solver_pp", "unipc"])
def test_solver_sample_is_in_range_when_x0_is_clipped(solver, order, steps, rule):
    timesteps = timesteps_of(rule, steps)
    data_prediction = data_prediction_of(EPS["network"], timesteps, clip=True)
    states = list(SOLVERS[solver](data_prediction, x_T_of(2), ALPHAS_BAR[timesteps], order))
    assert all(torch.isfinite(x_next).all() for _, _, x_next in states)
    sample = states[-1][2]
    assert sample.abs().max() <= 1.
    assert torch.equal(sample, states[-1][1])  # the last step lands on x_0 predicted at tau_0


@pytest.mark.parametrize("steps", [1, 2, 10])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver", ["dpm_solver_pp", "unipc"])
def test_solver_evaluates_the_model_once_per_step_and_yields_each_step(solver, order, steps):
    timesteps = timesteps_of("logsnr", steps)
    predict = data_prediction_of(EPS["analytic"], timesteps)
    calls = []

    def data_prediction(x, index):
        calls.append((x, index))
        return predict(x, index)

    states = list(SOLVERS[solver](data_prediction, x_T_of(), ALPHAS_BAR[timesteps], order))
    assert [index for _, index in calls] == list(range(steps - 1, -1, -1))
    assert len(states) == steps
    assert torch.equal(states[0][0], x_T_of())
    for (x_t, x_0, x_next), (x_seen, _), following in zip(states, calls, states[1:] + [None]):
        assert torch.equal(x_t, x_seen)  # x_0 is the model's prediction from x_t
        assert x_t.shape == x_0.shape == x_next.shape and x_next.dtype == torch.float32
        if following is not None:
            assert torch.equal(following[0], x_next)


LAMBDA = (0.5 * (ALPHAS_BAR.log() - torch.log1p(-ALPHAS_BAR))).numpy()  # falls with t


@pytest.mark.parametrize("steps", [10, 20, 50, 100, 500])
def test_logsnr_timesteps_are_uniform_in_lambda_up_to_the_integer_grid(steps):
    """Each timestep is the nearest integer to where lambda(t), piecewise linear, meets its
    lambda-uniform target (so its lambda is within half a grid step of the target), or, where
    rounding repeats a timestep near t = 0, one past its predecessor."""
    timesteps = logsnr_timesteps(ALPHAS_BAR, steps)
    assert timesteps.dtype == torch.long and len(timesteps) == steps
    assert timesteps[0] == 0 and timesteps[-1] == T - 1 and (timesteps.diff() > 0).all()
    targets = np.linspace(LAMBDA[-1], LAMBDA[0], steps)[::-1]
    nearest = np.rint(np.interp(-targets, -LAMBDA, np.arange(T)))
    chosen = timesteps.numpy()
    moved = chosen != nearest
    assert (chosen >= nearest).all()
    assert (chosen[1:][moved[1:]] == chosen[:-1][moved[1:]] + 1).all()
    unmoved = chosen[~moved]
    neighbours = np.stack([np.maximum(unmoved - 1, 0), np.minimum(unmoved + 1, T - 1)])
    local_step = np.abs(LAMBDA[neighbours] - LAMBDA[unmoved]).max(axis=0)
    assert (np.abs(LAMBDA[unmoved] - targets[~moved]) <= 0.5 * local_step + 1e-12).all()
    if steps <= 20:  # coarse enough that no two targets round to one timestep
        assert not moved.any()
    spacing = (LAMBDA[0] - LAMBDA[-1]) / (steps - 1)
    if steps <= 100:  # few repeats: the lambda gaps are uniform to 5% in the median
        gaps = -np.diff(LAMBDA[chosen])
        assert np.median(np.abs(gaps - spacing)) < 0.05 * spacing


def test_logsnr_timesteps_of_every_step_is_every_step():
    assert torch.equal(logsnr_timesteps(ALPHAS_BAR, T), torch.arange(T))
    assert torch.equal(logsnr_timesteps(ALPHAS_BAR, 1), torch.tensor([T - 1]))


@pytest.mark.parametrize("steps", [0, T + 1])
def test_logsnr_timesteps_refuses_a_step_count_outside_1_to_T(steps):
    with pytest.raises(ValueError, match=f"between 1 and T = {T}.*got {steps}"):
        logsnr_timesteps(ALPHAS_BAR, steps)


@pytest.mark.parametrize("steps", [3, 10, 15, 20, 25])
@pytest.mark.parametrize("split_snr", [0.1, 1.])
def test_logsnr_timesteps_split_puts_half_the_steps_below_the_split_snr(steps, split_snr):
    """With split_snr: steps // 2 timesteps below it (SNR < split_snr), uniform in lambda from
    lambda(T-1) on, and the others uniform from the largest t whose SNR >= split_snr to t = 0."""
    timesteps = logsnr_timesteps(ALPHAS_BAR, steps, split_snr)
    assert len(timesteps) == steps and timesteps[0] == 0 and timesteps[-1] == T - 1 and (timesteps.diff() > 0).all()
    snr = (ALPHAS_BAR / (1. - ALPHAS_BAR))[timesteps]
    above = int((snr >= split_snr).sum())
    assert steps - above == steps // 2 and (snr[:above] >= split_snr).all()
    split_t = int(timesteps[above - 1])
    assert ALPHAS_BAR[split_t + 1] / (1. - ALPHAS_BAR[split_t + 1]) < split_snr  # the largest such t
    split = 0.5 * np.log(split_snr)
    below_targets = np.linspace(LAMBDA[-1], split, steps // 2 + 1)[:-1]
    above_targets = np.linspace(split, LAMBDA[0], above)
    nearest = np.rint(np.interp(-np.concatenate([below_targets, above_targets])[::-1], -LAMBDA, np.arange(T)))
    nearest[above - 1] = split_t
    assert np.array_equal(timesteps.numpy(), nearest)  # coarse enough that none is moved


@pytest.mark.parametrize("split_snr", [0., 1e-6, 1e5])
def test_logsnr_timesteps_split_outside_the_schedule_is_no_split(split_snr):
    assert torch.equal(logsnr_timesteps(ALPHAS_BAR, 20, split_snr), logsnr_timesteps(ALPHAS_BAR, 20))
