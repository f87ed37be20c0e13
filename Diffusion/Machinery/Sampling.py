"""The sampler a config asks for, for both models: `sampler_of(config, network)`.

    sampler: "ddpm"  Algorithm 2 (Ho et al. 2020) on all T steps, or on sample_steps of them by
                     respacing the schedule (Nichol & Dhariwal 2021); variance fixedlarge or fixedsmall
             "ddim"  DDIM (Song et al. 2021) on sample_steps steps, stochasticity eta
    skip_type:       which sample_steps of the T timesteps are visited: "uniform" or "quadratic"
"""
import torch

from Diffusion.DDIM import DDIMSampler
from Diffusion.Diffusion import GaussianDiffusionSampler, sampling_timesteps


def steps_of(config):
    """How many network evaluations one sample takes: sample_steps, or T when it is None."""
    return config["T"] if config["sample_steps"] is None else config["sample_steps"]


def timesteps_of(config):
    """The timesteps the configured sampler visits, long [steps_of(config)]."""
    return sampling_timesteps(config["T"], steps_of(config), config["skip_type"])


def sampler_of(config, network):
    """The sampler of config["sampler"] over `network` (the UNet, or the guided estimate of the
    conditional one, under the speed options), on config["device"]:
    `sampler(x_T, *condition) -> x_0`."""
    schedule = (network, config["beta_1"], config["beta_T"], config["T"])
    if config["sampler"] == "ddim":
        sampler = DDIMSampler(*schedule, timesteps=timesteps_of(config), eta=config["eta"],
                              clip_denoised=config["clip_denoised"])
    else:
        sampler = GaussianDiffusionSampler(*schedule, clip_denoised=config["clip_denoised"],
                                           variance=config["variance"], timesteps=timesteps_of(config))
    return sampler.to(torch.device(config["device"]))
