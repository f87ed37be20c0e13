"""DPM-Solver++ and UniPC with noise (Diffusion/Solvers.py, eta > 0): diffusers' SDE-DPM-Solver++ at
eta = 1 given the same noise, and for both solvers the marginals of the forward process kept at
every step, the mean of the reverse SDE reached at the solver's order on Gaussian data (where it
is known in closed form), and eta_min_snr keeping the ODE's steps where the SNR is below it."""
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from Diffusion.Solvers import dpm_solver_pp, unipc
from test_solvers import (ALPHAS_BAR, BETAS, EPS, T, assert_same_sample, data_prediction_of, gaussian_data,
                          timesteps_of, x_T_of)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def fixed_noise(steps, shape=(2, 3, 8, 8)):
    """The noise of each step, drawn beforehand, and noise(x) handing it out in order."""
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(100 + k)) for k in range(steps)]
    given = iter(draws)
    return draws, lambda x: next(given)


def diffusers_sde_sample(eps, timesteps, x, order, draws):
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS.numpy(), solver_order=order, lower_order_final=True,
        final_sigmas_type="zero", algorithm_type="sde-dpmsolver++", solver_type="midpoint")
    scheduler.set_timesteps(timesteps=timesteps.flip(0).tolist())
    for t, noise in zip(scheduler.timesteps, draws):
        x = scheduler.step(eps(x, int(t)), t, x, variance_noise=noise).prev_sample
    return x


# Max |ours - diffusers| / max |diffusers| as measured: 1.8e-6 .. 5.3e-6 (float32 rounding).
# diffusers' order 3 is not compared: it weighs D2 by alpha (phi_3 + 1) where the expansion at
# H = 2h gives alpha phi_3 (Solvers._dpm_solver_pp_step).
@pytest.mark.parametrize("eps", ["analytic", "network", "guided"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_pp_at_eta_1_gives_diffusers_sde_sample_for_the_same_noise(order, steps, eps):
    timesteps = timesteps_of("logsnr", steps)
    draws, noise = fixed_noise(steps)
    theirs = diffusers_sde_sample(EPS[eps], timesteps, x_T_of(), order, draws)
    *_, (_, _, ours) = dpm_solver_pp(data_prediction_of(EPS[eps], timesteps), x_T_of(), ALPHAS_BAR[timesteps],
                                     order, eta=1., noise=noise)
    assert_same_sample(ours, theirs)


@pytest.mark.parametrize("eta, min_snr", [(0.3, 0.), (1., 0.), (10., 1.)])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver", [dpm_solver_pp, unipc])
def test_stochastic_steps_keep_the_forward_marginals(solver, order, eta, min_snr):
    """Data all at one point mu: x_0(x_t) = mu exactly, so the reverse process of any eta must
    give x_t ~ N(alpha_t mu, sigma_t^2) at every visited t, as the forward process does."""
    mu, steps = 0.4, 10
    timesteps = timesteps_of("logsnr", steps)
    alphas_bar = ALPHAS_BAR[timesteps]
    torch.manual_seed(0)
    x_T = alphas_bar[-1].sqrt() * mu + (1. - alphas_bar[-1]).sqrt() * torch.randn(200_000, dtype=torch.float64)
    states = list(solver(lambda x, index: torch.full_like(x, mu), x_T, alphas_bar, order, eta=eta,
                         eta_min_snr=min_snr))
    for position, (_, _, x_next) in zip(range(steps - 2, -1, -1), states):
        alpha, sigma = alphas_bar[position].sqrt(), (1. - alphas_bar[position]).sqrt()
        assert abs(x_next.mean() - alpha * mu) < 0.01 * sigma
        assert abs(x_next.std() / sigma - 1.) < 0.01
    assert torch.equal(states[-1][2], torch.full_like(x_T, mu))  # the last step lands on x_0


def gaussian_mean_error(solver, order, steps, eta, mu=0.3, s=0.5):
    """|E[solver's x at position 0 | x_T] - E[x_0's SDE solution | x_T]| (rms, float64) for data
    N(mu, s^2 I), on the continuous schedule of test_solvers.gaussian_data. With
    v = alpha^2 s^2 + sigma^2 the reverse SDE keeps, on average, (x - alpha mu) / sqrt(v) times
    exp(eta F(lambda)), F(lambda) = -log(e^{-2 lambda} + s^2) / 2; the solver's mean is the solver
    run without its noise, since x_0(x) is linear in x."""
    lambdas, alphas_bar, alpha, spread, data_prediction, x_T = gaussian_data(steps, mu, s)

    def F(lam):
        return -0.5 * torch.log(torch.exp(-2. * lam) + s ** 2)

    exact = (alpha[0] * mu + spread[0] * (x_T - alpha[-1] * mu) / spread[-1]
             * torch.exp(-eta * (F(lambdas[0]) - F(lambdas[-1]))))
    *_, (_, _, x_at_position_0), _ = solver(data_prediction, x_T, alphas_bar, order, eta=eta,
                                            noise=torch.zeros_like)
    return (x_at_position_0 - exact).square().mean().sqrt().item()


# Measured at eta = 0.5, S = 128, 256, 512: DPM-Solver++ order 1 4.2e-4 2.1e-4 1.1e-4 (slopes
# 1.00 1.00), 2M 1.3e-5 3.2e-6 7.8e-7 (2.03 2.01), 3M 4.0e-6 1.0e-6 2.6e-7 (1.98 1.99): the orders of
# the ODE's solvers (3M of order 2, as there); UniPC-1 3.0e-5 7.3e-6 1.8e-6 (2.01 2.01), UniPC-2
# 1.5e-6 1.8e-7 2.3e-8 (3.02 3.01), UniPC-3 9.1e-8 5.7e-9 3.5e-10 (3.99 4.03): p + 1, as its
# corrector gives the ODE's. At eta = 1 every order gives the mean exactly (1e-16) on Gaussian
# data: there x_0 predicted along the mean path is constant, E[x_0 | x_T].
@pytest.mark.parametrize("solver, order, expected", [(dpm_solver_pp, 1, 1), (dpm_solver_pp, 2, 2),
                                                     (dpm_solver_pp, 3, 2), (unipc, 1, 2), (unipc, 2, 3),
                                                     (unipc, 3, 4)])
def test_stochastic_solver_mean_converges_at_its_order_on_gaussian_data(solver, order, expected):
    errors = [gaussian_mean_error(solver, order, steps, eta=0.5) for steps in (128, 256, 512)]
    slopes = [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]
    assert all(abs(slope - expected) < 0.3 for slope in slopes), (errors, slopes)
    assert gaussian_mean_error(solver, order, 16, eta=1.) < 1e-12


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver", [dpm_solver_pp, unipc])
def test_stochastic_solver_sample_is_in_range_and_draws_new_noise_per_step(solver, order, steps):
    timesteps = timesteps_of("logsnr", steps)
    data_prediction = data_prediction_of(EPS["network"], timesteps, clip=True)
    drawn = []

    def noise(x):
        drawn.append(torch.randn_like(x))
        return drawn[-1]

    states = list(solver(data_prediction, x_T_of(2), ALPHAS_BAR[timesteps], order, eta=1., noise=noise))
    assert len(drawn) == steps - 1  # none on the last step, to sigma = 0
    assert all(torch.isfinite(x_next).all() for _, _, x_next in states)
    assert states[-1][2].abs().max() <= 1. and torch.equal(states[-1][2], states[-1][1])


@pytest.mark.parametrize("min_snr", [0.1, 1., 10.])
@pytest.mark.parametrize("solver", [dpm_solver_pp, unipc])
def test_eta_min_snr_keeps_the_odes_steps_below_it_and_adds_noise_from_it_on(solver, min_snr):
    """The steps that start at SNR_t < min_snr are the ODE's (the same x as eta = 0, no draw); from
    the first one at SNR_t >= min_snr on, every step but the last draws noise."""
    steps = 20
    timesteps = timesteps_of("logsnr", steps)
    alphas_bar = ALPHAS_BAR[timesteps]
    data_prediction = data_prediction_of(EPS["network"], timesteps)
    snr_at_start = (alphas_bar / (1. - alphas_bar)).flip(0)  # of each step, in the order visited
    quiet = int((snr_at_start < min_snr).sum())
    assert 0 < quiet < steps - 1 and (snr_at_start[:quiet] < min_snr).all()
    drawn = []

    def noise(x):
        drawn.append(torch.randn_like(x))
        return drawn[-1]

    ode = list(solver(data_prediction, x_T_of(), alphas_bar, 2))
    windowed = list(solver(data_prediction, x_T_of(), alphas_bar, 2, eta=5., eta_min_snr=min_snr, noise=noise))
    assert len(drawn) == steps - 1 - quiet
    assert all(torch.equal(a[2], b[2]) for a, b in zip(ode[:quiet], windowed[:quiet]))
    assert not torch.allclose(ode[quiet][2], windowed[quiet][2])
