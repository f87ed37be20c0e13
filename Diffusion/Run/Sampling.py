"""The sampler a config asks for, for both models, `sampler_of(config, network)`, with the speed
options; and its samples out as files: grids, single PNGs, and many of them for FID (the export).

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

The export writes `num_samples` images `{k:06d}.png` in batches of `batch_size`, continuing an
interrupted export: batch b draws its noise from a seed of (seed, b), so it is the same in any run,
and only batches with a missing file are drawn again. Under torchrun, process r of N draws batches
r, r + N, ...: the same images, N times faster. Images are [N, C, H, W] in [-1, 1] (C: 3 or 1).
"""
import math
import os
import sys
from functools import partial

import torch
from PIL import Image
from torch import nn
from torchvision.utils import save_image
from tqdm import tqdm

from Diffusion.DDIM import DDIMSampler
from Diffusion.Diffusion import GaussianDiffusionSampler
from Diffusion.Run.Checkpoints import write_atomically
from Diffusion.Run.Config import steps_of
from Diffusion.Run.Processes import autocast, common_seed, compiled, memory_format, wait_for_all
from Diffusion.Schedule import betas_of, logsnr_timesteps, sampling_timesteps
from Diffusion.Solvers import SolverSampler, dpm_solver_pp, unipc

SOLVERS = {"dpmsolver++": dpm_solver_pp, "unipc": unipc}
SIGNAL_LEFT_LIMIT = 0.05  # the largest share of x_0 in x_T that goes without a warning
LARGEST_BETA = 0.999  # a beta_T suggested must stay below 1


def skip_type_of(config):
    """config["skip_type"], or when None the sampler's own: logSNR for the solvers, else uniform."""
    own = "logSNR" if config["sampler"] in SOLVERS else "uniform"
    return own if config["skip_type"] is None else config["skip_type"]


def timesteps_of(config):
    """The timesteps the configured sampler visits, long [steps_of(config)]. logSNR_split gives the ODE below
    eta_min_snr half of the steps (uniform log-SNR 8 of 20, worse at 10 and 20 NFE: benchmarks/RESULTS.md)."""
    if skip_type_of(config) in ("logSNR", "logSNR_split"):
        betas = betas_of(config["beta_schedule"], config["beta_1"], config["beta_T"], config["T"])
        alphas_bar = torch.cumprod(1. - betas, dim=0)
        split_snr = config["eta_min_snr"] if config["skip_type"] == "logSNR_split" else 0.
        return logsnr_timesteps(alphas_bar, steps_of(config), split_snr)
    return sampling_timesteps(config["T"], steps_of(config), skip_type_of(config))


def sampler_of(config, network):
    """The sampler of config["sampler"] over `network` (the UNet, or the conditional one's guided
    estimate, under the speed options) on config["device"]: `sampler(x_T, *condition) -> x_0`."""
    schedule = (network, config["beta_1"], config["beta_T"], config["T"])
    options = {"timesteps": timesteps_of(config), "clip_denoised": config["clip_denoised"],
               "beta_schedule": config["beta_schedule"], "prediction": config["prediction"]}
    if config["sampler"] == "ddim":
        sampler = DDIMSampler(*schedule, eta=config["eta"], **options)
    elif config["sampler"] in SOLVERS:  # the solver with its noise (eta, eta_min_snr) bound
        solver = partial(SOLVERS[config["sampler"]], eta=config["eta"], eta_min_snr=config["eta_min_snr"])
        sampler = SolverSampler(*schedule, solver, order=config["solver_order"], **options)
    else:
        sampler = GaussianDiffusionSampler(*schedule, variance=config["variance"], **options)
    return sampler.to(torch.device(config["device"]))


# --- the speed options ----------------------------------------------------------------------


class UnderSpeedOptions(nn.Module):
    """The network as a sampler calls it under the speed options: x_t in the memory format of
    channels_last, the network autocast to amp's dtype (and compiled), and its estimate returned
    in float32, so that the sampler's update of x_t stays float32."""

    def __init__(self, network, amp, compile, channels_last, device):
        super().__init__()
        self.network = compiled(network, compile)
        self.amp, self.memory_format, self.device = amp, memory_format(channels_last), device

    def forward(self, x_t, t, *condition):
        with autocast(self.device, self.amp):
            eps = self.network(x_t.contiguous(memory_format=self.memory_format), t, *condition)
        return eps.float()


def under_speed_options(model, amp, compile, channels_last, device):
    """`model` as samplers call it under the speed options amp, compile and channels_last on
    `device` (UnderSpeedOptions), or itself when every option is off."""
    off = amp == "none" and not compile and not channels_last
    return model if off else UnderSpeedOptions(model, amp, compile, channels_last, torch.device(device))


# --- images out -------------------------------------------------------------------------------


def starting_noise(count, img_channels, img_size, device):
    """x_T ~ N(0, I): [count, img_channels, img_size, img_size]."""
    return torch.randn(count, img_channels, img_size, img_size, device=device)


def to_unit_range(images):
    """[-1, 1] -> [0, 1], clamped (x_t of large t reaches beyond [-1, 1])."""
    return (images * 0.5 + 0.5).clamp(0., 1.)


def as_uint8_rgb(images):
    """Images [N, C, H, W] in [-1, 1] -> uint8 [N, 3, H, W], rounded as a PNG file of them holds
    them (torchvision's save_image), gray repeated to RGB: what FID reads of a sample."""
    pixels = to_unit_range(images).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def save_grid(images, path, nrow):
    """Images [N, C, H, W] in [-1, 1] -> one picture at path, `nrow` images per row, said."""
    save_picture(images, path, nrow)
    tqdm.write(f"wrote {path}")


def save_picture(images, path, nrow=8):
    """Images [N, C, H, W] or one [C, H, W] in [-1, 1] -> the picture at path, in the format of its
    extension, written atomically."""
    image_format = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    write_atomically(lambda temporary: save_image(to_unit_range(images), temporary, nrow=nrow, format=image_format),
                     path)


def sample_file(folder, index):
    return os.path.join(folder, f"{index:06d}.png")


def batch_seed(seed, batch):
    """The seed of batch `batch` of an export seeded by `seed`: distinct for every pair."""
    return hash((seed, batch)) % 2 ** 63


def export_samples(draw, folder, num_samples, batch_size, process, seed=None, description="export"):
    """Write images 0 .. num_samples - 1 not yet in `folder`, under a progress bar; draw(first, count)
    -> images [count, 3, H, W] in [-1, 1] of indices first .. first + count - 1 (the conditional model
    picks each index's class). `folder` may be a list of F folders filled together: draw then returns
    [F, count, 3, H, W]. Each `process` (Processes.Process) draws its share of the batches; all
    return together. seed None: a new random export. Returns how many images this process wrote."""
    rank, world_size = process.rank, process.world_size
    several = isinstance(folder, (list, tuple))
    folders = list(folder) if several else [folder]
    for each in folders:
        os.makedirs(each, exist_ok=True)
    seed = common_seed(seed, process)  # the same in every process
    batches = [range(first, min(first + batch_size, num_samples))
               for first in range(0, num_samples, batch_size)]
    missing = {index for index in range(num_samples)
               if not all(os.path.exists(sample_file(each, index)) for each in folders)}
    if missing != set(range(num_samples)) and rank == 0:
        tqdm.write(f"{folders[0]} already holds {num_samples - len(missing)} of the {num_samples} "
                   f"samples: continuing with the {len(missing)} missing")
    mine = [(batch, indices) for batch, indices in enumerate(batches) if batch % world_size == rank]
    share = sum(len(indices) for _, indices in mine)
    to_draw = sum(len(missing.intersection(indices)) for _, indices in mine)
    of_share = f" (process 0's share: 1/{world_size})" if world_size > 1 else ""
    written = 0
    with tqdm(total=share, initial=share - to_draw, desc=description + of_share, unit="img",
              dynamic_ncols=True, disable=rank != 0) as bar:
        for batch, indices in mine:
            if missing.isdisjoint(indices):
                continue
            torch.manual_seed(batch_seed(seed, batch))
            images = draw(indices.start, len(indices)).cpu()
            images = images if several else images[None]
            for position, index in enumerate(indices):
                if index in missing:
                    for each, image in zip(folders, images[:, position]):
                        save_picture(image, sample_file(each, index))
                    written += 1
                    bar.update()
    wait_for_all(process)
    return written


# --- a schedule that leaves the image in x_T -------------------------------------------------


def signal_left_at_T(beta_1, beta_T, T, beta_schedule="linear"):
    """sqrt(alphas_bar_T) = sqrt(prod_t (1 - beta_t)) of the schedule: the factor of x_0 in x_T."""
    return math.sqrt(torch.prod(1. - betas_of(beta_schedule, beta_1, beta_T, T)).item())


def _round_up(value, significant_digits=2):
    scale = 10. ** (math.floor(math.log10(value)) - significant_digits + 1)
    return round(math.ceil(value / scale) * scale, 12)


def beta_T_that_removes_the_signal(beta_1, T, limit=SIGNAL_LEFT_LIMIT):
    """The smallest beta_T whose linear schedule from beta_1 over T steps leaves less than `limit` of
    x_0 in x_T, found by bisection (the signal falls as beta_T grows) and rounded up to two
    significant digits, more where that would reach LARGEST_BETA (very small T); None when none < 1."""
    low, high = beta_1, LARGEST_BETA
    if signal_left_at_T(beta_1, high, T) >= limit:
        return None
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if signal_left_at_T(beta_1, middle, T) < limit else (middle, high)
    return next((rounded for rounded in (_round_up(high, digits) for digits in range(2, 16))
                 if rounded <= LARGEST_BETA), high)


def warn_if_x_T_keeps_the_image(beta_1, beta_T, T, beta_schedule="linear"):
    """One warning line on stderr, with a beta_T that fixes it, when the schedule leaves more than
    SIGNAL_LEFT_LIMIT of x_0 in x_T: training sees x_T = sqrt(abar_T) x_0 + sqrt(1 - abar_T) eps
    (Eq. 4), Algorithm 2 starts from x_T ~ N(0, I), so with much image left the samples stay
    noise-like. The original's configs leave 0.6% (T 1000) and 3% (T 500), T 200 with beta_T 0.02
    37%, the cosine schedule none."""
    left = signal_left_at_T(beta_1, beta_T, T, beta_schedule)
    if left <= SIGNAL_LEFT_LIMIT:
        return
    fix = beta_T_that_removes_the_signal(beta_1, T)
    advice = (f"--beta_T {fix:g} brings it under {SIGNAL_LEFT_LIMIT:.0%}" if fix is not None else
              f"no beta_T below 1 brings it under {SIGNAL_LEFT_LIMIT:.0%} in {T} steps: raise T")
    tqdm.write(f"warning: the schedule beta_1 {beta_1:g} .. beta_T {beta_T:g} over T {T} steps "
               f"leaves sqrt(alphas_bar_T) = {left:.1%} of the image in x_T, but sampling starts "
               f"from pure noise, so samples stay noise-like; {advice}.", file=sys.stderr)
