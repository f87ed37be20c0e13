"""Importing the DDPM authors' own CIFAR-10 model (FID 3.17) into this repo's UNet.

Its TensorFlow checkpoint is public in two PyTorch forms, both read here:

- diffusers' `google/ddpm-cifar10-32`: a UNet2DModel folder, config.json beside
  diffusion_pytorch_model.safetensors (or .bin);
- pesser/pytorch_diffusion's converted checkpoint: a plain state dict in the TensorFlow code's
  names (down.0.block.0.conv1, mid.attn_1.q, ...).

The architecture is this repo's UNet with three differences: GroupNorm epsilon 1e-6
(group_norm_eps), TensorFlow's SAME padding before each stride-2 conv, i.e. one row and column
after only (downsample_padding "same"), and its time-embedding table (sin half then cos half),
which is part of our checkpoint. Importing renames every tensor to ours: our UNet is walked block by
block and the source's naming scheme gives the name of each module; every source tensor must be
used exactly once. Files are read without running code from them.
"""
import json
import os

from torch import nn

from Conversion.SourceNames import (
    OFFICIAL_OPTIONS,
    architecture_of,
    names_of,
    official_time_table,
    options_of_diffusers_config,
    some_of,
)
from Diffusion.Model import AttnBlock, ResBlock, UNet
from Diffusion.Run.Checkpoints import TIME_TABLE, load_tensors, save_atomically
from Diffusion.Run.Config import ConfigError

CHECKPOINT_NAME = "ckpt_official_.pt"
CONFIG_NAME = "config.json"

# What the weights do not say: the official schedule and the training dropout (unused by sampling).
OFFICIAL_SCHEDULE = {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02}
OFFICIAL_DROPOUT = 0.1

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


def convert(tensors, options=None, source="the weights", T=OFFICIAL_SCHEDULE["T"]):
    """(state_dict, config) of this repo's UNet holding `tensors`, a state dict in diffusers' or
    pesser's names. options: group_norm_eps, downsample_padding, img_size, flip_sin_to_cos,
    freq_shift (default: the official model's). T: the diffusion steps the model was trained
    with, the rows of the time table. The state_dict is checked by a strict load."""
    options = {**OFFICIAL_OPTIONS, **(options or {})}
    names = names_of(tensors, source)
    architecture = architecture_of(tensors, names, source)
    model = UNet(T, architecture["channel"], architecture["channel_mult"], architecture["attn"],
                 architecture["num_res_blocks"], OFFICIAL_DROPOUT, options["group_norm_eps"],
                 options["downsample_padding"])
    state_dict = renamed(tensors, model, names, architecture, source)
    state_dict[TIME_TABLE] = official_time_table(T, architecture["channel"],
                                                options["flip_sin_to_cos"], options["freq_shift"])
    model.load_state_dict(state_dict, strict=True)
    config = {"state": "eval", **OFFICIAL_SCHEDULE, "T": T, **architecture,
              "dropout": OFFICIAL_DROPOUT, "img_size": options["img_size"], "img_channels": 3,
              "group_norm_eps": options["group_norm_eps"],
              "downsample_padding": options["downsample_padding"], "clip_denoised": True}
    return state_dict, config


def import_weights(source, T=OFFICIAL_SCHEDULE["T"]):
    """(state_dict, config) of this repo's UNet from `source`: a diffusers UNet2DModel folder,
    or a weights file in diffusers' or pesser's names (assumed to have the official model's
    options, since a bare file does not say). T: as in `convert`."""
    if T < 1:
        raise ConfigError(f"T is the number of diffusion steps, at least 1, not {T}.")
    if os.path.isdir(source):
        tensors, options = read_diffusers_folder(source)
        return convert(tensors, options, source, T)
    return convert(read_tensors(source), source=source, T=T)


def write_imported(state_dict, config, folder):
    """folder/ckpt_official_.pt (the state_dict) and folder/config.json (config, pointing
    save_weight_dir and test_load_weight at the checkpoint). Returns both paths."""
    checkpoint = os.path.join(folder, CHECKPOINT_NAME)
    save_atomically(state_dict, checkpoint)
    config_path = os.path.join(folder, CONFIG_NAME)
    with open(config_path, "w") as file:
        json.dump({**config, "save_weight_dir": folder, "test_load_weight": CHECKPOINT_NAME},
                  file, indent=2)
        file.write("\n")
    return checkpoint, config_path
