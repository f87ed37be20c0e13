"""The checks of a config that a key's type alone does not make, run before any work: numbers
that are not finite or out of range, a UNet that cannot be built, a schedule outside (0, 1), a
device that is absent, image file names PIL cannot write, folders the run cannot write to, and
the training and sampling options.

Each check takes the whole config and returns the one-sentence message of a ConfigError (what
was wrong, the value given, what to do), or None. They only look: nothing is created, so a
refused config leaves no trace.
"""
import functools
import io
import math
import os

import torch
from PIL import Image

IMAGE_NAME_KEYS = ("sampledNoisyImgName", "sampledImgName", "sampledProcessImgName")
# The folder each state writes to: checkpoints when training, image grids when sampling.
WRITTEN_FOLDER_KEYS = {"train": ("save_weight_dir", "save_dir"), "eval": ("sampled_dir", "export_dir"),
                       "fid": ("fid_stats_dir", "export_dir"), "nll": ()}


def _is_finite(value):
    if isinstance(value, (list, tuple)):
        return all(map(_is_finite, value))
    return not isinstance(value, float) or math.isfinite(value)


def finite_numbers(config):
    """nan and inf parse as floats, but no key means anything by them (a guidance weight of nan
    would sample for the whole run and then fail)."""
    for key, value in config.items():
        if not _is_finite(value):
            return (f"config key '{key}' must be finite, not {value!r}: give ordinary numbers, "
                    f"not nan or inf.")


@functools.cache
def pil_writes_rgb(extension):
    """Whether PIL saves an RGB image to a file ending in `extension` (".png")."""
    Image.init()
    image_format = Image.registered_extensions().get(extension.lower())
    if image_format not in Image.SAVE:
        return False
    try:  # some formats PIL writes take no RGB (XBM: 1-bit), or need a plugin that is absent
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=image_format)
    except Exception:
        return False
    return True


def image_names(config):
    """The grids are saved by PIL, which picks the format from the file name's extension."""
    for key in IMAGE_NAME_KEYS:
        name = config.get(key)
        if name is None:
            continue
        if not name or os.path.basename(name) != name:
            return (f"{key} must be a file name without a folder, not {name!r}: the folder is "
                    f"sampled_dir.")
        if not pil_writes_rgb(os.path.splitext(name)[1]):
            return (f"{key} {name!r} does not end in an image extension PIL can write: end it "
                    f"in .png (or .jpg, .bmp, .tif, .webp).")


def why_unwritable(folder):
    """Why files cannot be written into `folder`, which is made if missing; None if they can.
    Looks at the folder or, while it does not exist yet, its nearest existing parent. (A test of
    permissions alone passes for root; a file in the way stops root too.)"""
    path = os.path.abspath(folder)
    if os.path.lexists(path) and not os.path.isdir(path):
        return "it is a file, not a folder"
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, so no folder can be made under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable by this user"


def writable_folders(config):
    """The folder this state writes to can be written, so that a run does not fail at its
    first checkpoint (after an epoch of training) or after the whole sampling."""
    for key in WRITTEN_FOLDER_KEYS[config["state"]]:
        if key in config:
            reason = why_unwritable(config[key])
            if reason:
                return f"{key} {config[key]!r} cannot be written: {reason}; choose another folder."


def training_options(config):
    """EMA, snapshots, the log and mixed precision."""
    if "ema_decay" in config and not 0 <= config["ema_decay"] < 1:
        return (f"ema_decay must be at least 0 (no EMA) and below 1, not {config['ema_decay']}: "
                f"the DDPM paper used 0.9999.")
    for key in ("save_every", "keep_last"):
        if config.get(key) is not None and config[key] < 1:
            return f"{key} must be at least 1, not {config[key]}."
    for key in ("log_every", "sample_every"):
        if config.get(key, 0) < 0:
            return f"{key} must be 0 (never) or more, not {config[key]}."
    minutes = config.get("save_state_minutes", 1)
    if not (minutes > 0 and math.isfinite(minutes)):
        return f"save_state_minutes must be a positive number, not {minutes}."
    if config.get("amp") == "fp16" and torch.device(config["device"]).type != "cuda":
        return "amp fp16 needs a CUDA device; on a CPU use amp bf16 (or none)."


def _noise_options(config):
    """eta, eta_min_snr and skip_type logSNR_split: the noise of ddim and of the solvers."""
    eta, min_snr, sampler = config["eta"], config["eta_min_snr"], config["sampler"]
    solvers = ("dpmsolver++", "unipc")
    if not (eta >= 0 and math.isfinite(eta)):
        return f"eta must be 0 (deterministic) or more, not {eta}."
    if sampler == "ddim" and eta > 1:
        return (f"eta of ddim must be between 0 (deterministic) and 1 (DDPM's posterior variance), "
                f"not {eta}: for more noise use --sampler unipc --eta {eta}.")
    if eta > 0 and sampler not in ("ddim", *solvers):
        return (f"eta {eta} adds noise to ddim, dpmsolver++ and unipc only, not to sampler {sampler}: use "
                f"--sampler unipc --eta {eta} for a fast stochastic sampler, or eta 0.")
    if sampler in solvers and eta > 1 and config["solver_order"] == 3:
        return (f"solver_order 3 with eta {eta} extrapolates x_0 quadratically through noisy steps "
                f"(FID 8.3 and 18.1 against 1.2 for order 2 at eta 10, benchmarks/RESULTS.md): use "
                f"--solver_order 2, or eta 1 or less.")
    if not (min_snr >= 0 and math.isfinite(min_snr)):
        return f"eta_min_snr must be 0 (noise on every step) or more, not {min_snr}."
    if config["skip_type"] == "logSNR_split" and not (sampler in solvers and min_snr > 0):
        return (f"skip_type logSNR_split splits the steps at eta_min_snr, the noise window of "
                f"dpmsolver++ and unipc, not of sampler {sampler} with eta_min_snr {min_snr}: use "
                f"--sampler unipc --eta 10 --eta_min_snr 0.1, or skip_type logSNR.")
    if min_snr > 0 and not (sampler in solvers and eta > 0):
        return (f"eta_min_snr {min_snr} limits the noise of dpmsolver++ and unipc with eta > 0, not of "
                f"sampler {sampler} with eta {eta}: use --sampler unipc --eta 10 "
                f"--eta_min_snr {min_snr}, or eta_min_snr 0.")


def sampling_options(config):
    """The samplers, the process picture, the export and FID."""
    steps = config["T"] if config["sample_steps"] is None else config["sample_steps"]
    if not 1 <= steps <= config["T"]:
        return (f"sample_steps must be between 1 and T = {config['T']} (or None for all T), not "
                f"{config['sample_steps']}.")
    noise = _noise_options(config)
    if noise:
        return noise
    if config["process_frames"] == 1 or config["process_frames"] < 0:
        return (f"process_frames must be 0 (no process picture) or at least 2 (x_T and the "
                f"samples), not {config['process_frames']}.")
    if config["num_samples"] < 0:
        return f"num_samples must be 0 (no export) or more, not {config['num_samples']}."
    if not config["sampledProcessGifName"].lower().endswith(".gif"):
        return (f"sampledProcessGifName must end with .gif, not {config['sampledProcessGifName']!r}: "
                f"the process is written as an animated GIF.")
    for key, least in (("fid_samples", 2), ("nll_images", 1)):
        if config.get(key) is not None and config[key] < least:
            return f"{key} must be at least {least}, not {config[key]}."
    if config.get("fid_every", 0) < 0:
        return f"fid_every must be 0 (never) or more epochs, not {config['fid_every']}."
    if config["state"] == "fid" and config["fid_images"] is None and config["num_samples"] < 2:
        return (f"state fid scores num_samples samples of test_load_weight, but num_samples is "
                f"{config['num_samples']}: set it (the papers use 50000), or set fid_images to a "
                f"folder of images.")


def positive_counts(config):
    """Counts of things (epochs, images, channels, steps) are at least 1."""
    for key in ("epoch", "batch_size", "channel", "num_res_blocks", "img_size", "nrow"):
        if key in config and config[key] < 1:
            return f"config key '{key}' must be at least 1, not {config[key]}."
    if config["T"] < 2:
        return f"T, the number of diffusion steps, must be at least 2, not {config['T']}."
    if config.get("max_images") is not None and config["max_images"] < 1:
        return f"max_images must be at least 1 (or None for all images), not {config['max_images']}."
    if config.get("num_workers", 0) < 0:
        return f"num_workers must be 0 or more, not {config['num_workers']}."


def unet_channels(config):
    """GroupNorm's 32 groups need channel to be a multiple of 32."""
    if config["channel"] % 32:
        good = max(32, round(config["channel"] / 32) * 32)
        return (f"channel must be a multiple of 32 (GroupNorm uses 32 groups), not "
                f"{config['channel']}: try {good}.")
    if not config["channel_mult"] or min(config["channel_mult"]) < 1:
        return f"channel_mult must be a non-empty list of positive integers, not {config['channel_mult']}."


def attention_levels(config):
    """attn names levels that channel_mult has."""
    levels = len(config["channel_mult"])
    bad = [level for level in config.get("attn", []) if not 0 <= level < levels]
    if bad:
        return (f"attn {config['attn']} names level {bad[0]}, but channel_mult "
                f"{config['channel_mult']} has levels 0..{levels - 1}: use indices in that range.")


def halvable_image_size(config):
    """The UNet halves img_size once per level after the first."""
    halvings = len(config["channel_mult"]) - 1
    if config["img_size"] % 2 ** halvings:
        return (f"img_size {config['img_size']} cannot be halved {halvings} times (once per "
                f"channel_mult level after the first): use a multiple of {2 ** halvings}, or "
                f"fewer levels in channel_mult.")


def schedule_and_probabilities(config):
    """A schedule inside (0, 1), probabilities in [0, 1], positive rates."""
    if not 0 < config["beta_1"] <= config["beta_T"] < 1:
        return (f"need 0 < beta_1 <= beta_T < 1, got beta_1 {config['beta_1']} and beta_T "
                f"{config['beta_T']}.")
    for key in ("dropout", "p_uncond"):
        if key in config and not 0 <= config[key] <= 1:
            return f"{key} is a probability between 0 and 1, not {config[key]}."
    for key in ("lr", "multiplier", "grad_clip", "group_norm_eps", "snr_gamma"):
        if key in config and not (config[key] > 0 and math.isfinite(config[key])):
            return f"{key} must be a positive number, not {config[key]}."


def available_device(config):
    """The device exists here."""
    try:
        device = torch.device(config["device"])
    except RuntimeError:
        return (f"device {config['device']!r} is not a torch device: use cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"device is {config['device']!r} but CUDA is not available here: use --device cpu."


def class_labels(config):
    """labels lists class indices."""
    if config.get("labels") is not None and (not config["labels"] or min(config["labels"]) < 0):
        return f"labels must list class indices (0, 1, ...), not {config['labels']}."


CHECKS = [finite_numbers, positive_counts, unet_channels, attention_levels, halvable_image_size,
          schedule_and_probabilities, available_device, class_labels, image_names, writable_folders,
          training_options, sampling_options]
