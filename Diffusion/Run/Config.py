"""The config of a run: one flat dict of the keys in Keys.py. `complete` fills in the keys a dict leaves
out and checks every value before any work; `parse_command_line` reads `--key value` (or `--key=value`)
and `--config FILE.json` over a script's modelConfig. A key's type follows from its default, or its Key's
choices and kind: `coerce` parses command-line text into it, or checks a dict's value. The CHECKS catch
what types do not, each returning a ConfigError's sentence (what was wrong, the value, what to do).
"""
import argparse
import difflib
import io
import json
import math
import os
from functools import cache, partial
from types import UnionType
from typing import get_args, get_origin

import torch
from PIL import Image

from Diffusion.Diffusion import LEARNED_VARIANCES
from Diffusion.Editing import sdedit_start
from Diffusion.Model import check_attention_levels
from Diffusion.Run.Keys import EDITS, FIGURES


class RunError(Exception):
    """An error the scripts report as `error: <message>`, without a traceback."""


class ConfigError(RunError, ValueError):
    """Something the user can fix in the config or in the files it names."""


BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
KIND_NAMES = {int: ("an integer", "N"), float: ("a number", "X"), str: ("a string", "TEXT"),
              bool: ("true or false", "BOOL"),
              list[int]: ("a list of integers (1,2,2 on the command line)", "N,N,..."),
              float | list[float]: ("a number or a list of numbers (0,1,3 on the command line)", "X[,X,...]")}


def value_type(key):
    """The type of a Key's values: its `kind`, else its default's (list[item] for a list)."""
    return key.kind or (list[type(key.default[0])] if isinstance(key.default, list) else type(key.default))


def _coerce(kind, value, text):
    """`value` as a value of `kind`: parsed if command-line `text`, else checked. Raises ValueError."""
    if isinstance(kind, UnionType):  # a number, or a non-empty list of numbers
        number, listed = get_args(kind)
        is_list = ("," in value or "[" in value) if text else isinstance(value, (list, tuple))
        if is_list and not value:
            raise ValueError(value)
        return _coerce(listed if is_list else number, value, text)
    if get_origin(kind) is list:
        if text:
            value = [item for item in value.replace("[", "").replace("]", "").split(",") if item.strip()]
        elif not isinstance(value, (list, tuple)):
            raise ValueError(value)
        return [_coerce(get_args(kind)[0], item, text) for item in value]
    if text:
        return BOOLEAN_WORDS[value.strip().lower()] if kind is bool else kind(value)
    if type(value) is kind or (kind is float and type(value) is int):
        return value
    raise ValueError(value)


def coerce(key, value, text=False):
    """`value` as Key `key` takes it: a dict's value, checked, or with `text` the command line's text,
    parsed (lists as 1,2,2; none for None). Raises ValueError if it is not one of its values."""
    if key.default is None and (value is None or (text and value.lower() == "none")):
        return None
    try:
        result = _coerce(value_type(key), value, text)
    except (KeyError, TypeError):
        raise ValueError(value) from None
    if key.choices and result not in key.choices:
        raise ValueError(value)
    return result


def describe(key):
    """What Key `key` takes, for messages ("an integer or None"), and its --help metavar."""
    name, metavar = (KIND_NAMES[value_type(key)] if not key.choices else
                     (" or ".join(map(repr, key.choices)), "{" + ",".join(map(str, key.choices)) + "}"))
    return (f"{name} or None" if key.default is None else name), metavar


def unknown_key_message(key, shown, keys, absent, where_keys_are_listed):
    """Why a script of `keys` refuses `key` (written `shown`: --key); `absent`: {key it lacks: why}."""
    if key in absent:
        return f"config key '{shown}' does not apply here: {absent[key]}."
    matches = difflib.get_close_matches(key, keys, n=1)
    closest = f" Did you mean '{matches[0]}'?" if matches else ""
    return f"unknown config key '{shown}'.{closest} {where_keys_are_listed}"


def defaults(keys, script_config=None):
    """Every key's default, as a script (whose modelConfig is `script_config`) has them."""
    return {**{key: spec.default for key, spec in keys.items()}, **(script_config or {})}


def complete(config, keys, absent=None):
    """`config` with its left-out keys set to defaults, once every key is known, typed and consistent."""
    for key in config:
        if key not in keys:
            raise ConfigError(unknown_key_message(key, key, keys, absent or {},
                                                  f"Known keys: {', '.join(keys)}."))
    config = {**defaults(keys), **config}
    for key, value in config.items():
        try:
            coerce(keys[key], value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be {describe(keys[key])[0]}, not {value!r}.") from None
    message = next(filter(None, (check(config) for check in CHECKS)), None)
    if message:
        raise ConfigError(message)
    return config


def read_config_file(path):
    """The config keys in a JSON file (the quick starts in configs/, ImportWeights.py's)."""
    try:
        with open(path) as file:
            values = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read config file {path!r}: {error}.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a JSON object of config keys.")
    return values


def _parse_argument(key, text):
    try:
        return coerce(key, text, text=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {describe(key)[0]}, not {text!r}") from None


def parse_command_line(script_config, keys, absent=None, argv=None, description=None):
    """The keys' defaults, overridden by the script's `script_config`, a --config JSON file, then
    --key value; --help lists every key. Exits naming the key on an unknown key or a wrong value."""
    shown = defaults(keys, script_config)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     usage="%(prog)s [--config FILE.json] [--key value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.json",
                        help="a JSON object of config keys, applied before the command line's")
    for key, spec in keys.items():
        parser.add_argument(f"--{key}", type=partial(_parse_argument, spec), default=argparse.SUPPRESS,
                            metavar=describe(spec)[1], help=f"{spec.meaning} (default: {shown[key]!r})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        option = next((u for u in unknown if u.startswith("-")), unknown[0])
        key = option.lstrip("-").split("=")[0]
        parser.error(unknown_key_message(key, option, keys, absent or {}, "See --help for every key."))
    config_file = vars(args).pop("config")
    try:
        from_file = read_config_file(config_file) if config_file else {}
        return complete({**script_config, **from_file, **vars(args)}, keys, absent)
    except ConfigError as error:
        parser.error(str(error))


# --- the checks, in the order they run -------------------------------------------------------

# The folders each state writes to: checkpoints when training, images when sampling.
WRITTEN_FOLDER_KEYS = {"train": ("save_weight_dir", "save_dir"), "eval": ("sampled_dir", "export_dir"),
                       "fid": ("fid_stats_dir", "export_dir"), "nll": (),
                       **dict.fromkeys(FIGURES + EDITS, ("sampled_dir",))}
SOLVERS = ("dpmsolver++", "unipc")


def finite_numbers(config):
    """nan and inf parse as floats, but no key means anything by them (nan guidance fails after sampling)."""
    for key, value in config.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
            return f"config key '{key}' must be finite, not {value!r}: give ordinary numbers, not nan or inf."


# The keys counted from 0 or 1 besides the UNet's: the least value each takes, in words.
COUNTS = {"max_images": (1, "at least 1 (or None for all images)"), "num_workers": (0, "0 or more"),
          "save_every": (1, "at least 1"), "keep_last": (1, "at least 1 (or None to keep all)"),
          "log_every": (0, "0 (never) or more"), "sample_every": (0, "0 (never) or more"),
          "fid_every": (0, "0 (never) or more epochs"), "num_samples": (0, "0 (no export) or more"),
          "fid_samples": (2, "at least 2"), "nll_images": (1, "at least 1"), "figure_images": (1, "at least 1"),
          "latent_samples": (1, "at least 1"), "quality_steps": (2, "at least 2"), "neighbours": (1, "at least 1"),
          "accumulate": (1, "at least 1 (1: no gradient accumulation)"),
          "jump_length": (1, "at least 1"), "resample": (1, "at least 1 (1: no resampling)")}


def positive_counts(config):
    """Counts of things (epochs, images, channels, steps) are at least 1, or 0 where 0 means none."""
    for key in ("epoch", "batch_size", "channel", "num_res_blocks", "img_size", "nrow"):
        if config[key] < 1:
            return f"config key '{key}' must be at least 1, not {config[key]}."
    if config["T"] < 2:
        return f"T, the number of diffusion steps, must be at least 2, not {config['T']}."
    for key, (least, words) in COUNTS.items():
        if config[key] is not None and config[key] < least:
            return f"{key} must be {words}, not {config[key]}."


def unet_shape(config):
    """GroupNorm's 32 groups divide channel; attn names levels channel_mult has; the UNet halves img_size
    once per level after the first."""
    if config["channel"] % 32:
        return (f"channel must be a multiple of 32 (GroupNorm uses 32 groups), not {config['channel']}: "
                f"try {max(32, round(config['channel'] / 32) * 32)}.")
    if not config["channel_mult"] or min(config["channel_mult"]) < 1:
        return f"channel_mult must be a non-empty list of positive integers, not {config['channel_mult']}."
    try:
        check_attention_levels(config.get("attn", []), config["channel_mult"])
    except ValueError as error:
        return str(error)
    halvings = len(config["channel_mult"]) - 1
    if config["img_size"] % 2 ** halvings:
        return (f"img_size {config['img_size']} cannot be halved {halvings} times (once per channel_mult "
                f"level after the first): use a multiple of {2**halvings}, or fewer levels in channel_mult.")


def schedule_and_probabilities(config):
    """A schedule inside (0, 1), probabilities in [0, 1], positive rates."""
    if not 0 < config["beta_1"] <= config["beta_T"] < 1:
        return f"need 0 < beta_1 <= beta_T < 1, got beta_1 {config['beta_1']} and beta_T {config['beta_T']}."
    for key in ("dropout", "p_uncond"):
        if key in config and not 0 <= config[key] <= 1:
            return f"{key} is a probability between 0 and 1, not {config[key]}."
    for key in ("lr", "multiplier", "grad_clip", "group_norm_eps", "snr_gamma", "save_state_minutes", "vlb_weight"):
        if key in config and not config[key] > 0:
            return f"{key} must be a positive number, not {config[key]}."
    if not 0 <= config["ema_decay"] < 1:
        return (f"ema_decay must be at least 0 (no EMA) and below 1, not {config['ema_decay']}: "
                f"the DDPM paper used 0.9999.")


def initial_weights(config):
    """A new run's init_weights is a file that is there."""
    path = config["init_weights"]
    if config["state"] == "train" and path is not None and not os.path.isfile(path):
        return (f"init_weights {path!r} does not exist: give the weights file a new run starts from "
                f"(e.g. CheckPoints/official_ddpm_church_ema/ckpt_official_.pt), or None.")


def available_device(config):
    """The device exists here, and fp16 has the CUDA it needs."""
    try:
        device = torch.device(config["device"])
    except RuntimeError:
        return f"device {config['device']!r} is not a torch device: use cpu, cuda or cuda:N."
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"device is {config['device']!r} but CUDA is not available here: use --device cpu."
    if config["amp"] == "fp16" and device.type != "cuda":
        return "amp fp16 needs a CUDA device; on a CPU use amp bf16 (or none)."


def class_labels(config):
    """labels lists class indices."""
    if config.get("labels") is not None and (not config["labels"] or min(config["labels"]) < 0):
        return f"labels must list class indices (0, 1, ...), not {config['labels']}."


@cache
def pil_writes_rgb(extension):
    """Whether PIL saves an RGB image to a file ending in `extension` (".png")."""
    try:  # unknown or read-only extension, or a format that takes no RGB (XBM: 1-bit) or lacks its plugin
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=Image.registered_extensions()[extension.lower()])
    except Exception:
        return False
    return True


def image_names(config):
    """The grids are saved by PIL, which picks the format from the file name's extension."""
    for key in ("sampledNoisyImgName", "sampledImgName", "sampledProcessImgName"):
        name = config[key]
        if not name or os.path.basename(name) != name:
            return f"{key} must be a file name without a folder, not {name!r}: the folder is sampled_dir."
        if not pil_writes_rgb(os.path.splitext(name)[1]):
            return (f"{key} {name!r} does not end in an image extension PIL can write: end it "
                    f"in .png (or .jpg, .bmp, .tif, .webp).")
    if not config["sampledProcessGifName"].lower().endswith(".gif"):
        return (f"sampledProcessGifName must end with .gif, not {config['sampledProcessGifName']!r}: "
                f"the process is written as an animated GIF.")


def why_unwritable(folder):
    """Why files cannot be written into `folder` (made if missing) or its nearest existing parent; None
    if they can. Permissions alone pass for root, but a file in the way stops root too."""
    existing = path = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return ("it is a file, not a folder" if existing == path
                else f"{existing!r} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable by this user"


def writable_folders(config):
    """This state's folders are writable, lest a run fail at its first checkpoint or after sampling."""
    for key in WRITTEN_FOLDER_KEYS[config["state"]]:
        reason = key in config and why_unwritable(config[key])
        if reason:
            return f"{key} {config[key]!r} cannot be written: {reason}; choose another folder."


def noise_options(config):
    """eta, eta_min_snr and skip_type logSNR_split: the noise of ddim and of the solvers."""
    eta, min_snr, sampler = config["eta"], config["eta_min_snr"], config["sampler"]
    if eta < 0:
        return f"eta must be 0 (deterministic) or more, not {eta}."
    if sampler == "ddim" and eta > 1:
        return (f"eta of ddim must be between 0 (deterministic) and 1 (DDPM's posterior variance), "
                f"not {eta}: for more noise use --sampler unipc --eta {eta}.")
    if eta > 0 and sampler not in ("ddim", *SOLVERS):
        return (f"eta {eta} adds noise to ddim, dpmsolver++ and unipc only, not to sampler {sampler}: use "
                f"--sampler unipc --eta {eta} for a fast stochastic sampler, or eta 0.")
    if sampler in SOLVERS and eta > 1 and config["solver_order"] == 3:
        return (f"solver_order 3 with eta {eta} extrapolates x_0 quadratically through noisy steps "
                f"(FID 8.3 and 18.1 against 1.2 for order 2 at eta 10, benchmarks/RESULTS.md): use "
                f"--solver_order 2, or eta 1 or less.")
    if min_snr < 0:
        return f"eta_min_snr must be 0 (noise on every step) or more, not {min_snr}."
    if config["skip_type"] == "logSNR_split" and not (sampler in SOLVERS and min_snr > 0):
        return (f"skip_type logSNR_split splits the steps at eta_min_snr, the noise window of "
                f"dpmsolver++ and unipc, not of sampler {sampler} with eta_min_snr {min_snr}: use "
                f"--sampler unipc --eta 10 --eta_min_snr 0.1, or skip_type logSNR.")
    if min_snr > 0 and not (sampler in SOLVERS and eta > 0):
        return (f"eta_min_snr {min_snr} limits the noise of dpmsolver++ and unipc with eta > 0, not of "
                f"sampler {sampler} with eta {eta}: use --sampler unipc --eta 10 "
                f"--eta_min_snr {min_snr}, or eta_min_snr 0.")


def steps_of(config):
    """How many network evaluations one sample takes: sample_steps, or T when it is None."""
    return config["T"] if config["sample_steps"] is None else config["sample_steps"]


def sampling_options(config):
    """The steps, the process picture and what state fid scores."""
    if not 1 <= steps_of(config) <= config["T"]:
        return (f"sample_steps must be between 1 and T = {config['T']} (or None for all T), not "
                f"{config['sample_steps']}.")
    if config["process_frames"] == 1 or config["process_frames"] < 0:
        return (f"process_frames must be 0 (no process picture) or at least 2 (x_T and the "
                f"samples), not {config['process_frames']}.")
    if config["state"] == "fid" and config["fid_images"] is None and config["num_samples"] < 2:
        return (f"state fid scores num_samples samples of test_load_weight, but num_samples is "
                f"{config['num_samples']}: set it (the papers use 50000), or set fid_images to a "
                f"folder of images.")


def figure_steps(config):
    """The t of the figures' states are steps of the chain: 1..T where x_t is kept, 0..T where images mix."""
    T = config["T"]
    for key, least in (("latent_steps", 1), ("interpolation_t", 0), ("interpolation_steps", 0)):
        steps = config[key] if isinstance(config[key], list) else [config[key]]
        wrong = [t for t in steps if t is not None and not least <= t <= T]
        if wrong:
            return f"{key} must hold steps t from {least} to T = {T} (or be None for the paper's), not {wrong}."
    if config["state"] == "quality_over_time" and config["num_samples"] < 2:
        return (f"state quality_over_time scores num_samples samples at each step, but num_samples is "
                f"{config['num_samples']}: set it (the paper: 50000; on a CPU 100 shows the trend).")


def objective(config):
    """loss, variance, t_sampling and loss_weight that train something together (docs/objectives.md);
    sampling reads only the variance."""
    loss, variance = config["loss"], config["variance"]
    if config["state"] != "train":
        return None
    if variance in LEARNED_VARIANCES and loss == "simple":
        return (f"variance {variance} is learned only from the bound, but loss is simple, which has no "
                f"variance term: use --loss hybrid (Improved DDPM) or --loss bound.")
    if loss == "hybrid" and variance not in LEARNED_VARIANCES:
        return (f"loss hybrid trains the mean by L_simple and only a learned variance by L_vlb, but "
                f"variance is {variance}: use --variance learned_range, or --loss simple.")
    if config["t_sampling"] == "importance" and loss != "bound":
        return (f"t_sampling importance weighs the terms of the bound, the whole loss of loss bound only, "
                f"not of loss {loss}: use --loss bound, or --t_sampling uniform.")
    if config["loss_weight"] == "min_snr" and (loss != "simple" or config["prediction"] == "mu"):
        return (f"loss_weight min_snr weighs L_simple's error in x_0 for eps, x0 or v, not loss {loss} "
                f"with prediction {config['prediction']}: use --loss_weight none.")


def editing(config):
    """What inpaint and sdedit edit, and a sampler that can do it: RePaint steps back and forth one
    step at a time; SDEdit starts at t0 on the sampler's own timesteps (Diffusion/Editing.py)."""
    strength, state, sampler = config["strength"], config["state"], config["sampler"]
    if not 0 <= strength <= 1:
        return (f"strength must be between 0 (the image back) and 1 (plain sampling), not {strength}: "
                f"SDEdit's paper edits at 0.3 to 0.6.")
    if state not in EDITS:
        return None
    if config["edit_images"] is None:
        return f"state {state} edits edit_images, which is None: set it to an image file or a folder of images."
    if state == "inpaint" and sampler in SOLVERS:
        return (f"sampler {sampler} cannot run RePaint, whose chain goes back up between steps, which a "
                f"multistep solver's history cannot follow: use --sampler ddpm (fewer steps with "
                f"sample_steps) or ddim.")
    if state == "sdedit" and strength > 0 and sdedit_start(steps_of(config), strength) < 0:
        return (f"strength {strength} starts SDEdit at t0 = {strength * config['T']:g}, below the first "
                f"of the {steps_of(config)} timesteps sampler {sampler} visits, so it cannot start there: "
                f"raise strength to {1 / steps_of(config):g} or more, or raise sample_steps.")


CHECKS = [finite_numbers, positive_counts, unet_shape, schedule_and_probabilities, initial_weights, available_device,
          class_labels, image_names, writable_folders, noise_options, sampling_options, figure_steps, objective,
          editing]
