"""The flat config dicts of Main.py and MainCondition.py: checking them, and overriding any key
from the command line (`--epoch 1 --channel_mult 1,2,2`, or `--epoch=1`).

A script's own dict is the list of keys it knows; ConfigKeys.py says what values each key takes
and what it does (shown by `--help`); ConfigChecks.py holds the checks across keys.
"""
import argparse
import difflib
import json
import math
import sys
import torch

from Diffusion.ConfigChecks import (
    finite_numbers,
    image_names,
    sampling_options,
    training_options,
    writable_folders,
)
from Diffusion.ConfigKeys import KINDS, MEANINGS, WHY_ABSENT
from Diffusion.Interrupt import TrainingStopped


class ConfigError(ValueError):
    """Something the user can fix in the config or in the files it names. The message says what
    was wrong, the value given, and what to do."""


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
