"""The sampler a config asks for, for both models: `sampler_of(config, network)`.

    sampler: "ddpm"         Algorithm 2 (Ho et al. 2020) on all T steps, or on sample_steps of
                            them by respacing the schedule (Nichol & Dhariwal 2021); variance
                            fixedlarge or fixedsmall
             "ddim"         DDIM (Song et al. 2021) on sample_steps steps, stochasticity eta
             "dpmsolver++"  DPM-Solver++ (Lu et al. 2022), multistep, of solver_order; with
                            eta > 0 its stochastic form (SDE-DPM-Solver++ at eta = 1), its
                            noise only where SNR_t >= eta_min_snr
             "unipc"        UniPC (Zhao et al. 2023), predictor-corrector, of solver_order;
                            with eta > 0 on the same SDEs, eta_min_snr likewise
    skip_type:              which sample_steps of the T timesteps are visited: "uniform" or
                            "quadratic" in t, or "logSNR" (uniform in log(alpha_t / sigma_t)),
                            "logSNR_split" (that, half of the steps on each side of eta_min_snr);
                            None: logSNR for the solvers, uniform for the others
sample_steps is the number of network evaluations (NFE) of a sample.
"""
from functools import partial

import torch

from Diffusion.DDIM import DDIMSampler
from Diffusion.Diffusion import GaussianDiffusionSampler
from Diffusion.Schedule import betas_of, logsnr_timesteps, sampling_timesteps
from Diffusion.Solvers import SolverSampler, dpm_solver_pp, unipc

SOLVERS = {"dpmsolver++": dpm_solver_pp, "unipc": unipc}


def steps_of(config):
    """How many network evaluations one sample takes: sample_steps, or T when it is None."""
    return config["T"] if config["sample_steps"] is None else config["sample_steps"]


def skip_type_of(config):
    """config["skip_type"], or when it is None the sampler's own: logSNR for the ODE solvers,
    uniform for DDPM and DDIM."""
    if config["skip_type"] is not None:
        return config["skip_type"]
    return "logSNR" if config["sampler"] in SOLVERS else "uniform"


def timesteps_of(config):
    """The timesteps the configured sampler visits, long [steps_of(config)]. logSNR_split gives
    the ODE below eta_min_snr half of the steps, where uniform log-SNR gives it fewer (8 of 20),
    which scored worse at 10 and 20 NFE (benchmarks/RESULTS.md)."""
    if skip_type_of(config) in ("logSNR", "logSNR_split"):
        betas = betas_of(config["beta_schedule"], config["beta_1"], config["beta_T"], config["T"])
        alphas_bar = torch.cumprod(1. - betas, dim=0)
        split_snr = config["eta_min_snr"] if config["skip_type"] == "logSNR_split" else 0.
        return logsnr_timesteps(alphas_bar, steps_of(config), split_snr)
    return sampling_timesteps(config["T"], steps_of(config), skip_type_of(config))


def solver_of(config):
    """The solver function of config["sampler"], with its noise (eta, eta_min_snr) bound."""
    return partial(SOLVERS[config["sampler"]], eta=config["eta"], eta_min_snr=config["eta_min_snr"])


def sampler_of(config, network):
    """The sampler of config["sampler"] over `network` (the UNet, or the guided estimate of the
    conditional one, under the speed options), on config["device"]:
    `sampler(x_T, *condition) -> x_0`."""
    schedule = (network, config["beta_1"], config["beta_T"], config["T"])
    options = {"timesteps": timesteps_of(config), "clip_denoised": config["clip_denoised"],
               "beta_schedule": config["beta_schedule"], "prediction": config["prediction"]}
    if config["sampler"] == "ddim":
        sampler = DDIMSampler(*schedule, eta=config["eta"], **options)
    elif config["sampler"] in SOLVERS:
        sampler = SolverSampler(*schedule, solver_of(config), order=config["solver_order"], **options)
    else:
        sampler = GaussianDiffusionSampler(*schedule, variance=config["variance"], **options)
    return sampler.to(torch.device(config["device"]))
