"""Sampling beyond Algorithm 2: respacing, the posterior variance, DDIM (Song et al. 2021) and its
inversion, guided DDIM, and sampler_of, against hand computations with known eps_theta."""
import os

import pytest
import torch
from torch import nn

from PIL import Image

import Main
from conftest import as_arguments, defaults_of, run_or_fail
from Diffusion.Run.Config import ConfigError
from Diffusion.DDIM import DDIMSampler
from Diffusion.Diffusion import GaussianDiffusionSampler, linear_betas, sampling_timesteps
from Diffusion.Run.Sampling import sampler_of
from Diffusion.Diffusion import eps_and_x0
from Diffusion.Schedule import logsnr_timesteps
from Diffusion.Solvers import SolverSampler, dpm_solver_pp, unipc
from DiffusionFreeGuidence import ModelCondition
from DiffusionFreeGuidence.DiffusionCondition import ClassifierFreeGuidance
from test_diffusion import BETA_1, BETA_T, KnownEps, schedule


class GaussianDataEps(nn.Module):
    """The exact eps_theta for data x_0 ~ N(0, s^2 I): E[eps | x_t] =
    sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t). A well-behaved model, smooth in x_t and t."""

    def __init__(self, T, s=0.3):
        super().__init__()
        self.alphas_bar = torch.cumprod(1. - linear_betas(BETA_1, BETA_T, T), dim=0)
        self.s = s

    def forward(self, x_t, t):
        a = self.alphas_bar[t].float().view(-1, 1, 1, 1)
        return (1. - a).sqrt() * x_t / (a * self.s ** 2 + 1. - a)


def config_of(**changes):
    return {**defaults_of("Main"), "T": 10, "device": "cpu", **changes}


# --- the timesteps visited ----------------------------------------------------------------


def test_uniform_steps_are_every_T_over_S_th_from_0():
    assert sampling_timesteps(1000, 10, "uniform").tolist() == list(range(0, 1000, 100))
    assert sampling_timesteps(1000, 100, "uniform").tolist() == list(range(0, 1000, 10))
    assert sampling_timesteps(10, 10, "uniform").tolist() == list(range(10))
    assert sampling_timesteps(10, 4, "uniform").tolist() == [0, 2, 5, 7]  # floor(i * 10 / 4)


def test_quadratic_steps_are_those_of_the_ddim_paper():
    # floor((i * sqrt(0.8 T) / (S - 1))^2), i = 0..S-1
    assert sampling_timesteps(1000, 10, "quadratic").tolist() == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]


def test_quadratic_steps_never_repeat_a_timestep():
    steps = sampling_timesteps(1000, 100, "quadratic")  # floor(c i^2) alone repeats 0 four times
    assert len(steps) == 100 and steps[-1] == 800
    assert (steps.diff() > 0).all()
    assert steps[:5].tolist() == [0, 1, 2, 3, 4]
    assert sampling_timesteps(10, 10, "quadratic").tolist() == list(range(10))


# --- respaced Algorithm 2 and the posterior variance --------------------------------------


def test_every_step_keeps_the_original_betas_to_the_last_bit():
    sampler = GaussianDiffusionSampler(None, BETA_1, BETA_T, 1000, timesteps=sampling_timesteps(1000, 1000))
    assert torch.equal(sampler.betas, linear_betas(BETA_1, BETA_T, 1000))


def test_respaced_schedule_keeps_alphas_bar_at_the_visited_steps():
    T, timesteps = 20, sampling_timesteps(20, 5)
    sampler = GaussianDiffusionSampler(None, BETA_1, BETA_T, T, timesteps=timesteps)
    _, _, alphas_bar = schedule(T)
    torch.testing.assert_close(sampler.alphas_bar, alphas_bar[timesteps], rtol=1e-6, atol=0)
    torch.testing.assert_close(sampler.coeff1, (1. / (1. - sampler.betas)).sqrt())


def test_respaced_sampler_calls_the_model_at_the_visited_timesteps_last_first():
    model = KnownEps()
    sampler = GaussianDiffusionSampler(model, BETA_1, BETA_T, 100, timesteps=sampling_timesteps(100, 5))
    sampler(torch.randn(2, 3, 4, 4), progress=False)
    assert [t.tolist() for t in model.seen_t] == [[80, 80], [60, 60], [40, 40], [20, 20], [0, 0]]


def test_fixedsmall_variance_is_the_posterior_variance():
    T = 10
    sampler = GaussianDiffusionSampler(None, BETA_1, BETA_T, T, variance="fixedsmall")
    betas, _, alphas_bar = schedule(T)
    alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
    posterior_var = betas * (1 - alphas_bar_prev) / (1 - alphas_bar)
    torch.testing.assert_close(sampler.sample_var[1:], posterior_var[1:], rtol=1e-6, atol=0)
    # The first step adds no noise; its entry, the likelihood's decoder variance, is the second's.
    torch.testing.assert_close(sampler.sample_var[0], posterior_var[1], rtol=1e-6, atol=0)


# --- DDIM -----------------------------------------------------------------------------------


def test_ddim_with_eta_1_and_every_step_follows_the_ddpm_posterior():
    T = 10
    model = KnownEps(scale=0.3, shift=0.02)
    ddpm = GaussianDiffusionSampler(model, BETA_1, BETA_T, T, variance="fixedsmall")
    ddim = DDIMSampler(model, BETA_1, BETA_T, T, eta=1.)
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.2
    i = torch.full((3,), 6)
    eps = model.eps(x_T, ddpm.timesteps[i])

    mean, var = ddpm.p_mean_variance(x_T, i)
    _, x_0 = eps_and_x0("eps", eps, x_T, ddim.sqrt_alphas_bar[6].float(), ddim.sqrt_one_minus_alphas_bar[6].float())
    ddim_mean = (ddim.sqrt_alphas_bar_prev[6] * x_0
                 + ddim.direction_coef[6] * eps).float()
    torch.testing.assert_close(ddim_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddim.sigmas[1:] ** 2, ddpm.sample_var[1:], rtol=1e-10, atol=1e-30)

    torch.manual_seed(7)
    by_ddpm = ddpm(x_T, progress=False)
    torch.manual_seed(7)  # the same z, drawn in the same order
    by_ddim = ddim(x_T, progress=False)
    assert by_ddpm.abs().max() < 1  # so clipping does not hide a difference
    torch.testing.assert_close(by_ddim, by_ddpm, rtol=1e-4, atol=1e-5)


def test_ddim_with_eta_0_is_deterministic_given_x_T():
    model = GaussianDataEps(100)
    ddim = DDIMSampler(model, BETA_1, BETA_T, 100, timesteps=sampling_timesteps(100, 20), eta=0.)
    x_T = torch.randn(2, 3, 4, 4)
    torch.manual_seed(1)
    first = ddim(x_T, progress=False)
    torch.manual_seed(2)
    assert torch.equal(ddim(x_T, progress=False), first)
    assert not torch.equal(ddim(torch.randn(2, 3, 4, 4), progress=False), first)


def test_ddim_step_is_equation_12_by_hand():
    T = 100
    model = KnownEps(scale=0.3, shift=0.001)
    timesteps = sampling_timesteps(T, 10)
    ddim = DDIMSampler(model, BETA_1, BETA_T, T, timesteps=timesteps, eta=0.5)
    _, _, alphas_bar = schedule(T)
    x_t, i = torch.randn(2, 3, 4, 4), torch.full((2,), 4)
    a, a_prev = alphas_bar[40], alphas_bar[30]
    eps = model.eps(x_t, torch.full((2,), 40)).double()
    x_0 = (x_t.double() - (1 - a).sqrt() * eps) / a.sqrt()
    sigma = 0.5 * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
    expected = a_prev.sqrt() * x_0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    torch.manual_seed(3)
    got, got_x_0 = ddim.step(x_t, i, last=False)
    torch.manual_seed(3)
    expected = expected + sigma * torch.randn_like(x_t).double()
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x_0, x_0.float(), rtol=1e-5, atol=1e-5)


def test_ddim_inverts_its_samples_back_close_to_x_T():
    T = 1000
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (50, 100):
        ddim = DDIMSampler(GaussianDataEps(T, s=0.25), BETA_1, BETA_T, T, timesteps=sampling_timesteps(T, steps))
        x_0 = ddim(x_T, progress=False)
        assert x_0.abs().max() < 1  # not clipped, so the ODE can be run back
        errors[steps] = ((ddim.encode(x_0, progress=False) - x_T).norm() / x_T.norm()).item()
    # relative to |x_T|; another x_T would be ~1.4 away. The steps are first-order: the error
    # halves with twice the steps.
    assert errors[100] < 0.1 and errors[50] < 0.2
    assert errors[100] < 0.7 * errors[50]


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "unipc"])
def test_guided_samplers_use_the_guided_estimate(sampler):
    torch.manual_seed(0)
    model = ModelCondition.UNet(T=10, num_labels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, dropout=0.).eval()
    w = 2.

    class TwoPasses(nn.Module):  # the guided estimate of Ho & Salimans Eq. 6, computed by hand
        def forward(self, x_t, t, labels):
            return (1 + w) * model(x_t, t, labels) - w * model(x_t, t, torch.zeros_like(labels))

    config = config_of(sampler=sampler, sample_steps=5, eta=0.)
    x_T, labels = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    guided = sampler_of(config, ClassifierFreeGuidance(model, w))
    by_hand = sampler_of(config, TwoPasses())
    expected = by_hand(x_T, labels, progress=False)
    torch.testing.assert_close(guided(x_T, labels, progress=False), expected, rtol=1e-4, atol=1e-5)
    unguided = sampler_of(config, ClassifierFreeGuidance(model, 0.))(x_T, labels, progress=False)
    assert (unguided - expected).abs().max() > 1e-3


# --- sampler_of -------------------------------------------------------------------------


@pytest.mark.parametrize("changes, kind, steps", [
    ({}, GaussianDiffusionSampler, list(range(10))),
    ({"sample_steps": 5}, GaussianDiffusionSampler, [0, 2, 4, 6, 8]),
    ({"sampler": "ddim", "sample_steps": 4, "skip_type": "quadratic"}, DDIMSampler, [0, 1, 3, 8]),
])
def test_sampler_of_builds_the_configured_sampler(changes, kind, steps):
    sampler = sampler_of(config_of(**changes), KnownEps())
    assert type(sampler) is kind
    assert sampler.timesteps.tolist() == steps


@pytest.mark.parametrize("sampler, solver", [("dpmsolver++", dpm_solver_pp), ("unipc", unipc)])
def test_sampler_of_runs_the_solvers_through_the_samplers_denoise(sampler, solver):
    """The solver as sampler_of builds it: logSNR timesteps unless skip_type says otherwise, its
    order, and the same sample as the solver's function given the model's x_0 by hand."""
    config = config_of(T=1000, sampler=sampler, sample_steps=10, solver_order=3)
    built = sampler_of(config, KnownEps(scale=0.3))
    alphas_bar = torch.cumprod(1. - linear_betas(BETA_1, BETA_T, 1000), dim=0)
    assert isinstance(built, SolverSampler) and built.order == 3
    assert torch.equal(built.timesteps, logsnr_timesteps(alphas_bar, 10))
    assert sampler_of({**config, "skip_type": "uniform"}, KnownEps()).timesteps.tolist() == list(range(0, 1000, 100))
    windowed = {**config, "solver_order": 2, "eta": 10., "eta_min_snr": 0.1}
    assert torch.equal(sampler_of(windowed, KnownEps()).timesteps, logsnr_timesteps(alphas_bar, 10))
    assert torch.equal(sampler_of({**windowed, "skip_type": "logSNR_split"}, KnownEps()).timesteps,
                       logsnr_timesteps(alphas_bar, 10, 0.1))  # half of the steps below SNR 0.1

    def data_prediction(x, index):
        t = built.timesteps[index].expand(x.shape[0])
        a = alphas_bar[t].float().view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * KnownEps(scale=0.3).eps(x, t)) / a.sqrt()

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    *_, (_, _, by_hand) = solver(data_prediction, x_T, alphas_bar[built.timesteps], 3)
    torch.testing.assert_close(built(x_T, progress=False), by_hand.clip(-1., 1.), rtol=1e-5, atol=1e-6)


def test_sampler_of_passes_variance_eta_and_clipping():
    ddpm = sampler_of(config_of(variance="fixedsmall", clip_denoised=True), KnownEps())
    assert ddpm.clip_denoised and torch.equal(ddpm.sample_var[1:], ddpm.betas[1:] * (1 - ddpm.alphas_bar_prev[1:])
                                              / (1 - ddpm.alphas_bar[1:]))  # the posterior variance
    ddim = sampler_of(config_of(sampler="ddim", eta=0.5), KnownEps())
    assert ddim.eta == 0.5 and ddim.sigmas[1:].min() > 0
    x_T = torch.randn(2, 3, 4, 4)
    for name in ("dpmsolver++", "unipc"):
        for eta, different in ((0., False), (1., True)):  # the ODE, or fresh noise at every step
            solver = sampler_of(config_of(sampler=name, sample_steps=5, eta=eta), KnownEps(scale=0.3))
            assert (torch.equal(solver(x_T, progress=False), solver(x_T, progress=False))) != different


# --- the new keys' checks -------------------------------------------------------------------


@pytest.mark.parametrize("changes, says", [
    ({"sample_steps": 0}, "sample_steps"), ({"sample_steps": 11}, "T = 10"),
    ({"eta": 1.5}, "eta"), ({"eta": -0.1}, "eta"),
    ({"eta": 0.5}, "--sampler unipc --eta 0.5"), ({"eta": 1.}, "not to sampler ddpm"),
    ({"sampler": "ddim", "eta": 2.}, "eta of ddim"), ({"sampler": "dpmsolver++", "eta": float("inf")}, "eta"),
    ({"sampler": "dpmsolver++", "eta": 5., "eta_min_snr": -1.}, "eta_min_snr"),
    ({"sampler": "dpmsolver++", "eta": 5., "solver_order": 3}, "--solver_order 2"),
    ({"sampler": "unipc", "eta": 5., "solver_order": 3}, "--solver_order 2"),
    ({"sampler": "unipc", "skip_type": "logSNR_split"}, "skip_type logSNR_split"),
    ({"sampler": "ddim", "eta": 1., "skip_type": "logSNR_split"}, "skip_type logSNR_split"),
    ({"sampler": "dpmsolver++", "eta_min_snr": 1.}, "with eta 0.0"), ({"sampler": "ddim", "eta": 1., "eta_min_snr": 1.}, "ddim"),
    ({"process_frames": 1}, "process_frames"), ({"process_frames": -2}, "process_frames"),
    ({"num_samples": -1}, "num_samples"), ({"sampledProcessGifName": "process.png"}, ".gif"),
    ({"sampledProcessImgName": "process"}, "sampledProcessImgName"),
    ({"state": "fid", "num_samples": 0}, "num_samples"),
    ({"sampler": "euler"}, "'sampler'"), ({"skip_type": "cubic"}, "'skip_type'"),
    ({"variance": "fixedmedium"}, "'variance'"),
])
def test_out_of_range_sampling_keys_are_refused_before_any_work(tiny_config, changes, says):
    with pytest.raises(ConfigError) as error:
        Main.main({**tiny_config, "T": 10, "state": "eval", **changes})
    assert says in str(error.value)
    assert not os.path.exists(tiny_config["sampled_dir"])


# --- the solvers from the command line -------------------------------------------------------


@pytest.mark.parametrize("script, sampler, noise", [("Main.py", "dpmsolver++", {}), ("MainCondition.py", "unipc", {}),
                                                    ("MainCondition.py", "dpmsolver++", {"eta": 5., "eta_min_snr": 1.}),
                                                    ("Main.py", "unipc", {"eta": 10., "eta_min_snr": 0.1})])
def test_eval_with_a_solver_writes_the_grids_the_process_and_its_gif(script, sampler, noise, trained_unconditional,
                                                                      trained_conditional, tmp_path):
    trained = trained_unconditional if script == "Main.py" else trained_conditional
    config = {**trained, "state": "eval", "test_load_weight": "ckpt_0_.pt", "batch_size": 6, "sampler": sampler,
              "sample_steps": 5, **noise, "process_frames": 6, "sampled_dir": tmp_path / "samples"}
    process = run_or_fail(script, *as_arguments(config), cwd=tmp_path)
    for key in ("sampledNoisyImgName", "sampledImgName", "sampledProcessImgName", "sampledProcessGifName"):
        assert (tmp_path / "samples" / config[key]).is_file(), key
    with Image.open(tmp_path / "samples" / config["sampledProcessGifName"]) as gif:
        assert gif.n_frames == 6  # x_T and the 5 steps
    assert "Traceback" not in process.stderr
