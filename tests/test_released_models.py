"""The DDPM authors' five released models: CIFAR-10 at 32x32, and CelebA-HQ and LSUN church,
bedroom and cat at 256x256 (one architecture, 114M parameters).

Random UNet2DModels of each model's exact config.json (as google/ddpm-<name> holds it) stand in
for the downloads: each converts, from diffusers' names and from pesser's, to a UNet that gives
diffusers' output within 1e-5. The forward passes run at 32x32, which the 256x256 architecture
takes as well (its five halvings end at 1x1), to keep a 114M-parameter model within a second.
"""
import functools
import json
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import run_or_fail
from test_import_weights import as_pesser_checkpoint, relative_error

import ImportWeights
from Conversion.Import import convert, import_weights, write_imported
from Conversion.SourceNames import options_of_diffusers_config
from Diffusion.Train import unet_of

# The config.json of google/ddpm-cifar10-32 and google/ddpm-{celebahq,church,bedroom,cat}-256
# (and of their ddpm-ema- twins): the keys that set the architecture; the rest are diffusers'
# defaults.
OFFICIAL = dict(act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
                flip_sin_to_cos=False, freq_shift=1, in_channels=3, out_channels=3, layers_per_block=2,
                mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional")
CIFAR10 = dict(OFFICIAL, sample_size=32, block_out_channels=[128, 256, 256, 256],
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
AT_256 = dict(OFFICIAL, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
              down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
RELEASED = {"cifar10": CIFAR10, "celebahq": AT_256, "church": AT_256, "bedroom": AT_256, "cat": AT_256}
ARCHITECTURES = {  # what the importer must read from the weights
    "cifar10": {"img_size": 32, "channel": 128, "channel_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 2},
    **{name: {"img_size": 256, "channel": 128, "channel_mult": [1, 1, 2, 2, 4, 4], "attn": [4],
              "num_res_blocks": 2} for name in ("celebahq", "church", "bedroom", "cat")}}
PARAMETERS = {"cifar10": 35_746_307, "celebahq": 113_673_219, "church": 113_673_219,
              "bedroom": 113_673_219, "cat": 113_673_219}


@functools.cache
def released_unet(sample_size):
    """A UNet2DModel of the released config of `sample_size` with random weights: built on the
    meta device and filled (xavier-like scales, norms and biases away from 1 and 0), which
    takes a fraction of the seconds diffusers' own initialisation of 114M weights takes."""
    with torch.device("meta"):
        model = diffusers.UNet2DModel(**(CIFAR10 if sample_size == 32 else AT_256))
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(sample_size)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dim() > 1:
                tensor.normal_(0, tensor[0].numel() ** -0.5, generator=generator)
            else:
                tensor.normal_(1. if "norm" in name and name.endswith("weight") else 0., 0.1, generator=generator)
    return model.eval()


def assert_gives_diffusers_output(source, state_dict, config):
    """This repo's UNet holding `state_dict` gives `source`'s output at 32x32, t = T - 1 (the
    time table's last row, its largest angles)."""
    with torch.device("meta"):
        model = unet_of(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([config["T"] - 1])
    with torch.no_grad():
        assert relative_error(model.eval()(x, t), source(x, t).sample) < 1e-5


# CelebA-HQ and the three LSUN models have one config.json (RELEASED), so one of them stands for all.
@pytest.mark.parametrize("name", ["cifar10", "church"])
@pytest.mark.parametrize("names", ["diffusers", "pesser"])
def test_released_model_converts_exactly_from_both_names(name, names):
    source = released_unet(RELEASED[name]["sample_size"])
    assert sum(p.numel() for p in source.parameters()) == PARAMETERS[name]
    tensors = source.state_dict()
    if names == "diffusers":  # a folder's config.json says the options and the size
        options = options_of_diffusers_config({**RELEASED[name], "_class_name": "UNet2DModel"}, name)
        state_dict, config = convert(tensors, options, name)
    else:  # a bare file: the size is the released model's of the architecture read from it
        levels = len(RELEASED[name]["block_out_channels"])
        state_dict, config = convert(as_pesser_checkpoint(tensors, levels), source=name)
    assert {key: config[key] for key in ARCHITECTURES[name]} == ARCHITECTURES[name]
    assert (config["group_norm_eps"], config["downsample_padding"], config["clip_denoised"]) == (1e-6, "same", True)
    at_256 = config["img_size"] == 256  # the authors' run scripts: no dropout and fixedsmall at 256
    assert (config["dropout"], config["variance"]) == ((0., "fixedsmall") if at_256 else (0.1, "fixedlarge"))
    assert_gives_diffusers_output(source, state_dict, config)


def test_256_pipeline_folder_imports_with_its_scheduler_and_samples_through_main(tmp_path):
    """google/ddpm-ema-church-256's layout (a DDPMPipeline: unet/, scheduler/ with diffusers'
    fixed_small and clip_sample), imported with T 4 and sampled by Main.py --config at 32x32."""
    source = tmp_path / "ddpm-ema-church-256"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small", clip_sample=True)
    diffusers.DDPMPipeline(unet=released_unet(256), scheduler=scheduler).save_pretrained(source)
    state_dict, config = import_weights(str(source), T=4)
    assert (config["T"], config["beta_1"], config["beta_T"], config["variance"], config["clip_denoised"],
            config["img_size"], config["batch_size"]) == (4, 1e-4, 0.02, "fixedsmall", True, 256, 16)
    out = tmp_path / "official"
    _, config_path = write_imported(state_dict, config, str(out))
    assert json.loads((out / "config.json").read_text())["test_load_weight"] == "ckpt_official_.pt"
    samples = tmp_path / "samples"
    run_or_fail("Main.py", "--config", str(config_path), "--img_size", "32", "--batch_size", "1",
                "--device", "cpu", "--process_frames", "0", "--sampled_dir", str(samples))
    assert (samples / "SampledNoGuidenceImgs.png").is_file()


@pytest.mark.parametrize("source, folder", [
    ("ddpm-ema-church-256", "official_ddpm_church_ema"), ("downloads/ddpm-celebahq-256", "official_ddpm_celebahq"),
    ("diffusion_models_converted/ema_diffusion_lsun_cat_model/model-1761000.ckpt", "official_ddpm_cat_ema"),
    ("diffusion_cifar10_model/model-790000.ckpt", "official_ddpm_cifar10"), ("my_unet.safetensors", "official_ddpm")])
def test_the_default_folder_is_named_after_the_dataset_and_ema_in_the_sources_name(source, folder):
    assert ImportWeights.default_out(source) == str(Path("CheckPoints") / folder)
