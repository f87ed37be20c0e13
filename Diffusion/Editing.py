"""Editing given images with a trained DDPM, without further training: inpainting by RePaint
(Lugmayr et al., CVPR 2022, arXiv:2201.09865) and image-to-image editing by SDEdit (Meng et al.,
ICLR 2022, arXiv:2108.01073). Both drive a sampler of Diffusion.py, DDIM.py or Solvers.py through
its own reverse steps, so that a respaced schedule, the guided estimate of a conditional model
(its labels passed as `condition`) and whatever variance the sampler uses work unchanged.

Positions are those of the sampler's `timesteps` (tau_0 < .. < tau_{S-1}, all T steps by default):
x at position p is x_{tau_p}, the network's input at timestep tau_p, and position -1 is the data
x_0. Every tensor is [N, C, H, W]; a mask is [N, 1, H, W], 1 where the pixel is known, 0 where it
is to be sampled.
"""
import math

import torch
from tqdm import tqdm


# --- RePaint (Lugmayr et al. 2022) -------------------------------------------------------------
# Each reverse step joins two draws of x_{t-1} by the mask (Alg. 1, lines 5-8): the known pixels
# from q(x_{t-1} | x_0) of the given image (Eq. 2 of DDPM: its noised version), the unknown ones
# from p_theta(x_{t-1} | x_t) of the sampler. Alone, that is "replacement": the known pixels
# never hear of the generated ones, and the seam shows. Resampling (Sec. 4.2) takes the joined
# x_{t-1} back up by the forward process q(x_t | x_{t-1}), so that the next reverse step sees
# both parts and harmonizes them; the paper's schedule (Sec. 4.3, "jumps") goes back
# `jump_length` steps at once, `resample` - 1 times each `jump_length` steps.


def repaint_positions(steps, jump_length=10, resample=10):
    """The positions a RePaint chain over `steps` visits in turn, from steps - 1 (x_T) to -1 (the
    data): one step down at a time, and at every position j = 0, jump_length, 2 jump_length, ..
    below steps - jump_length, on the first resample - 1 arrivals there, jump_length steps back
    up, one at a time (Lugmayr et al., Sec. 4.3). resample 1 visits steps - 1, .., 0, -1 once
    each: plain replacement. jump_length 1 is Alg. 1 with U = resample."""
    jumps_left = {j: resample - 1 for j in range(0, steps - jump_length, jump_length)}
    positions, position = [steps - 1], steps - 1
    while position >= 0:
        position -= 1
        positions.append(position)
        if jumps_left.get(position, 0) > 0:
            jumps_left[position] -= 1
            for _ in range(jump_length):
                position += 1
                positions.append(position)
    return positions


def forward_jump(sampler, x_prev, position, noise):
    """x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (DDPM Eq. 2; RePaint Alg. 1,
    line 10): from x_prev at position - 1 (the data at -1) to x at `position`, with the sampler's
    beta of that position (on a respaced schedule 1 - abar_{tau_p} / abar_{tau_{p-1}}, which
    keeps q(x_t | x_0) the full schedule's). noise [N, C, H, W] ~ N(0, I)."""
    beta = sampler.betas[position].float()
    return (1. - beta).sqrt() * x_prev + beta.sqrt() * noise


def known_part(sampler, x_0, position, noise):
    """x_{t-1} ~ q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, (1 - abar_{t-1}) I) (RePaint Alg. 1,
    line 5) for a reverse step from `position`: the given image noised to position - 1, x_0
    itself at the last step."""
    if position == 0:
        return x_0
    abar = sampler.alphas_bar[position - 1].float()
    return abar.sqrt() * x_0 + (1. - abar).sqrt() * noise


@torch.no_grad()
def repaint(sampler, x_0, mask, x_T, *condition, jump_length=10, resample=10, noise=torch.randn_like,
            progress=False):
    """RePaint (Lugmayr et al. 2022, Alg. 1 with the jumps of Sec. 4.3): the pixels of x_0 where
    mask is 0 sampled from the model, given those where it is 1. x_T ~ N(0, I) starts the chain;
    each reverse step is the sampler's `step` (its noise torch's), joined with the known part
    by the mask; the known part's noise and the forward jumps' come from noise(x). Returns the
    completed images, clipped to [-1, 1]: where mask is 1, x_0 itself."""
    positions = repaint_positions(len(sampler.timesteps), jump_length, resample)
    x = x_T
    for here, there in tqdm(list(zip(positions, positions[1:])), desc="RePaint", disable=not progress,
                            leave=False, dynamic_ncols=True):
        if there > here:
            x = forward_jump(sampler, x, there, noise(x))
            continue
        i = torch.full((x.shape[0],), here, dtype=torch.long, device=x.device)
        unknown, _ = sampler.step(x, i, *condition, last=here == 0)
        x = mask * known_part(sampler, x_0, here, noise(x)) + (1. - mask) * unknown
    return x.clip(-1., 1.)


def network_evaluations(steps, jump_length=10, resample=10):
    """How many reverse steps (network evaluations) a RePaint chain over `steps` takes."""
    positions = repaint_positions(steps, jump_length, resample)
    return sum(there < here for here, there in zip(positions, positions[1:]))


# --- SDEdit (Meng et al. 2022) -----------------------------------------------------------------
# The given image (a sketch, a photo of another class) is noised to t0 by q(x_t0 | x_0), which
# drowns its details but keeps its layout, and the reverse process from t0 brings it back onto
# the data: realistic and faithful, the balance set by t0 = strength T (Sec. 3, Alg. 1 of the
# VP form). On a sampler of S visited timesteps t0 is that of position round(strength S) - 1,
# strength T when every step is visited.


def sdedit_start(steps, strength):
    """The position SDEdit starts at on a sampler of `steps` visited timesteps: strength steps,
    rounded half up, - 1; -1 (no step: the image is returned) at strength 0."""
    return math.floor(strength * steps + 0.5) - 1


@torch.no_grad()
def sdedit(sampler, x_0, strength, noise, *condition, progress=False):
    """SDEdit (Meng et al. 2022): x_0 noised by q(x_t0 | x_0) = N(sqrt(abar_t0) x_0,
    (1 - abar_t0) I) (DDPM Eq. 4) with noise [N, C, H, W] ~ N(0, I), then the sampler's reverse
    process from t0 (sdedit_start). At strength 1 the start is the noise itself, x_T ~ N(0, I)
    as sampling's (q(x_T | x_0) holds sqrt(abar_T) of the image besides: 0.6% in the paper's
    schedule): plain sampling from that noise. At strength 0 the image is returned.
    Returns (the edited images, x_t0), both [N, C, H, W]."""
    steps = len(sampler.timesteps)
    start = sdedit_start(steps, strength)
    if start < 0:
        return x_0, x_0
    if start == steps - 1 and strength == 1:
        x_t0 = noise
    else:
        abar = sampler.alphas_bar[start].float()
        x_t0 = abar.sqrt() * x_0 + (1. - abar).sqrt() * noise
    return sampler(x_t0, *condition, start=start, progress=progress), x_t0
