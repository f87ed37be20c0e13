"""The official DDPM models as their PyTorch forms describe them: the names of its modules and
what its tensors and diffusers' config.json say about it.

Its two naming schemes, diffusers' UNet2DModel and pesser/pytorch_diffusion's (the TensorFlow
code's), give the source's name of every block of this repo's UNet. A state dict's keys tell its
scheme, and its tensors tell the architecture: channel, channel_mult, attn and num_res_blocks. A
UNet2DModel config.json gives the options, after checking it describes a model this UNet
reproduces; a bare weights file is assumed to have the official model's options. The official
time-embedding table, which the source does not store, is computed here.
"""
import math

import torch

from Diffusion.Run.Config import ConfigError

# The options of the official models, which a bare weights file is assumed to have since the
# weights do not say; its image size (None) is the released model's of its architecture.
OFFICIAL_OPTIONS = {"group_norm_eps": 1e-6, "downsample_padding": "same", "img_size": None,
                    "flip_sin_to_cos": False, "freq_shift": 1}


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


def interleaved_order(dim):
    """[dim]: column j of this repo's interleaved table (Model.sinusoidal_table: sin w_0, cos w_0,
    sin w_1, ...) is column order[j] of diffusers' table of the same frequencies, sines then
    cosines (flip_sin_to_cos false, freq_shift 0). The first Linear after the table takes its
    input columns in the same order: W_ours = W_diffusers[:, order]."""
    half = dim // 2
    return torch.stack([torch.arange(half), half + torch.arange(half)], dim=1).flatten()


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


def some_of(names, count=5):
    """The first `count` of `names`, sorted, and how many more: for messages."""
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
                          f"{PesserNames.label} names (its keys include {some_of(keys)}): give "
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
            "img_size": sample_size,
            "flip_sin_to_cos": _setting(config, "flip_sin_to_cos"),
            "freq_shift": _setting(config, "freq_shift")}
