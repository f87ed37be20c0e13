"""Importing the DDPM authors' released models into this repo's UNet: CIFAR-10 at 32x32 (FID
3.17) and CelebA-HQ, LSUN church, bedroom and cat at 256x256, each with EMA and raw weights.

They are public in two PyTorch forms, both read here:

- diffusers' `google/ddpm-*` (e.g. google/ddpm-cifar10-32, google/ddpm-ema-church-256): a
  UNet2DModel folder, config.json beside diffusion_pytorch_model.safetensors (or .bin), with
  the DDPMScheduler's scheduler_config.json beside it or in scheduler/;
- pesser/pytorch_diffusion's converted checkpoints: a plain state dict in the TensorFlow code's
  names (down.0.block.0.conv1, mid.attn_1.q, ...).

The architecture is this repo's UNet with three differences: GroupNorm epsilon 1e-6
(group_norm_eps), TensorFlow's SAME padding before each stride-2 conv, i.e. one row and column
after only (downsample_padding "same"), and its time-embedding table (sin half then cos half),
which is part of our checkpoint. Importing renames every tensor to ours: our UNet is walked block by
block and the source's naming scheme gives the name of each module; every source tensor must be
used exactly once. The architecture is read from the tensors; the image size from the folder's
config.json, else from the released model of that architecture (RELEASED), else it must be
given. Files are read without running code from them.
"""
import json
import os
from pathlib import Path

import torch
from torch import nn

from Conversion.SchedulerConfig import SCHEDULER_CONFIG, SCHEDULER_FOLDER, keys_of_scheduler_config
from Conversion.SourceNames import (
    OFFICIAL_OPTIONS,
    architecture_of,
    interleaved_order,
    names_of,
    official_time_table,
    options_of_diffusers_config,
    some_of,
)
from Diffusion.Model import AttnBlock, ResBlock, UNet, sinusoidal_table
from Diffusion.Run.Checkpoints import (DIFFUSION_KEYS, TIME_TABLE, diffusion_of, load_tensors,
                                       save_atomically, write_atomically, write_run_info)
from Diffusion.Run.Config import ConfigError

CHECKPOINT_NAME = "ckpt_official_.pt"
CONFIG_NAME = "config.json"

# What the weights do not say: the official schedule and the training dropout (unused by sampling).
OFFICIAL_SCHEDULE = {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02}
OFFICIAL_DROPOUT = 0.1
FIRST_LINEAR = "time_embedding.timembedding.1.weight"  # [4 channel, channel], after the table

# The DDPM authors' released models, told apart by their architecture, and what their weights do
# not say: the image size, the training dropout and sigma_t^2 of their own run scripts, and for
# the 256x256 models an eval batch that samples in a few GB. CelebA-HQ and the three LSUN models
# share one architecture.
RELEASED = (
    ({"channel": 128, "channel_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 2},
     {"img_size": 32, "dropout": 0.1, "variance": "fixedlarge"}),
    ({"channel": 128, "channel_mult": [1, 1, 2, 2, 4, 4], "attn": [4], "num_res_blocks": 2},
     {"img_size": 256, "dropout": 0.0, "variance": "fixedsmall", "batch_size": 16, "nrow": 4}),
)

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _resblock_names(ours, block, resblock, attention, names):
    """Our module name -> the source's, for one ResBlock (and its attention)."""
    pairs = {f"{ours}.{part}": f"{resblock}.{theirs}" for part, theirs in names.resblock_parts.items()
             if part != "shortcut" or isinstance(block.shortcut, nn.Conv2d)}
    if isinstance(block.attn, AttnBlock):
        pairs.update({f"{ours}.attn.{part}": f"{attention}.{theirs}"
                      for part, theirs in names.attn_parts.items()})
    return pairs


def module_names(model, names):
    """Our module name -> the source's, for every module of `model` with weights. The down path
    is walked from level 0 up and the up path from the last level down; a down- or upsampler
    closes a level."""
    pairs = {"time_embedding.timembedding.1": names.time_mlp[0],
             "time_embedding.timembedding.3": names.time_mlp[1],
             "head": names.head, "tail.0": names.tail_norm, "tail.2": names.tail_conv}
    for path, blocks, level, step in (("down", model.downblocks, 0, 1),
                                      ("up", model.upblocks, names.levels - 1, -1)):
        j = 0
        for index, block in enumerate(blocks):
            ours = f"{path}blocks.{index}"
            if isinstance(block, ResBlock):
                pairs.update(_resblock_names(ours, block, *names.block(path, level, j), names))
                j += 1
            else:
                pairs[f"{ours}.main"] = names.resample(path, level)
                level, j = level + step, 0
    for j, block in enumerate(model.middleblocks):
        pairs.update(_resblock_names(f"middleblocks.{j}", block, *names.block("mid", 0, j), names))
    return pairs


def tensor_mapping(model, names):
    """Our state_dict key -> the source's key, for every tensor of `model` but the time-embedding
    table (which the source does not store)."""
    modules = module_names(model, names)
    mapping = {}
    for key in model.state_dict():
        if key != TIME_TABLE:
            module, tensor = key.rsplit(".", 1)
            mapping[key] = f"{modules[module]}.{tensor}"
    return mapping


def describe(architecture):
    """"channel 128, channel_mult [1, 2, 2, 2], ..." for messages."""
    return ", ".join(f"{key} {value}" for key, value in architecture.items())


def _check_coverage(tensors, mapping, architecture, names, source):
    wanted = set(mapping.values())
    missing, unused = wanted - tensors.keys(), tensors.keys() - wanted
    if missing or unused:
        problems = ([f"{len(unused)} of its tensors fit nowhere ({some_of(unused)})"] if unused else []) + \
                   ([f"{len(missing)} tensors are missing ({some_of(missing)})"] if missing else [])
        raise ConfigError(f"{source!r} does not fit the DDPM UNet in {names.label} names with "
                          f"{describe(architecture)} (read from its tensors): {'; '.join(problems)}. It is a "
                          f"model of another architecture or an incomplete file; only the DDPM "
                          f"UNet converts.")


def _as_shape(tensor, shape):
    """`tensor` as float32 of `shape`; a Linear weight [C, C] becomes a 1x1 conv's [C, C, 1, 1].
    None where the shapes do not fit."""
    if tensor.shape == shape:
        return tensor.float()
    if tensor.dim() == 2 and shape == (*tensor.shape, 1, 1):
        return tensor.float().reshape(shape)
    return None


def renamed(tensors, model, names, architecture, source):
    """`tensors` renamed to `model`'s state_dict keys, each used exactly once; raises a
    ConfigError naming the tensors that are left over, missing or of the wrong shape."""
    mapping = tensor_mapping(model, names)
    _check_coverage(tensors, mapping, architecture, names, source)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    state_dict = {ours: _as_shape(tensors[theirs], shapes[ours]) for ours, theirs in mapping.items()}
    wrong = [f"{mapping[key]} {list(tensors[mapping[key]].shape)} (needs {list(shapes[key])})"
             for key, value in state_dict.items() if value is None]
    if wrong:
        raise ConfigError(f"{source!r}: {len(wrong)} tensors do not have the shape this repo's UNet "
                          f"with {describe(architecture)} needs: {some_of(wrong)}.")
    return state_dict


def read_tensors(path):
    """The name -> tensor dict in a weights file: .safetensors, or a torch.save file (.bin, .pt,
    .ckpt) read with weights_only=True, which runs no code from it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path!r} does not exist: give a diffusers model folder or a weights file.")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"reading {path!r} needs the safetensors package: pip install "
                              f"safetensors (it is in requirements.txt).") from None
        try:
            return load_file(path, device="cpu")
        except Exception as error:  # a truncated or foreign file
            raise ConfigError(f"{path!r} is not a readable .safetensors file ({error}).") from None
    return load_tensors(path, "cpu")


def _diffusers_model_folder(folder):
    """`folder`, or its unet/ subfolder (a pipeline's layout), whichever holds the config.json."""
    for candidate in (folder, os.path.join(folder, "unet")):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    raise ConfigError(f"{folder!r} has no config.json (nor unet/config.json): give a diffusers "
                      f"UNet2DModel folder, such as a download of google/ddpm-cifar10-32.")


def read_diffusers_folder(folder):
    """(tensors, options) of a diffusers UNet2DModel folder: config.json and
    diffusion_pytorch_model.safetensors (or .bin)."""
    model_folder = _diffusers_model_folder(folder)
    try:
        with open(os.path.join(model_folder, CONFIG_NAME)) as file:
            config = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {model_folder}/config.json: {error}.") from None
    options = options_of_diffusers_config(config, model_folder)
    for name in DIFFUSERS_WEIGHTS:
        path = os.path.join(model_folder, name)
        if os.path.isfile(path):
            return read_tensors(path), options
    raise ConfigError(f"{model_folder!r} has config.json but no {' or '.join(DIFFUSERS_WEIGHTS)}: "
                      f"download the weights too.")


def released_settings(architecture):
    """RELEASED's settings of the released model of `architecture` ({} for any other)."""
    return next((settings for released, settings in RELEASED if released == architecture), {})


def image_size(architecture, given, source):
    """The image size: `given` (from the command line or the folder's config.json), else the
    released model's of this architecture; checked to halve evenly at every level."""
    size = given or released_settings(architecture).get("img_size")
    if size is None:
        raise ConfigError(f"{source!r} holds a UNet with {describe(architecture)}, which is none of "
                          f"the DDPM authors' released models and has no config.json, so its image "
                          f"size cannot be known: give it with --img_size.")
    halvings = 2 ** (len(architecture["channel_mult"]) - 1)
    if size % halvings:
        raise ConfigError(f"img_size {size} is not a multiple of {halvings}, as the "
                          f"{len(architecture['channel_mult'])} levels of {source!r} need (each "
                          f"but the last halves it): give a multiple of {halvings}.")
    return size


def time_table(state_dict, T, channel, flip_sin_to_cos, freq_shift):
    """Put the source's time-embedding table into state_dict. The table of flip_sin_to_cos false
    and freq_shift 0 is this repo's own in another column order (what ExportWeights.py writes):
    it becomes ours, and the first Linear's columns are reordered to match, so that an exported
    model comes back as the same state dict."""
    if not flip_sin_to_cos and freq_shift == 0:
        state_dict[TIME_TABLE] = sinusoidal_table(T, channel)
        state_dict[FIRST_LINEAR] = state_dict[FIRST_LINEAR][:, interleaved_order(channel)].contiguous()
    else:
        state_dict[TIME_TABLE] = official_time_table(T, channel, flip_sin_to_cos, freq_shift)


def convert(tensors, options=None, source="the weights", T=OFFICIAL_SCHEDULE["T"], img_size=None,
            schedule=None):
    """(state_dict, config) of this repo's UNet holding `tensors`, a state dict in diffusers' or
    pesser's names. options: group_norm_eps, downsample_padding, img_size, flip_sin_to_cos,
    freq_shift (default: the official model's). T: the diffusion steps the model was trained
    with, the rows of the time table. img_size: overrides the options'. schedule: the keys a
    DDPMScheduler config gave (T, betas, variance, ...). The state_dict is checked by a strict
    load."""
    options = {**OFFICIAL_OPTIONS, **(options or {})}
    names = names_of(tensors, source)
    architecture = architecture_of(tensors, names, source)
    released = released_settings(architecture)
    dropout = released.get("dropout", OFFICIAL_DROPOUT)
    with torch.device("meta"):  # its names and shapes, without the seconds of initialising 114M weights
        model = UNet(T, architecture["channel"], architecture["channel_mult"], architecture["attn"],
                     architecture["num_res_blocks"], dropout, options["group_norm_eps"],
                     options["downsample_padding"])
    state_dict = renamed(tensors, model, names, architecture, source)
    time_table(state_dict, T, architecture["channel"], options["flip_sin_to_cos"], options["freq_shift"])
    model.load_state_dict(state_dict, strict=True, assign=True)  # checks every key and shape
    size = image_size(architecture, img_size or options["img_size"], source)
    eval_batch = {key: released[key] for key in ("batch_size", "nrow") if key in released}
    config = {"state": "eval", **OFFICIAL_SCHEDULE, "T": T, **architecture,
              "dropout": dropout, "img_size": size, "img_channels": 3,
              "group_norm_eps": options["group_norm_eps"],
              "downsample_padding": options["downsample_padding"], "clip_denoised": True,
              "variance": released.get("variance", "fixedlarge"), **eval_batch, **(schedule or {})}
    return state_dict, config


def read_scheduler(folder):
    """This repo's schedule keys from the DDPMScheduler config.json beside a UNet2DModel folder
    (folder/scheduler_config.json, or a pipeline's scheduler/); {} where there is none."""
    parent = os.path.dirname(os.path.abspath(folder))
    for path in (os.path.join(folder, SCHEDULER_CONFIG), os.path.join(folder, SCHEDULER_FOLDER, SCHEDULER_CONFIG),
                 os.path.join(parent, SCHEDULER_FOLDER, SCHEDULER_CONFIG)):
        if os.path.isfile(path):
            try:
                with open(path) as file:
                    return keys_of_scheduler_config(json.load(file), path)
            except (OSError, json.JSONDecodeError) as error:
                raise ConfigError(f"cannot read {path}: {error}.") from None
    return {}


def import_weights(source, T=None, img_size=None):
    """(state_dict, config) of this repo's UNet from `source`: a diffusers UNet2DModel folder
    (with its scheduler's settings where it has them), or a weights file in diffusers' or
    pesser's names (assumed to have the official model's options, since a bare file does not
    say). T: as in `convert` (None: the scheduler's, else 1000). img_size: as in `convert`."""
    if T is not None and T < 1:
        raise ConfigError(f"T is the number of diffusion steps, at least 1, not {T}.")
    if img_size is not None and img_size < 1:
        raise ConfigError(f"img_size is the images' height and width in pixels, not {img_size}.")
    if os.path.isdir(source):
        tensors, options = read_diffusers_folder(source)
        schedule = read_scheduler(_diffusers_model_folder(source))
        if T is not None:
            schedule["T"] = T
        return convert(tensors, options, source, schedule.get("T", OFFICIAL_SCHEDULE["T"]), img_size, schedule)
    return convert(read_tensors(source), source=source, T=T or OFFICIAL_SCHEDULE["T"], img_size=img_size)


def write_imported(state_dict, config, folder):
    """folder/ckpt_official_.pt (the state_dict) and folder/config.json (config, pointing
    save_weight_dir and test_load_weight at the checkpoint). Returns both paths."""
    checkpoint = os.path.join(folder, CHECKPOINT_NAME)
    save_atomically(state_dict, checkpoint)
    config_path = os.path.join(folder, CONFIG_NAME)
    text = json.dumps({**config, "save_weight_dir": folder, "test_load_weight": CHECKPOINT_NAME}, indent=2)
    write_atomically(lambda temporary: Path(temporary).write_text(text + "\n"), config_path)
    # What the outputs mean (beta_schedule, prediction), which eval checks against its config.
    write_run_info(folder, **diffusion_of({**DIFFUSION_KEYS, **config}))
    return checkpoint, config_path
