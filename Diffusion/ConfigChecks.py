"""Checks of config values that their kind alone does not catch, run before any work: numbers
that are not finite, image file names PIL cannot write, folders the run cannot write to, and
the training options (EMA, snapshots, the log, mixed precision) and the sampling ones.

Each check takes the whole config and returns the one-sentence message of a ConfigError, or
None. They only look: nothing is created, so a refused config leaves no trace.
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
                       "fid": ("fid_stats_dir", "export_dir")}


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


def sampling_options(config):
    """The samplers, the process picture, the export and FID."""
    steps = config["T"] if config["sample_steps"] is None else config["sample_steps"]
    if not 1 <= steps <= config["T"]:
        return (f"sample_steps must be between 1 and T = {config['T']} (or None for all T), not "
                f"{config['sample_steps']}.")
    if not 0 <= config["eta"] <= 1:
        return f"eta must be between 0 (deterministic DDIM) and 1, not {config['eta']}."
    if config["process_frames"] == 1 or config["process_frames"] < 0:
        return (f"process_frames must be 0 (no process picture) or at least 2 (x_T and the "
                f"samples), not {config['process_frames']}.")
    if config["num_samples"] < 0:
        return f"num_samples must be 0 (no export) or more, not {config['num_samples']}."
    if not config["sampledProcessGifName"].lower().endswith(".gif"):
        return (f"sampledProcessGifName must end with .gif, not {config['sampledProcessGifName']!r}: "
                f"the process is written as an animated GIF.")
    if config["state"] == "fid" and config["fid_images"] is None and config["num_samples"] < 2:
        return (f"state fid scores num_samples samples of test_load_weight, but num_samples is "
                f"{config['num_samples']}: set it (the papers use 50000), or set fid_images to a "
                f"folder of images.")
