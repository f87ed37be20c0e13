"""Fast ODE samplers for a model trained by Algorithm 1: DPM-Solver++ (Lu et al. 2022,
arXiv:2211.01095) and UniPC (Zhao et al. 2023, arXiv:2302.04867), both multistep and both in the
data prediction x_0 = (x_t - sigma_t eps_theta(x_t, t)) / alpha_t.

The noise schedule, as in Lu et al.'s dpm_solver_pytorch.py, at the S visited timesteps:

    alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t),  lambda_t = log(alpha_t / sigma_t)

In lambda the probability-flow ODE is linear in x but for the model, and a step from t to t_next
(h = lambda_next - lambda_t > 0) solves it exactly but for the integral of x_0 (DPM-Solver++,
Prop. 4.1):

    x_next = (sigma_next / sigma_t) x_t + sigma_next int_{lambda_t}^{lambda_next} e^lambda x_0(lambda) d lambda

The solvers differ in the polynomial in lambda that stands for x_0 under the integral: the
present x_0 alone is DDIM (first order), one through the x_0 of the last k steps a k-step method
(of order k, but see DPM-Solver++(3M); UniPC's corrector adds one), one network evaluation (NFE)
per step. The last step, from tau_0 to the data (alpha = 1, sigma = 0,
lambda = +inf, diffusers' final_sigmas_type="zero"), is first order: e^{-h} = 0 there and it
returns the x_0 predicted at tau_0. Both also solve, with eta > 0, the reverse SDEs of the
same marginals (Karras et al. 2022, Eq. 6, in lambda), their noise optionally only near the data
(eta_min_snr).

Both samplers are generators that the caller drives; every tensor is [B, C, H, W] in x's dtype,
every coefficient is computed in float64 and cast when used (0-dim tensors, which torch applies
to x on any device without a copy, so alphas_bar may stay on the CPU).

`SolverSampler` runs either of them as a Sampler of Diffusion.py over the visited timesteps, so
both models, the guided estimate, the speed options, the process picture and the export take
them as they take DDIM.
"""
import math

import torch

from Diffusion.Diffusion import Sampler


def _schedule(alphas_bar):
    """alpha_t, sigma_t, lambda_t, float64 [S + 1], at the points in the order the steps visit
    them: positions S-1 .. 0 of alphas_bar [S], then the data (1, 0, +inf)."""
    abar = torch.cat([alphas_bar.double().flip(0), alphas_bar.new_ones(1, dtype=torch.float64)])
    alpha_t, sigma_t = abar.sqrt(), (1. - abar).sqrt()
    return alpha_t, sigma_t, alpha_t.log() - sigma_t.log()


def _cast(coefficient, x):
    """A float64 coefficient (0-dim) cast to x's dtype."""
    return coefficient.to(x.dtype)


# DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), multistep, data prediction; with eta > 0 its
# stochastic form (SDE-DPM-Solver++, diffusers' algorithm_type="sde-dpmsolver++" at eta = 1).

def dpm_solver_pp(data_prediction, x, alphas_bar, order=2, eta=0., eta_min_snr=0., noise=torch.randn_like):
    """DPM-Solver++(kM), k = `order` in 1..3: S steps of one NFE each from x = x_T at position
    S-1 of alphas_bar (float64 [S], abar at tau_0 < .. < tau_{S-1}) to the data.

    data_prediction(x, index) -> x_0 at visited position `index` (S-1 first, 0 last).
    eta >= 0: 0 solves the probability-flow ODE; eta > 0 a reverse SDE of the same marginals
    that adds noise(x) ~ N(0, I) at each step (see _dpm_solver_pp_step); eta = 1 is the reverse
    SDE of the forward process, whose first-order step is DDPM's posterior step. eta_min_snr > 0
    keeps the ODE (eta 0) on the steps that start at SNR_t = alpha_t^2 / sigma_t^2 < eta_min_snr.
    Yields (x_t, x_0, x_next) per step, x_0 predicted from x_t; the last x_next is the sample."""
    schedule, steps = _schedule(alphas_bar), len(alphas_bar)
    step_etas = _step_etas(schedule, eta, eta_min_snr)
    history = []  # (i, x_0) of the last `order` points, the latest last
    for i, step_eta in enumerate(step_etas):
        x_0 = data_prediction(x, steps - 1 - i)
        history = (history + [(i, x_0)])[-order:]
        x_next = (_dpm_solver_pp_step(x, history[-_dpm_solver_pp_order(order, i, steps):], schedule, step_eta)
                  + _step_noise(schedule, i, step_eta, steps, x, noise))
        yield x, x_0, x_next
        x = x_next


def _step_etas(schedule, eta, min_snr):
    """The eta of each of the S steps (Python floats, read before the loop): eta where the step
    starts at SNR_t = e^{2 lambda_t} >= min_snr, 0 before."""
    _, _, lambda_t = schedule
    return [eta if math.exp(2. * start) >= min_snr else 0. for start in lambda_t[:-1].tolist()]


def _dpm_solver_pp_order(order, i, steps):
    """The order of step i of `steps`: min(k, i + 1) while the history fills up, 1 on the last
    step and at most 2 on the one before when steps < 15, as diffusers'
    DPMSolverMultistepScheduler(lower_order_final=True, final_sigmas_type="zero")."""
    if i == steps - 1:
        return 1
    if i == steps - 2 and steps < 15:
        return min(order, i + 1, 2)
    return min(order, i + 1)


def _dpm_solver_pp_step(x, points, schedule, eta=0.):
    """One step from point i (the last of `points`, (i, x_0) each) to i + 1, of the order
    len(points), without its noise. With H = (1 + eta) h, phi_1 = e^{-H} - 1, phi_2 = phi_1 / H + 1,
    phi_3 = phi_2 / H - 1/2, x_0' and x_0'' the x_0 of the two points before, r_0 = h_0 / h and
    r_1 = h_1 / h (h_0, h_1 the two steps before, in lambda), and the decay e^{-eta h}:

    1 (DDIM):      x_next = (sigma_next / sigma_t) e^{-eta h} x_t - alpha_next phi_1 x_0
    2M (Alg. 2):   D = (1 + 1 / (2 r_0)) x_0 - 1 / (2 r_0) x_0'
                   x_next = (sigma_next / sigma_t) e^{-eta h} x_t - alpha_next phi_1 D
    3M:            D1_0 = (x_0 - x_0') / r_0,  D1_1 = (x_0' - x_0'') / r_1
                   D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r_0 + r_1)
                   x_next = (sigma_next / sigma_t) e^{-eta h} x_t - alpha_next (phi_1 x_0 - phi_2 D1 + phi_3 D2)

    At eta = 0 these are the paper's. With eta > 0 the step solves the reverse SDE
    dx = [(dlog sigma / dlambda - eta) x + (1 + eta) alpha x_0(x)] dlambda + sigma sqrt(2 eta) dw
    (w a Wiener process in lambda; at every eta the forward process's marginals), whose exact
    step is x_next = (sigma_next / sigma_t) e^{-eta h} x_t + alpha_next int_0^h (1 + eta)
    e^{-(1 + eta)(h - u)} x_0(lambda_t + u) du + sigma_next sqrt(1 - e^{-2 eta h}) z: the integral
    weighs x_0 by the ODE's kernel with h stretched to H, so each order's terms are the ODE's phi
    functions at H (with r_0, r_1 and the D's unchanged). At eta = 1 orders 1 and 2 are diffusers'
    "sde-dpmsolver++" (midpoint). Its order 3 weighs D2 by alpha_next (phi_3 + 1), not by the
    expansion's alpha_next phi_3: a weight of O(1) on a term of O(h^2), where phi_3 is O(h);
    this one keeps the ODE's 3M form at H. The larger eta, the nearer lambda_next the kernel's
    weight: the step extrapolates x_0 through the past steps, whose x_0 carry their noise; 3M
    does it quadratically, which ruins the samples above eta = 1 (refused there by the checks).

    3M is not in the paper; it is Lu et al.'s multistep_dpm_solver_third_update (and diffusers',
    k-diffusion's), the Taylor expansion of Prop. 4.1 with D1 ~ h x_0' and D2 ~ h^2 x_0''/2 from
    divided differences. There the D2 term has phi_3 where the expansion has 2 phi_3: the step is
    exact for x_0 linear in lambda but not quadratic, so 3M converges at second order (with a
    smaller error than 2M; tests/test_solvers.py measures it). It is kept as published, to give
    the samples of those implementations."""
    alpha_t, _, lambda_t = schedule
    i, x_0 = points[-1]
    x_next, h, stretched = _linear_part(x, i, i + 1, schedule, eta)
    phi_1 = torch.expm1(-stretched)
    if len(points) == 1:
        return x_next - _cast(alpha_t[i + 1] * phi_1, x) * x_0
    x_0_1 = points[-2][1]
    r_0 = (lambda_t[i] - lambda_t[i - 1]) / h
    if len(points) == 2:
        return x_next - _cast(alpha_t[i + 1] * phi_1, x) * (x_0 + _cast(0.5 / r_0, x) * (x_0 - x_0_1))
    x_0_2 = points[-3][1]
    r_1 = (lambda_t[i - 1] - lambda_t[i - 2]) / h
    d1_0, d1_1 = _cast(1. / r_0, x) * (x_0 - x_0_1), _cast(1. / r_1, x) * (x_0_1 - x_0_2)
    d1 = d1_0 + _cast(r_0 / (r_0 + r_1), x) * (d1_0 - d1_1)
    d2 = _cast(1. / (r_0 + r_1), x) * (d1_0 - d1_1)
    phi_2 = phi_1 / stretched + 1.
    phi_3 = phi_2 / stretched - 0.5
    return x_next - _cast(alpha_t[i + 1], x) * (_cast(phi_1, x) * x_0 - _cast(phi_2, x) * d1 + _cast(phi_3, x) * d2)


def _linear_part(x, s, target, schedule, eta):
    """The part of a step from point s to `target` that is linear in x_s, with the step's length
    in lambda and its length stretched by the noise: ((sigma_target / sigma_s) e^{-eta h} x_s, h,
    H = (1 + eta) h). At eta = 0 there is no decay, since e^{-0 * inf} is undefined on the last
    step, where h = inf."""
    _, sigma_t, lambda_t = schedule
    h = lambda_t[target] - lambda_t[s]
    decay = torch.exp(-eta * h) if eta > 0 else 1.
    return _cast(sigma_t[target] / sigma_t[s] * decay, x) * x, h, (1. + eta) * h


def _step_noise(schedule, i, eta, steps, x, noise):
    """The noise that step i of `steps` adds, noise(x) ~ N(0, I) scaled by _noise_scale; 0 at
    eta = 0 and on the last step, to the data."""
    if eta == 0 or i == steps - 1:
        return 0.
    return _cast(_noise_scale(schedule, i, eta), x) * noise(x)


def _noise_scale(schedule, i, eta):
    """sigma_next sqrt(1 - e^{-2 eta h}), the standard deviation of the noise of step i (0-dim
    float64): what keeps x_next's marginal that of the forward process."""
    _, sigma_t, lambda_t = schedule
    return sigma_t[i + 1] * (-torch.expm1(-2. * eta * (lambda_t[i + 1] - lambda_t[i]))).sqrt()


# UniPC (Zhao et al. 2023, arXiv:2302.04867), B(h) = e^h - 1 ("bh2"), data prediction; with eta > 0
# on the reverse SDEs of dpm_solver_pp, its corrector re-using the predictor's noise, as the
# stochastic predictor-corrector of SA-Solver (Xue et al. 2023, arXiv:2309.05019) does.

def unipc(data_prediction, x, alphas_bar, order=2, eta=0., eta_min_snr=0., noise=torch.randn_like):
    """UniPC-p, p = `order` in 1..3: S steps of one NFE each from x = x_T at position S-1 of
    alphas_bar (float64 [S], abar at tau_0 < .. < tau_{S-1}) to the data.

    data_prediction(x, index) -> x_0 at visited position `index` (S-1 first, 0 last).
    Yields (x_t, x_0, x_next) per step: x_t is the point the model is evaluated at (the last
    step's x_next), x_0 is predicted from it, and x_next is the predictor's result for the
    next point.

    Each step first corrects x_t by UniC (Sec. 3.1), with the new x_0 and the step that led to
    x_t, at that step's order (no extra NFE; not on the first step), then predicts x_next by UniP
    (Sec. 3.2) from the corrected x_t. The predictor's order is min(p, steps taken + 1, steps
    left), as diffusers' UniPCMultistepScheduler(lower_order_final=True): 1 on the last step,
    at most 2 on the one before. Where the corrector acts, the scheme is of order p + 1
    (Theorem 3.1); the last prediction is not corrected, since no evaluation follows it.

    eta and eta_min_snr as in dpm_solver_pp: each step of eta > 0 solves that reverse SDE (the
    ODE's update at (1 + eta) h, see _unified_update) and adds the noise of _noise_scale; the
    corrector redoes the step with the same noise, so only the x_0 polynomial changes."""
    schedule, steps = _schedule(alphas_bar), len(alphas_bar)
    step_etas = _step_etas(schedule, eta, eta_min_snr)
    history = []  # (i, x_0) of the last `order` points, the latest last
    x_previous, step_order, step_noise = None, 0, 0.  # the last step's start (corrected), order and noise
    for i, step_eta in enumerate(step_etas):
        x_0 = data_prediction(x, steps - 1 - i)
        x_t = x
        if i > 0:  # UniC: the last step again, with this x_0 as its newest point (r = 1)
            others = history[-step_order:-1] + [(i, x_0)]
            x = _unified_update(x_previous, history[-1], others, i, schedule, step_etas[i - 1]) + step_noise
        history = (history + [(i, x_0)])[-order:]
        step_order = min(order, i + 1, steps - i)
        step_noise = _step_noise(schedule, i, step_eta, steps, x, noise)
        x_next = _unified_update(x, history[-1], history[-step_order:-1], i + 1, schedule, step_eta) + step_noise
        yield x_t, x_0, x_next
        x_previous, x = x, x_next


def _unified_update(x, base, others, target, schedule, eta=0.):
    """UniP and UniC in one form: from point s (base = (s, x_0)) to point `target`, with the
    x_0 of `others` ((m, x_0_m) each; earlier points for UniP-p, p - 1 of them; for UniC-p the
    p - 1 earlier points and then the target itself). In data prediction the step in the
    paper's h is -h, so B(h) = e^{-h} - 1 = phi_1 here, and with r_m = (lambda_m - lambda_s) / h,
    D_m = (x_0_m - x_0) / r_m:

        x_next = (sigma_next / sigma_s) x_s - alpha_next (e^{-h} - 1) (x_0 + sum_m rho_m D_m)

    rho solves R rho = g / B(h) (Theorem 3.1, see `_unipc_rho`). UniP-2 (rho = 1/2, r = -r_0)
    is DPM-Solver++(2M).

    With eta > 0 the step is the reverse SDE's of _dpm_solver_pp_step without its noise: x_s
    decays by e^{-eta h} more, and h becomes H = (1 + eta) h in B and rho (the r_m unchanged).
    UniC-1 then takes the exact rho = g_1 / B(H) for its one point, the new x_0, not the 1/2
    that is its limit as H -> 0: at a large H the kernel weighs x_0 near the new point (rho
    0.82 at H = 5.5), and 1/2 would give the new x_0 too little weight. UniP-2 keeps 1/2: with
    the exact rho it extrapolates x_0 further through the past, noisy steps, which scored FID
    1.77 against 1.18 (benchmarks/RESULTS.md)."""
    alpha_t, _, lambda_t = schedule
    s, x_0 = base
    x_next, h, stretched = _linear_part(x, s, target, schedule, eta)
    x_0_combined = x_0
    if others:
        r = torch.stack([(lambda_t[m] - lambda_t[s]) / h for m, _ in others])
        rho = _unipc_rho(stretched, r, exact=eta > 0 and others[-1][0] == target)
        for (_, x_0_m), rho_m, r_m in zip(others, rho, r):
            x_0_combined = x_0_combined + _cast(rho_m / r_m, x) * (x_0_m - x_0)
    return x_next - _cast(alpha_t[target] * torch.expm1(-stretched), x) * x_0_combined


def _unipc_rho(h, r, exact=False):
    """rho [n] for the points at r [n]: the solution of the Vandermonde system R rho = g / B(h),
    R_{k m} = r_m^k (k = 0 .. n-1), g_k = k! (-h) phi_{k+1}(-h) (k = 1 .. n), B(h) = e^{-h} - 1.
    For n = 1 (UniP-2, UniC-1) rho = 1/2 unless `exact`, the system's limit as h -> 0, of the
    same order and what the authors' code and diffusers use."""
    n = len(r)
    if n == 1 and not exact:
        return torch.full((1,), 0.5, dtype=torch.float64, device=h.device)
    hh = -h
    b_h = torch.expm1(hh)
    h_phi = b_h / hh - 1.  # (-h) phi_2(-h)
    g, factorial = [], 1.
    for k in range(1, n + 1):
        g.append(h_phi * factorial)
        factorial *= k + 1
        h_phi = h_phi / hh - 1. / factorial  # (-h) phi_{k+2}(-h)
    vandermonde = torch.stack([r ** k for k in range(n)])
    return torch.linalg.solve_ex(vandermonde, torch.stack(g) / b_h).result


class SolverSampler(Sampler):
    """`solver` (dpm_solver_pp or unipc) of `order` over `timesteps` (see
    Diffusion.sampling_timesteps and logsnr_timesteps): one network evaluation per visited
    timestep, through Sampler.denoise (so clip_denoised clips each predicted x_0). logsnr_timesteps
    (Schedule.py) spaces them as Lu et al. do for low-resolution images."""

    def __init__(self, model, beta_1, beta_T, T, solver, timesteps=None, order=2, clip_denoised=False,
                 **diffusion):
        super().__init__(model, beta_1, beta_T, T, timesteps, clip_denoised, **diffusion)
        self.solver, self.order = solver, order
        self.solver_alphas_bar = self.alphas_bar.clone()  # not a buffer: stays on the CPU

    def reverse_steps(self, x_T, *condition, start=None):
        """The solver from position `start` of `timesteps` (None: the last), x_T its x_t."""
        def data_prediction(x, index):
            i = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
            return self.denoise(x, i, *condition)[1]
        return self.solver(data_prediction, x_T, self.solver_alphas_bar[:self.positions(start)], self.order)
