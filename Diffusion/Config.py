"""The flat config dicts of Main.py and MainCondition.py: checking them, and overriding any key
from the command line (`--epoch 1 --channel_mult 1,2,2`, or `--epoch=1`).

A script's own dict is the list of keys it knows; `KINDS` says what values each key takes and
`MEANINGS` what it does (shown by `--help`).
"""
import argparse
import difflib
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from Diffusion.ConfigChecks import (
    finite_numbers,
    image_names,
    sampling_options,
    training_options,
    writable_folders,
)
from Diffusion.Interrupt import TrainingStopped
from Diffusion.Model import DOWNSAMPLE_PADDINGS


class ConfigError(ValueError):
    """Something the user can fix in the config or in the files it names. The message says what
    was wrong, the value given, and what to do."""


@dataclass(frozen=True)
class Kind:
    """The values a key takes: `name` for messages, `parse` for command-line text (raises
    ValueError), `accepts` for Python values."""
    name: str
    metavar: str
    parse: Callable[[str], Any]
    accepts: Callable[[Any], bool]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return _is_int(value) or isinstance(value, float)


def _parse_bool(text):
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _parse_list(parse_item):
    return lambda text: [parse_item(item) for item in text.replace("[", "").replace("]", "").split(",")
                         if item.strip()]


def _optional(kind):
    def parse(text):
        return None if text.lower() == "none" else kind.parse(text)
    return Kind(f"{kind.name} or None", kind.metavar, parse, lambda value: value is None or kind.accepts(value))


def _choice(*choices):
    def parse(text):
        if text not in choices:
            raise ValueError(text)
        return text
    return Kind(" or ".join(repr(c) for c in choices), "{" + ",".join(choices) + "}", parse,
                lambda value: value in choices)


def _choice_of_ints(*choices):
    def parse(text):
        if int(text) not in choices:
            raise ValueError(text)
        return int(text)
    return Kind(" or ".join(map(str, choices)), "{" + ",".join(map(str, choices)) + "}", parse,
                lambda value: _is_int(value) and value in choices)


INT = Kind("an integer", "N", int, _is_int)
FLOAT = Kind("a number", "X", float, _is_number)
STR = Kind("a string", "TEXT", str, lambda value: isinstance(value, str))
BOOL = Kind("true or false", "BOOL", _parse_bool, lambda value: isinstance(value, bool))
INT_LIST = Kind("a list of integers (1,2,2 on the command line)", "N,N,...", _parse_list(int),
                lambda value: isinstance(value, (list, tuple)) and all(_is_int(v) for v in value))
FLOAT_OR_FLOAT_LIST = Kind(
    "a number or a list of numbers (0,1,3 on the command line)", "X[,X,...]",
    lambda text: _parse_list(float)(text) if "," in text or "[" in text else float(text),
    lambda value: _is_number(value) or (isinstance(value, (list, tuple)) and len(value) > 0
                                        and all(_is_number(v) for v in value)))

KINDS = {
    "state": _choice("train", "eval", "fid"),
    "epoch": INT,
    "batch_size": INT,
    "T": INT,
    "channel": INT,
    "channel_mult": INT_LIST,
    "attn": INT_LIST,
    "num_res_blocks": INT,
    "dropout": FLOAT,
    "lr": FLOAT,
    "multiplier": FLOAT,
    "beta_1": FLOAT,
    "beta_T": FLOAT,
    "img_size": INT,
    "img_channels": _choice_of_ints(1, 3),
    "grad_clip": FLOAT,
    "device": STR,
    "training_load_weight": _optional(STR),
    "save_weight_dir": STR,
    "save_dir": STR,
    "test_load_weight": STR,
    "sampled_dir": STR,
    "sampledNoisyImgName": STR,
    "sampledImgName": STR,
    "nrow": INT,
    "dataset": STR,
    "data_root": STR,
    "num_workers": INT,
    "max_images": _optional(INT),
    "seed": _optional(INT),
    "group_norm_eps": FLOAT,
    "downsample_padding": _choice(*DOWNSAMPLE_PADDINGS),
    "clip_denoised": BOOL,
    "w": FLOAT_OR_FLOAT_LIST,
    "p_uncond": FLOAT,
    "labels": _optional(INT_LIST),
    "ema_decay": FLOAT,
    "use_ema": BOOL,
    "save_every": INT,
    "keep_last": _optional(INT),
    "save_state_minutes": FLOAT,
    "log_every": INT,
    "sample_every": INT,
    "overwrite": BOOL,
    "label_dropout": _choice("example", "batch"),
    "amp": _choice("none", "bf16", "fp16"),
    "compile": BOOL,
    "channels_last": BOOL,
    "sampler": _choice("ddpm", "ddim"),
    "sample_steps": _optional(INT),
    "eta": FLOAT,
    "skip_type": _choice("uniform", "quadratic"),
    "variance": _choice("fixedlarge", "fixedsmall"),
    "process_frames": INT,
    "sampledProcessImgName": STR,
    "sampledProcessGifName": STR,
    "num_samples": INT,
    "export_dir": STR,
    "fid_images": _optional(STR),
    "fid_extractor": STR,
    "fid_stats_dir": STR,
}

MEANINGS = {
    "state": "train a model; eval: sample image grids from a checkpoint; fid: FID and IS of samples",
    "epoch": "passes over the training set",
    "batch_size": "images per training step; images sampled by eval",
    "T": "diffusion steps",
    "channel": "base channel count of the UNet (a multiple of 32)",
    "channel_mult": "channels of each resolution level, as multiples of channel",
    "attn": "levels (indices into channel_mult) with self-attention",
    "num_res_blocks": "ResBlocks per level on the down path (one more on the up path)",
    "dropout": "dropout in every ResBlock while training",
    "lr": "learning rate of AdamW before warm-up",
    "multiplier": "warm-up takes the learning rate to lr * multiplier over epoch // 10 epochs",
    "beta_1": "noise variance beta_1 of the first step (linear schedule)",
    "beta_T": "noise variance beta_T of the last step (linear schedule)",
    "img_size": "height and width of the images (the UNet halves it once per level)",
    "img_channels": "3: RGB images; 1: grayscale (MNIST, Fashion-MNIST), one channel to model",
    "grad_clip": "largest gradient norm; larger gradients are scaled down",
    "device": "torch device: cuda, cuda:1, cpu, ...",
    "training_load_weight": "checkpoint to continue training from (in the checkpoint folder); "
                            "last: the newest there",
    "save_weight_dir": "folder of the checkpoints ckpt_{epoch}_.pt",
    "save_dir": "folder of this model's checkpoints ckpt_{epoch}_.pt",
    "test_load_weight": "checkpoint eval samples from (in the checkpoint folder)",
    "sampled_dir": "folder eval writes its image grids to",
    "sampledNoisyImgName": "file name of the grid of starting noise x_T",
    "sampledImgName": "file name of the grid of samples x_0",
    "nrow": "images per row of the grids (MainCondition.py puts one class per row instead)",
    "dataset": "CIFAR10, another torchvision dataset (MNIST, CIFAR100, ...), or a folder of images",
    "data_root": "where torchvision datasets are downloaded to (a folder per dataset)",
    "num_workers": "data-loading worker processes",
    "max_images": "train on a fixed random subset of this many images (None: all of them)",
    "seed": "random seed (None: a different run each time)",
    "group_norm_eps": "epsilon of every GroupNorm (1e-6 for the official DDPM model)",
    "downsample_padding": "symmetric (the original) or same (TensorFlow's, the official DDPM model)",
    "clip_denoised": "clip the predicted x_0 to [-1, 1] at every sampling step",
    "w": "guidance weight: eps = (1 + w) eps(x, c) - w eps(x); a list gives one grid per value",
    "p_uncond": "probability that a training example's label is replaced by the null label",
    "labels": "classes eval samples, one per row (None: every class)",
    "ema_decay": "decay of the exponential moving average of the weights (0: no EMA); "
                 "snapshots hold the EMA weights",
    "use_ema": "eval samples from the EMA weights (false: the raw weights of training_state.pt)",
    "save_every": "write the weight snapshot ckpt_{epoch}_.pt every this many epochs (and after "
                  "the last)",
    "keep_last": "keep only the newest this many snapshots (None: all)",
    "save_state_minutes": "minutes between saves of training_state.pt within an epoch (it is also "
                          "saved after every epoch and on SIGTERM or Ctrl-C)",
    "log_every": "steps between lines of training_log.jsonl (0: one per epoch only)",
    "sample_every": "epochs between sample grids in the checkpoint folder's samples/ and "
                    "TensorBoard (0: never)",
    "overwrite": "let a new run (training_load_weight None) delete a run already in the "
                 "checkpoint folder",
    "label_dropout": "example: drop each label with p_uncond (the paper); batch: drop the whole "
                     "batch's labels with p_uncond (the original)",
    "amp": "mixed precision: none (float32), bf16 (GPU or CPU) or fp16 (GPU, with loss scaling)",
    "compile": "torch.compile the UNet (faster steps after a slow start)",
    "channels_last": "NHWC memory format for the UNet (faster convolutions on GPUs)",
}


# Keys one script lacks on purpose, and why (said instead of "unknown config key").
WHY_ABSENT = {
    "attn": "the class-conditional model's attention is fixed (self-attention after every "
            "down-path block, as the original); leave it out",
    "sampler": "ddpm: Algorithm 2 (respaced when sample_steps < T); ddim: DDIM (Song et al. 2021)",
    "sample_steps": "network evaluations per sample, out of T (None: all T)",
    "eta": "DDIM's noise: 0 deterministic, 1 as DDPM's posterior variance (ddim only)",
    "skip_type": "which sample_steps timesteps are visited: uniform or quadratic (as DDIM)",
    "variance": "sigma_t^2 of ddpm: fixedlarge beta_t (the original) or fixedsmall (the posterior's)",
    "process_frames": "columns of the process picture and frames of its GIF, at most sample_steps + 1 (0: neither)",
    "sampledProcessImgName": "file name of the picture of the denoising process: x_t and predicted x_0",
    "sampledProcessGifName": "file name of the animated GIF of the grid from noise to samples",
    "num_samples": "images eval exports as single PNGs into export_dir (0: none); fid scores them",
    "export_dir": "folder of the exported samples (MainCondition.py: a subfolder per w)",
    "fid_images": "folder of images that state fid scores (None: the checkpoint's num_samples samples)",
    "fid_extractor": "features of FID and IS: inception (downloaded once) or a StandInClassifier file",
    "fid_stats_dir": "folder caching the training set's FID statistics",
}


def _closest_key(key, known):
    matches = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean '{matches[0]}'?" if matches else ""


def unknown_key_message(key, shown, defaults, where_keys_are_listed):
    """Why `key` (written `shown`: --key on the command line) is refused by a script whose keys
    are `defaults`."""
    if key in WHY_ABSENT:
        return f"config key '{shown}' does not apply here: {WHY_ABSENT[key]}."
    return f"unknown config key '{shown}'.{_closest_key(key, defaults)} {where_keys_are_listed}"


def check_config(config, defaults):
    """The config with missing keys filled from `defaults`, after checking every key is known,
    of the right kind and consistent with the others. Raises ConfigError."""
    for key in config:
        if key not in defaults:
            raise ConfigError(unknown_key_message(key, key, defaults,
                                                  f"Known keys: {', '.join(defaults)}."))
    config = {**defaults, **config}
    for key, value in config.items():
        if not KINDS[key].accepts(value):
            raise ConfigError(f"config key '{key}' must be {KINDS[key].name}, not {value!r}.")
    for check in CHECKS:
        message = check(config)
        if message:
            raise ConfigError(message)
    return config


def _counts(config):
    for key in ("epoch", "batch_size", "channel", "num_res_blocks", "img_size", "nrow"):
        if key in config and config[key] < 1:
            return f"config key '{key}' must be at least 1, not {config[key]}."
    if config["T"] < 2:
        return f"T, the number of diffusion steps, must be at least 2, not {config['T']}."
    if config.get("max_images") is not None and config["max_images"] < 1:
        return f"max_images must be at least 1 (or None for all images), not {config['max_images']}."
    if config.get("num_workers", 0) < 0:
        return f"num_workers must be 0 or more, not {config['num_workers']}."


def _channels(config):
    if config["channel"] % 32:
        good = max(32, round(config["channel"] / 32) * 32)
        return (f"channel must be a multiple of 32 (GroupNorm uses 32 groups), not "
                f"{config['channel']}: try {good}.")
    if not config["channel_mult"] or min(config["channel_mult"]) < 1:
        return f"channel_mult must be a non-empty list of positive integers, not {config['channel_mult']}."


def _attn_levels(config):
    levels = len(config["channel_mult"])
    bad = [level for level in config.get("attn", []) if not 0 <= level < levels]
    if bad:
        return (f"attn {config['attn']} names level {bad[0]}, but channel_mult "
                f"{config['channel_mult']} has levels 0..{levels - 1}: use indices in that range.")


def _image_size(config):
    halvings = len(config["channel_mult"]) - 1
    if config["img_size"] % 2 ** halvings:
        return (f"img_size {config['img_size']} cannot be halved {halvings} times (once per "
                f"channel_mult level after the first): use a multiple of {2 ** halvings}, or "
                f"fewer levels in channel_mult.")


def _schedule(config):
    if not 0 < config["beta_1"] <= config["beta_T"] < 1:
        return (f"need 0 < beta_1 <= beta_T < 1, got beta_1 {config['beta_1']} and beta_T "
                f"{config['beta_T']}.")
    for key in ("dropout", "p_uncond"):
        if key in config and not 0 <= config[key] <= 1:
            return f"{key} is a probability between 0 and 1, not {config[key]}."
    for key in ("lr", "multiplier", "grad_clip", "group_norm_eps"):
        if key in config and not (config[key] > 0 and math.isfinite(config[key])):
            return f"{key} must be a positive number, not {config[key]}."


def _device(config):
    try:
        device = torch.device(config["device"])
    except RuntimeError:
        return (f"device {config['device']!r} is not a torch device: use cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"device is {config['device']!r} but CUDA is not available here: use --device cpu."


def _labels(config):
    if config.get("labels") is not None and (not config["labels"] or min(config["labels"]) < 0):
        return f"labels must list class indices (0, 1, ...), not {config['labels']}."


CHECKS = [finite_numbers, _counts, _channels, _attn_levels, _image_size, _schedule, _device, _labels,
          image_names, writable_folders, training_options, sampling_options]


def _argument_type(key):
    def parse(text):
        try:
            return KINDS[key].parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {KINDS[key].name}, not {text!r}") from None
    parse.__name__ = KINDS[key].name
    return parse


def read_config_file(path):
    """The config keys in a JSON file (as written by ImportWeights.py)."""
    try:
        with open(path) as file:
            values = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read config file {path!r}: {error}.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a JSON object of config keys.")
    return values


def parse_command_line(defaults, argv=None, description=None):
    """`defaults`, overridden by the keys of a --config JSON file, then by the keys given as
    --key value; --help lists every key. Exits with a message naming the key on an unknown key
    or a value of the wrong kind."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     usage="%(prog)s [--config FILE.json] [--key value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.json",
                        help="a JSON object of config keys, applied before the command line's")
    for key, value in defaults.items():
        parser.add_argument(f"--{key}", type=_argument_type(key), default=argparse.SUPPRESS,
                            metavar=KINDS[key].metavar, help=f"{MEANINGS[key]} (default: {value!r})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        option = next((u for u in unknown if u.startswith("-")), unknown[0])
        key = option.lstrip("-").split("=")[0]
        parser.error(unknown_key_message(key, option, defaults, "See --help for every key."))
    overrides = vars(args)
    config_file = overrides.pop("config")
    try:
        from_file = read_config_file(config_file) if config_file else {}
        return check_config({**from_file, **overrides}, defaults)
    except ConfigError as error:
        parser.error(str(error))


def run_state(model_config, defaults, train, eval, fid):
    """Check `model_config` (None: `defaults`) and run train, eval or fid as its "state" says."""
    config = check_config(model_config if model_config is not None else defaults, defaults)
    {"train": train, "eval": eval, "fid": fid}[config["state"]](config)


def run_from_command_line(main, defaults, description):
    """Run `main(config)` with `defaults` overridden by the command line; a ConfigError ends
    the program with its message instead of a traceback."""
    config = parse_command_line(defaults, sys.argv[1:], description)
    try:
        main(config)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_status)
