"""Checkpoints: `ckpt_{epoch}_.pt` holds a plain state_dict, the original's format, so that its
published checkpoints and ours are interchangeable. `training_state.pt` beside them holds what
continuing a run needs besides the weights: the optimizer's state, and which checkpoint it goes with.

Files are written to a temporary name and renamed, so an interrupted save never leaves a
truncated checkpoint; everything is read with `weights_only=True`, which runs no code.
"""
import json
import os
import re

import torch

from Diffusion.Config import ConfigError

TRAINING_STATE = "training_state.pt"
RUN_INFO = "run.json"
TIME_TABLE = "time_embedding.timembedding.0.weight"  # [T, channel]
CLASS_TABLE = "cond_embedding.condEmbedding.0.weight"  # [num_labels + 1, channel], conditional only
_CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)_\.pt$")


def checkpoint_name(epoch):
    return f"ckpt_{epoch}_.pt"


def epoch_of(name):
    """The epoch in a checkpoint's name ("ckpt_12_.pt" -> 12), or None."""
    match = _CHECKPOINT_NAME.search(name)
    return int(match.group(1)) if match else None


def save_atomically(obj, path):
    """torch.save to `path` through a temporary file, so `path` is never half written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp"
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_run_info(folder, **entries):
    """Merge `entries` into folder/run.json, what eval needs to know of the run."""
    info = {**read_run_info(folder), **entries}
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f"{RUN_INFO}.tmp")
    with open(temporary, "w") as file:
        json.dump(info, file, indent=1)
    os.replace(temporary, os.path.join(folder, RUN_INFO))


def read_run_info(folder):
    """folder/run.json as a dict; {} when there is none or it cannot be read."""
    try:
        with open(os.path.join(folder, RUN_INFO)) as file:
            info = json.load(file)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def list_checkpoints(folder):
    """The ckpt_{epoch}_.pt files in `folder`, oldest epoch first."""
    if not os.path.isdir(folder):
        return []
    return sorted((name for name in os.listdir(folder) if epoch_of(name) is not None), key=epoch_of)


def _load_failure(error):
    """Why torch.load(weights_only=True) failed, in one line."""
    if "Unsupported global" in str(error):  # the file pickles objects, not only tensors
        return ("it holds pickled Python objects besides tensors (a whole saved model?), which "
                "cannot be loaded without running code from it; save its state_dict() instead")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"it is not a torch weights file, or it is truncated ({type(error).__name__}: {first_line})"


def safe_load(path, device):
    """What torch.save wrote to `path`, read with weights_only=True (no code from the file
    runs); a file that cannot be read raises a ConfigError saying why."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ConfigError(f"{path!r} cannot be read: {_load_failure(error)}.") from None


def load_tensors(path, device):
    """The name -> tensor dict that torch.save wrote to `path`, read with weights_only=True;
    anything else raises a ConfigError saying why."""
    tensors = safe_load(path, device)
    if not isinstance(tensors, dict) or not all(torch.is_tensor(value) for value in tensors.values()):
        raise ConfigError(f"{path!r} does not hold a plain state_dict (name -> tensor), as "
                          f"ckpt_*_.pt files do.")
    return tensors


def read_state_dict(folder, name, device):
    """The state_dict in folder/name. A missing file raises a ConfigError listing those there."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        present = list_checkpoints(folder)
        there = f"the checkpoints there are: {', '.join(present)}" if present else \
            f"there are no checkpoints in {folder!r}: train first, or point to another folder"
        raise ConfigError(f"checkpoint {path!r} does not exist; {there}.")
    return load_tensors(path, device)


def num_labels_of(state_dict):
    """The classes of a conditional model's state_dict; None for the unconditional model's."""
    return state_dict[CLASS_TABLE].shape[0] - 1 if CLASS_TABLE in state_dict else None


def unet_config_of(state_dict):
    """The UNet config a state_dict was saved from (T, channel, channel_mult, num_res_blocks;
    attn, or num_labels for the conditional model), for messages about a checkpoint that does
    not fit. Reads the down path: ResBlocks, with a downsampler closing each level but the last."""
    found = {"T": state_dict[TIME_TABLE].shape[0],
             "channel": state_dict["head.weight"].shape[0]}
    channel_mult, attn, blocks_in_level, index = [], [], 0, 0
    while any(key.startswith(f"downblocks.{index}.") for key in state_dict):
        prefix = f"downblocks.{index}."
        if f"{prefix}block1.2.weight" not in state_dict:
            blocks_in_level = 0
        else:
            if blocks_in_level == 0:
                channel_mult.append(state_dict[f"{prefix}block1.2.weight"].shape[0] // found["channel"])
                if f"{prefix}attn.proj.weight" in state_dict:
                    attn.append(len(channel_mult) - 1)
            blocks_in_level += 1
        index += 1
    found["channel_mult"] = channel_mult
    found["num_res_blocks"] = blocks_in_level
    if num_labels_of(state_dict) is None:
        found["attn"] = attn
    else:
        found["num_labels"] = num_labels_of(state_dict)
    return found


def _as_list(value):
    return list(value) if isinstance(value, tuple) else value


def describe_mismatch(state_dict, model, config):
    """Why a state_dict does not load into `model` built from `config`, and what to change."""
    has_class_embedding = num_labels_of(state_dict) is not None
    wants_class_embedding = hasattr(model, "cond_embedding")
    if has_class_embedding and not wants_class_embedding:
        return ("it is a checkpoint of the class-conditional model (it has a class embedding): "
                "sample from it with MainCondition.py, or give a checkpoint of Main.py's model")
    if wants_class_embedding and not has_class_embedding:
        return ("it is a checkpoint of the unconditional model (no class embedding): sample from "
                "it with Main.py, or give a checkpoint of MainCondition.py's model")
    try:
        found = unet_config_of(state_dict)
    except KeyError as missing:
        return f"it is not a checkpoint of this repo's UNet (it has no {missing})"
    differing = [f"{key} {found[key]} (config: {config[key]})" for key in found
                 if key in config and found[key] != _as_list(config[key])]
    if differing:
        return "it was trained with " + ", ".join(differing) + ": set these keys to match"
    return "its tensors do not match the model's; check channel_mult, attn and num_res_blocks"


def load_into(model, state_dict, path, config):
    """model.load_state_dict(state_dict, strict=True); a state_dict that does not fit raises a
    ConfigError naming the config keys that probably differ."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        reason = describe_mismatch(state_dict, model, config)
        raise ConfigError(f"checkpoint {path!r} does not fit the model of this config: "
                          f"{reason}.") from None


def load_weights(model, folder, name, config, device):
    """Load the checkpoint folder/name into `model` (see read_state_dict and load_into)."""
    load_into(model, read_state_dict(folder, name, device), os.path.join(folder, name), config)
