"""The sampler a config asks for, for both models: `sampler_of(config, model, w=None)`.

    sampler: "ddpm"  Algorithm 2 (Ho et al. 2020) on all T steps, or on sample_steps of them by
                     respacing the schedule (Nichol & Dhariwal 2021); variance fixedlarge or fixedsmall
             "ddim"  DDIM (Song et al. 2021) on sample_steps steps, stochasticity eta
    skip_type:       which sample_steps of the T timesteps are visited: "uniform" or "quadratic"

Every sampler evaluates the network in its `noise_estimate` only; with a guidance weight w the
network there is the guided estimate of DiffusionFreeGuidence, and with the speed options (amp,
compile, channels_last) the network runs under them, returning float32 (Speed.ForSampling).
"""
import torch

from Diffusion.DDIM import DDIMSampler
from Diffusion.Diffusion import GaussianDiffusionSampler, sampling_timesteps
from Diffusion.Speed import for_sampling
from DiffusionFreeGuidence.DiffusionCondition import ClassifierFreeGuidance

SAMPLERS = ("ddpm", "ddim")


def steps_of(config):
    """How many network evaluations one sample takes: sample_steps, or T when it is None."""
    return config["T"] if config["sample_steps"] is None else config["sample_steps"]


def timesteps_of(config):
    """The timesteps the configured sampler visits, long [steps_of(config)]."""
    return sampling_timesteps(config["T"], steps_of(config), config["skip_type"])


def sampler_of(config, model, w=None):
    """The sampler of config["sampler"] for `model` (guided by w when w is given; the model then
    takes labels), on config["device"]: `sampler(x_T, *condition) -> x_0`."""
    model = for_sampling(model, config)  # amp, compile, channels_last
    network = model if w is None else ClassifierFreeGuidance(model, w)
    schedule = (network, config["beta_1"], config["beta_T"], config["T"])
    if config["sampler"] == "ddim":
        sampler = DDIMSampler(*schedule, timesteps=timesteps_of(config), eta=config["eta"],
                              clip_denoised=config["clip_denoised"])
    else:
        sampler = GaussianDiffusionSampler(*schedule, clip_denoised=config["clip_denoised"],
                                           variance=config["variance"], timesteps=timesteps_of(config))
    return sampler.to(torch.device(config["device"]))
