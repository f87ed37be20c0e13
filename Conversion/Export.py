"""Exporting this repo's unconditional model to diffusers: a folder that
`diffusers.DDPMPipeline.from_pretrained(folder)` loads, `unet/` (a UNet2DModel) and `scheduler/`
(a DDPMScheduler with the run's schedule, sigma_t^2, clipping and prediction).

It is Import.py run backwards: the same walk of our UNet gives each tensor's diffusers name.
UNet2DModel expresses this UNet exactly: GroupNorm's epsilon is its norm_eps, the symmetric and
TensorFlow SAME paddings its downsample_padding 1 and 0, single-head attention its
attention_head_dim null. Our time-embedding table is one of diffusers' sinusoidal tables: the
official one (exported as it is), or this repo's own interleaved sin/cos, which is diffusers'
flip_sin_to_cos false, freq_shift 0 with its columns in another order (the first Linear's
columns are reordered to match). Anything else, and the class-conditional model, is refused
with the key that stops it: nothing is exported approximately.
"""
import json
import os
from pathlib import Path

import torch

from Conversion.Import import tensor_mapping
from Conversion.SchedulerConfig import SCHEDULER_CONFIG, SCHEDULER_FOLDER, scheduler_config_of
from Conversion.SourceNames import DiffusersNames, interleaved_order, official_time_table
from Diffusion.Model import sinusoidal_table
from Diffusion.Run.Checkpoints import CLASS_TABLE, TIME_TABLE, write_atomically
from Diffusion.Run.Config import ConfigError

UNET_FOLDER = "unet"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers' time tables (flip_sin_to_cos, freq_shift): the official model's first.
DIFFUSERS_TIME_TABLES = ((False, 1), (True, 0), (True, 1), (False, 0))


def time_embedding_of(table):
    """(flip_sin_to_cos, freq_shift, column order or None) of diffusers' timestep embedding that
    equals `table` [T, dim], the checkpoint's; refused when none does."""
    T, dim = table.shape
    if torch.equal(table, sinusoidal_table(T, dim)):
        return False, 0, interleaved_order(dim)
    for flip_sin_to_cos, freq_shift in DIFFUSERS_TIME_TABLES:
        if torch.equal(table, official_time_table(T, dim, flip_sin_to_cos, freq_shift)):
            return flip_sin_to_cos, freq_shift, None
    raise ConfigError(f"{TIME_TABLE} is not a sinusoidal table that UNet2DModel computes (neither "
                      f"this repo's nor one of diffusers' get_timestep_embedding), so the model "
                      f"cannot be exported exactly.")


def unet_config_of(config, flip_sin_to_cos, freq_shift):
    """The UNet2DModel config.json of this repo's UNet that `config` describes."""
    levels = range(len(config["channel_mult"]))
    return {"_class_name": "UNet2DModel", "sample_size": config["img_size"],
            "in_channels": config["img_channels"], "out_channels": config["img_channels"],
            "block_out_channels": [config["channel"] * mult for mult in config["channel_mult"]],
            "layers_per_block": config["num_res_blocks"],
            "down_block_types": ["AttnDownBlock2D" if level in config["attn"] else "DownBlock2D" for level in levels],
            "up_block_types": ["AttnUpBlock2D" if level in config["attn"] else "UpBlock2D" for level in reversed(levels)],
            "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": config["group_norm_eps"],
            "downsample_padding": 0 if config["downsample_padding"] == "same" else 1,
            "flip_sin_to_cos": flip_sin_to_cos, "freq_shift": freq_shift, "act_fn": "silu",
            "time_embedding_type": "positional", "center_input_sample": False,
            "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "add_attention": True,
            "dropout": config["dropout"]}


def diffusers_tensors(state_dict, model, levels):
    """`state_dict` of `model` (this repo's UNet of `levels` resolution levels) in UNet2DModel's
    names and shapes: a 1x1 conv [C, C, 1, 1] of the attention becomes its Linear [C, C]."""
    tensors = {}
    for ours, theirs in tensor_mapping(model, DiffusersNames(levels)).items():
        tensor = state_dict[ours].float()
        attention_weight = ".attn.proj" in ours and ours.endswith(".weight")  # proj_q, proj_k, proj_v, proj
        tensors[theirs] = tensor.flatten(1) if attention_weight else tensor
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def refuse_the_conditional_model(state_dict):
    if CLASS_TABLE in state_dict:
        raise ConfigError(f"the class-conditional model cannot be exported exactly: each of its "
                          f"ResBlocks projects the class embedding ({CLASS_TABLE}) by its own "
                          f"Swish and Linear (cond_proj) beside the time one, whereas UNet2DModel "
                          f"adds its class embedding to the time embedding before one shared "
                          f"projection.")


def export_to_diffusers(state_dict, config, model, folder):
    """Write folder/unet (config.json, the weights as safetensors), folder/scheduler and
    folder/model_index.json: a DDPMPipeline of `state_dict` (of `model`, this repo's UNet built
    from `config`). Refuses, before writing anything, what UNet2DModel cannot express exactly."""
    refuse_the_conditional_model(state_dict)
    flip_sin_to_cos, freq_shift, order = time_embedding_of(state_dict[TIME_TABLE].float().cpu())
    scheduler = scheduler_config_of(config)
    tensors = diffusers_tensors({key: value.cpu() for key, value in state_dict.items()}, model,
                                len(config["channel_mult"]))
    if order is not None:  # our interleaved columns back to diffusers' sines-then-cosines
        first_linear = f"{DiffusersNames.time_mlp[0]}.weight"
        tensors[first_linear] = tensors[first_linear][:, torch.argsort(order)].contiguous()
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("exporting needs the safetensors package: pip install safetensors.") from None
    write_json(os.path.join(folder, UNET_FOLDER, "config.json"), unet_config_of(config, flip_sin_to_cos, freq_shift))
    write_atomically(lambda temporary: save_file(tensors, temporary), os.path.join(folder, UNET_FOLDER, WEIGHTS))
    write_json(os.path.join(folder, SCHEDULER_FOLDER, SCHEDULER_CONFIG), scheduler)
    write_json(os.path.join(folder, "model_index.json"),
               {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"]})
    write_atomically(lambda temporary: Path(temporary).write_text(model_card(config)),
                     os.path.join(folder, "README.md"))


def write_json(path, value):
    write_atomically(lambda temporary: Path(temporary).write_text(json.dumps(value, indent=2) + "\n"), path)


def model_card(config):
    """The hub's README.md: what the model is, its config, how to sample it; nothing is uploaded."""
    keys = ("img_size", "img_channels", "T", "beta_schedule", "beta_1", "beta_T", "prediction", "variance",
            "clip_denoised", "channel", "channel_mult", "attn", "num_res_blocks", "dropout", "dataset", "epoch",
            "batch_size", "lr")
    rows = "\n".join(f"| {key} | {config[key]} |" for key in keys if key in config)
    return f"""---
library_name: diffusers
tags:
- unconditional-image-generation
- ddpm
---

# DDPM (Ho et al. 2020), trained with simplest-ddpm

An unconditional denoising diffusion model exported from this repository's checkpoint (its
`Main.py`). Sample it with

```python
from diffusers import DDPMPipeline
images = DDPMPipeline.from_pretrained("path/to/this/folder")(batch_size=4).images
```

| key | value |
| --- | --- |
{rows}

FID: not measured at export (`python Main.py --state fid` measures it).
"""
