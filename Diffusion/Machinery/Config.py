"""The config of a run: one flat dict of the keys in Keys.py. Each key's type follows from its
default (or from its Key's choices and kind); `complete` fills in the keys a dict leaves out and
checks every value, and `parse_command_line` reads `--key value` (or `--key=value`) and
`--config FILE.json` over a script's modelConfig.
"""
import argparse
import difflib
import json
from types import UnionType
from typing import get_args, get_origin

from Diffusion.Machinery.Checks import CHECKS
from Diffusion.Machinery.Errors import ConfigError

ITEM_SEPARATOR = ","
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
NAMES = {int: ("an integer", "N"), float: ("a number", "X"), str: ("a string", "TEXT"),
         bool: ("true or false", "BOOL")}


def value_type(key):
    """The type of a Key's values: its `kind`, else its default's (list[item] for a list)."""
    if key.kind is not None:
        return key.kind
    if isinstance(key.default, list):
        return list[type(key.default[0])]
    return type(key.default)


def _accepts(kind, value):
    if isinstance(kind, UnionType):  # a number, or a non-empty list of numbers
        return any(_accepts(option, value) and value != [] for option in get_args(kind))
    if get_origin(kind) is list:
        return isinstance(value, (list, tuple)) and all(_accepts(get_args(kind)[0], v) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def accepts(key, value):
    """Whether `value` is one of the values Key `key` takes."""
    if value is None:
        return key.default is None
    return _accepts(value_type(key), value) and (not key.choices or value in key.choices)


def _parse(kind, text):
    if isinstance(kind, UnionType):
        number, listed = get_args(kind)
        return _parse(listed if ITEM_SEPARATOR in text or "[" in text else number, text)
    if get_origin(kind) is list:
        items = text.replace("[", "").replace("]", "").split(ITEM_SEPARATOR)
        return [_parse(get_args(kind)[0], item) for item in items if item.strip()]
    if kind is bool:
        if text.lower() not in BOOLEAN_WORDS:
            raise ValueError(text)
        return BOOLEAN_WORDS[text.lower()]
    return kind(text)


def parse(key, text):
    """The value command-line `text` gives Key `key` (lists as 1,2,2; none for None). Raises
    ValueError."""
    if key.default is None and text.lower() == "none":
        return None
    value = _parse(value_type(key), text)
    if key.choices and value not in key.choices:
        raise ValueError(text)
    return value


def _kind_name(kind):
    if isinstance(kind, UnionType):
        return "a number or a list of numbers (0,1,3 on the command line)", "X[,X,...]"
    if get_origin(kind) is list:
        return "a list of integers (1,2,2 on the command line)", "N,N,..."
    return NAMES[kind]


def describe(key):
    """What Key `key` takes, for messages ("an integer or None") and its --help metavar."""
    if key.choices:
        name = " or ".join(map(repr, key.choices))
        metavar = "{" + ",".join(map(str, key.choices)) + "}"
    else:
        name, metavar = _kind_name(value_type(key))
    return (f"{name} or None" if key.default is None else name), metavar


def unknown_key_message(key, shown, keys, absent, where_keys_are_listed):
    """Why `key` (written `shown`: --key on the command line) is refused by a script whose keys
    are `keys`; `absent`: {key: why} of the keys it lacks on purpose."""
    if key in absent:
        return f"config key '{shown}' does not apply here: {absent[key]}."
    matches = difflib.get_close_matches(key, keys, n=1)
    closest = f" Did you mean '{matches[0]}'?" if matches else ""
    return f"unknown config key '{shown}'.{closest} {where_keys_are_listed}"


def defaults(keys, script_config=None):
    """Every key's default, as a script (whose modelConfig is `script_config`) has them."""
    return {**{key: spec.default for key, spec in keys.items()}, **(script_config or {})}


def complete(config, keys, absent=None):
    """`config` with the keys it leaves out set to their defaults, after checking that every key
    is known, of the right type and consistent with the others. Raises ConfigError."""
    for key in config:
        if key not in keys:
            raise ConfigError(unknown_key_message(key, key, keys, absent or {},
                                                  f"Known keys: {', '.join(keys)}."))
    config = {**defaults(keys), **config}
    for key, value in config.items():
        if not accepts(keys[key], value):
            raise ConfigError(f"config key '{key}' must be {describe(keys[key])[0]}, not {value!r}.")
    for check in CHECKS:
        message = check(config)
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


def _argument_type(key):
    def parse_argument(text):
        try:
            return parse(key, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe(key)[0]}, not {text!r}") from None
    parse_argument.__name__ = describe(key)[0]
    return parse_argument


def parse_command_line(script_config, keys, absent=None, argv=None, description=None):
    """The config of a script: the keys' defaults, overridden by the script's `script_config`,
    a --config JSON file, then --key value; --help lists every key. Exits with a message naming
    the key on an unknown key or a value of the wrong type."""
    shown = defaults(keys, script_config)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     usage="%(prog)s [--config FILE.json] [--key value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.json",
                        help="a JSON object of config keys, applied before the command line's")
    for key, spec in keys.items():
        parser.add_argument(f"--{key}", type=_argument_type(spec), default=argparse.SUPPRESS,
                            metavar=describe(spec)[1],
                            help=f"{spec.meaning} (default: {shown[key]!r})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        option = next((u for u in unknown if u.startswith("-")), unknown[0])
        key = option.lstrip("-").split("=")[0]
        parser.error(unknown_key_message(key, option, keys, absent or {}, "See --help for every key."))
    overrides = vars(args)
    config_file = overrides.pop("config")
    try:
        from_file = read_config_file(config_file) if config_file else {}
        return complete({**script_config, **from_file, **overrides}, keys, absent)
    except ConfigError as error:
        parser.error(str(error))
