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
import math
import os

import torch
from torch import nn

from Diffusion.Checkpoint import TIME_TABLE, load_tensors, save_atomically
from Diffusion.Config import ConfigError
from Diffusion.Model import AttnBlock, ResBlock, UNet

CHECKPOINT_NAME = "ckpt_official_.pt"
CONFIG_NAME = "config.json"

# What the weights do not say: the official schedule, the training dropout (unused by sampling),
# and the options of the official model, which a bare weights file is assumed to have.
OFFICIAL_SCHEDULE = {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02}
OFFICIAL_DROPOUT = 0.1
OFFICIAL_OPTIONS = {"group_norm_eps": 1e-6, "downsample_padding": "same", "img_size": 32,
                    "flip_sin_to_cos": False, "freq_shift": 1}

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# config.json values this UNet reproduces. Each first value is UNet2DModel's default, which a key
# an older config.json leaves out takes.
DIFFUSERS_REQUIRED = {
    "time_embedding_type": ("positional",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "norm_num_groups": (32,),
    "attn_norm_num_groups": (None, 32),
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "mid_block_type": ("UNetMidBlock2D",),
    "add_attention": (True,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "mid_block_scale_factor": (1,),
    "in_channels": (3,),
    "out_channels": (3,),
}
# UNet2DModel's defaults of the config.json keys that set this UNet's options.
DIFFUSERS_DEFAULTS = {"flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
                      "norm_eps": 1e-5, "attention_head_dim": 8, "sample_size": None,
                      "block_out_channels": (224, 448, 672, 896),
                      "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                      "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
DOWN_BLOCK_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type -> has attention
UP_BLOCK_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


def official_time_table(T, dim, flip_sin_to_cos=False, freq_shift=1):
    """The timestep embedding of t = 0..T-1 the official model was trained with: [T, dim].

    Row t holds sin(t w_0) .. sin(t w_{h-1}), then cos(t w_0) .. cos(t w_{h-1}), with h = dim / 2
    and w_i = 10000^(-i / (h - freq_shift)) (freq_shift 1 in the official code); flip_sin_to_cos
    puts the cos half first. Computed in float32 in the order of diffusers'
    get_timestep_embedding, so the imported model gives diffusers' outputs.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
    angles = torch.arange(T).float()[:, None] * torch.exp(exponent)[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([table[:, half:], table[:, :half]], dim=1) if flip_sin_to_cos else table


class SourceNames:
    """A naming scheme of the official model's modules, for a UNet of `levels` resolution levels:
    `block(path, level, j)` and `resample(path, level)` give the source's module names."""

    def __init__(self, levels):
        self.levels = levels


class DiffusersNames(SourceNames):
    """Module names of diffusers' UNet2DModel (models/unets/unet_2d.py): down_blocks[level],
    mid_block, up_blocks[levels - 1 - level]; attention projections are Linear [C, C]."""
    label = "diffusers' UNet2DModel"
    down = "down_blocks"
    time_mlp = ("time_embedding.linear_1", "time_embedding.linear_2")
    head, tail_norm, tail_conv = "conv_in", "conv_norm_out", "conv_out"
    resblock_parts = {"block1.0": "norm1", "block1.2": "conv1", "temb_proj.1": "time_emb_proj",
                      "block2.0": "norm2", "block2.3": "conv2", "shortcut": "conv_shortcut"}
    attn_parts = {"group_norm": "group_norm", "proj_q": "to_q", "proj_k": "to_k",
                  "proj_v": "to_v", "proj": "to_out.0"}

    def _level(self, path, level):
        return f"down_blocks.{level}" if path == "down" else f"up_blocks.{self.levels - 1 - level}"

    def block(self, path, level, j):
        """(ResBlock, attention) names of the j-th ResBlock of `level` on path down, mid or up."""
        if path == "mid":
            return f"mid_block.resnets.{j}", "mid_block.attentions.0"
        return f"{self._level(path, level)}.resnets.{j}", f"{self._level(path, level)}.attentions.{j}"

    def resample(self, path, level):
        """The conv of the down- or upsampler closing `level`."""
        return f"{self._level(path, level)}.{path}samplers.0.conv"


class PesserNames(SourceNames):
    """Module names of pesser/pytorch_diffusion's Model (the TensorFlow code's): down[level],
    mid, up[level], all 1x1 layers Conv2d."""
    label = "pesser/pytorch_diffusion's Model"
    down = "down"
    time_mlp = ("temb.dense.0", "temb.dense.1")
    head, tail_norm, tail_conv = "conv_in", "norm_out", "conv_out"
    resblock_parts = {"block1.0": "norm1", "block1.2": "conv1", "temb_proj.1": "temb_proj",
                      "block2.0": "norm2", "block2.3": "conv2", "shortcut": "nin_shortcut"}
    attn_parts = {"group_norm": "norm", "proj_q": "q", "proj_k": "k", "proj_v": "v",
                  "proj": "proj_out"}

    def block(self, path, level, j):
        """(ResBlock, attention) names of the j-th ResBlock of `level` on path down, mid or up."""
        if path == "mid":
            return f"mid.block_{j + 1}", "mid.attn_1"
        return f"{path}.{level}.block.{j}", f"{path}.{level}.attn.{j}"

    def resample(self, path, level):
        """The conv of the down- or upsampler closing `level`."""
        return f"{path}.{level}.{path}sample.conv"


def _has_prefix(keys, prefix):
    return any(key.startswith(prefix + ".") for key in keys)


def _count(predicate):
    """The first n >= 0 for which predicate(n) is false."""
    n = 0
    while predicate(n):
        n += 1
    return n


def _some(names, count=5):
    names = sorted(names)
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def names_of(tensors, source):
    """The naming scheme of `tensors` (DiffusersNames or PesserNames), told by their keys."""
    keys = tensors.keys()
    if "time_embedding.linear_1.weight" in keys:
        scheme = DiffusersNames
    elif "temb.dense.0.weight" in keys:
        scheme = PesserNames
    elif "head.weight" in keys and "time_embedding.timembedding.1.weight" in keys:
        raise ConfigError(f"{source!r} is already a checkpoint of this repo's UNet: sample from it "
                          f"with Main.py (save_weight_dir, test_load_weight) instead of importing it.")
    else:
        raise ConfigError(f"{source!r} is not the DDPM UNet in {DiffusersNames.label} or "
                          f"{PesserNames.label} names (its keys include {_some(keys)}): give "
                          f"google/ddpm-cifar10-32 or pesser's cifar10 checkpoint.")
    return scheme(_count(lambda level: _has_prefix(keys, f"{scheme.down}.{level}")))


def architecture_of(tensors, names, source):
    """channel, channel_mult, attn, num_res_blocks of the UNet whose tensors these are, read off
    the down path: the head conv's output channels, each level's first ResBlock conv1."""
    conv1 = names.resblock_parts["block1.2"]

    def conv1_of(level, j):
        return tensors.get(f"{names.block('down', level, j)[0]}.{conv1}.weight")

    head = tensors.get(f"{names.head}.weight")
    num_res_blocks = _count(lambda j: conv1_of(0, j) is not None)
    if head is None or names.levels == 0 or num_res_blocks == 0:
        raise ConfigError(f"{source!r} has {names.label}'s time embedding but no "
                          f"{names.head}.weight or no ResBlocks on its down path: it is not a "
                          f"model of this architecture.")
    channel = head.shape[0]
    if channel % 32:
        raise ConfigError(f"{source!r} has {channel} base channels; this repo's UNet needs a "
                          f"multiple of 32 (GroupNorm with 32 groups).")
    channel_mult = []
    for level in range(names.levels):
        first = conv1_of(level, 0)
        if first is None or first.shape[0] % channel:
            raise ConfigError(f"{source!r}: level {level} of the down path does not start with a "
                              f"ResBlock of a multiple of {channel} channels, as this repo's UNet "
                              f"needs.")
        channel_mult.append(first.shape[0] // channel)
    attn = [level for level in range(names.levels)
            if _has_prefix(tensors.keys(), names.block("down", level, 0)[1])]
    return {"channel": channel, "channel_mult": channel_mult, "attn": attn,
            "num_res_blocks": num_res_blocks}


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
        problems = ([f"{len(unused)} of its tensors fit nowhere ({_some(unused)})"] if unused else []) + \
                   ([f"{len(missing)} tensors are missing ({_some(missing)})"] if missing else [])
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
                          f"with {describe(architecture)} needs: {_some(wrong)}.")
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


def _setting(config, key):
    """config.json's value of `key`, or UNet2DModel's default where an older file leaves it out."""
    return config.get(key, DIFFUSERS_DEFAULTS[key])


def _check_block_types(config, source):
    """The attention levels, after checking the block types are ones this UNet has and that the
    up path has attention at the same levels as the down path."""
    down_types, up_types = _setting(config, "down_block_types"), _setting(config, "up_block_types")
    unknown = [t for t in down_types if t not in DOWN_BLOCK_TYPES] + \
              [t for t in up_types if t not in UP_BLOCK_TYPES]
    if unknown:
        raise ConfigError(f"{source!r} has block type {unknown[0]}; this repo's UNet has only "
                          f"{', '.join([*DOWN_BLOCK_TYPES, *UP_BLOCK_TYPES])}.")
    down_attn = [level for level, t in enumerate(down_types) if DOWN_BLOCK_TYPES[t]]
    up_attn = [level for level, t in enumerate(reversed(up_types)) if UP_BLOCK_TYPES[t]]
    if down_attn != up_attn:
        raise ConfigError(f"{source!r} has attention at levels {down_attn} going down but "
                          f"{up_attn} going up; this repo's UNet has it at the same levels.")
    return down_attn


def _check_single_head(config, attn, source):
    """diffusers splits attention into block_out_channels // attention_head_dim heads; ours
    has one head, so attention_head_dim must be null or every attention block's width."""
    head_dim = _setting(config, "attention_head_dim")
    channels = _setting(config, "block_out_channels")
    widths = {channels[level] for level in attn} | {channels[-1]}  # the middle has attention too
    if head_dim is not None and widths != {head_dim}:
        raise ConfigError(f"{source!r} has attention_head_dim {head_dim}, i.e. multi-head attention "
                          f"over {sorted(widths)} channels; this repo's UNet has single-head "
                          f"attention (attention_head_dim null).")


def options_of_diffusers_config(config, source):
    """This UNet's options (and the time table's) from a UNet2DModel config.json, after checking
    it describes a model this UNet reproduces."""
    if config.get("_class_name") != "UNet2DModel":
        held = config.get("_class_name", "model of no known class")
        raise ConfigError(f"{source!r} holds a {held}, not a UNet2DModel: only the DDPM UNet "
                          f"converts.")
    for key, accepted in DIFFUSERS_REQUIRED.items():
        value = config.get(key, accepted[0])
        if value not in accepted:
            raise ConfigError(f"{source!r} has {key} {value!r}; this repo's UNet reproduces only "
                              f"{' or '.join(repr(a) for a in accepted)}.")
    _check_single_head(config, _check_block_types(config, source), source)
    padding = _setting(config, "downsample_padding")
    if padding not in (0, 1):
        raise ConfigError(f"{source!r} has downsample_padding {padding}; only 0 (TensorFlow's "
                          f"SAME) and 1 (symmetric) convert.")
    sample_size = _setting(config, "sample_size")
    if isinstance(sample_size, (list, tuple)):  # (height, width)
        sample_size = sample_size[0]
    return {"group_norm_eps": _setting(config, "norm_eps"),
            "downsample_padding": "same" if padding == 0 else "symmetric",
            "img_size": sample_size or OFFICIAL_OPTIONS["img_size"],
            "flip_sin_to_cos": _setting(config, "flip_sin_to_cos"),
            "freq_shift": _setting(config, "freq_shift")}


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
