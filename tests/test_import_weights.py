"""Importing the official DDPM CIFAR-10 model: diffusers' UNet2DModel and pesser's checkpoint.

Small diffusers models of the official block types, with random weights, stand in for the real
download; the full-size configuration is checked for shapes and key coverage only.
"""
import json
import re
from functools import partial

import diffusers
import pytest
import torch
from conftest import run_script
from torch import nn

from Diffusion.Run.Checkpoints import TIME_TABLE
from Diffusion.Run.Config import ConfigError
from Conversion.Import import CHECKPOINT_NAME, convert, import_weights, tensor_mapping
from Conversion.SourceNames import DiffusersNames, official_time_table, options_of_diffusers_config
from Diffusion.Model import UNet
from Diffusion.Train import unet_of

OFFICIAL_OPTIONS = dict(norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
DIFFUSERS_DEFAULT_OPTIONS = dict(norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0)


def small_diffusers_unet(seed=0, **options):
    """A UNet2DModel of the official block types at 16x16 (channels 32, 64; attention at level
    1), every tensor perturbed by noise so that no bias or norm weight is trivial."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        attention_head_dim=None, **{**OFFICIAL_OPTIONS, **options})
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    return model.eval()


def official_diffusers_unet():
    """google/ddpm-cifar10-32's architecture: 35.7M parameters."""
    return diffusers.UNet2DModel(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, **OFFICIAL_OPTIONS)


# diffusers' names -> pesser/pytorch_diffusion's, written out independently of the importer.
PESSER_RENAMES = [
    (r"^time_embedding\.linear_1\.", "temb.dense.0."),
    (r"^time_embedding\.linear_2\.", "temb.dense.1."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^down_blocks\.", "down."),
    (r"\.resnets\.(\d+)\.", r".block.\1."),
    (r"\.attentions\.(\d+)\.", r".attn.\1."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"^mid_block\.block\.0\.", "mid.block_1."),
    (r"^mid_block\.block\.1\.", "mid.block_2."),
    (r"^mid_block\.attn\.0\.", "mid.attn_1."),
    (r"\.time_emb_proj\.", ".temb_proj."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".proj_out."),
]
PESSER_ATTENTION_WEIGHT = re.compile(r"\.(q|k|v|proj_out)\.weight$")


def as_pesser_checkpoint(state_dict, levels):
    """A diffusers UNet2DModel state dict in pesser's names: up_blocks[i] is up[levels - 1 - i],
    attention projections are 1x1 convs [C, C, 1, 1]."""
    renamed = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"^up_blocks\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.", key)
        for pattern, replacement in PESSER_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor[:, :, None, None] if PESSER_ATTENTION_WEIGHT.search(key) else tensor
    return renamed


@pytest.fixture(scope="module")
def small_model():
    return small_diffusers_unet()


@pytest.fixture(scope="module")
def small_sources(small_model, tmp_path_factory):
    """The small model as a diffusers model folder (safetensors), a DDPMPipeline folder (the
    model in unet/) and a .bin state dict."""
    root = tmp_path_factory.mktemp("sources")
    small_model.save_pretrained(root / "folder")
    pipeline = diffusers.DDPMPipeline(unet=small_model, scheduler=diffusers.DDPMScheduler())
    pipeline.save_pretrained(root / "pipeline")
    torch.save(small_model.state_dict(), root / "model.bin")
    return {"folder": root / "folder", "pipeline": root / "pipeline", "bin": root / "model.bin"}


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_matches_diffusers(diffusers_model, state_dict, config):
    """This repo's UNet with `state_dict` gives diffusers_model's output on the same inputs."""
    model = unet_of(config)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 333, 666, config["T"] - 1])
    with torch.no_grad():
        expected = diffusers_model(x, t).sample
        actual = model(x, t)
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("form", ["folder", "pipeline", "bin"])
def test_imported_small_model_matches_diffusers_output(small_model, small_sources, form):
    # A bare file does not say its image size; the folders' config.json does (sample_size 16).
    state_dict, config = import_weights(str(small_sources[form]), img_size=16 if form == "bin" else None)
    assert config["img_size"] == 16
    assert {key: config[key] for key in ("channel", "channel_mult", "attn", "num_res_blocks")} == \
        {"channel": 32, "channel_mult": [1, 2], "attn": [1], "num_res_blocks": 1}
    assert (config["group_norm_eps"], config["downsample_padding"]) == (1e-6, "same")
    assert (config["T"], config["beta_1"], config["beta_T"], config["clip_denoised"]) == \
        (1000, 1e-4, 0.02, True)
    assert_matches_diffusers(small_model, state_dict, config)


def test_diffusers_options_are_read_from_config_json(tmp_path):
    """A UNet2DModel with diffusers' defaults (cos first, symmetric padding, eps 1e-5) converts
    as exactly as the official options do."""
    model = small_diffusers_unet(seed=2, **DIFFUSERS_DEFAULT_OPTIONS)
    model.save_pretrained(tmp_path)
    state_dict, config = import_weights(str(tmp_path))
    assert (config["group_norm_eps"], config["downsample_padding"]) == (1e-5, "symmetric")
    assert_matches_diffusers(model, state_dict, config)


@pytest.mark.parametrize("flip_sin_to_cos, freq_shift", [(False, 1), (True, 0)])
def test_time_table_is_diffusers_timestep_embedding(flip_sin_to_cos, freq_shift):
    from diffusers.models.embeddings import get_timestep_embedding
    expected = get_timestep_embedding(torch.arange(1000), 128, flip_sin_to_cos, freq_shift)
    assert torch.equal(official_time_table(1000, 128, flip_sin_to_cos, freq_shift), expected)


def test_official_size_model_uses_every_tensor_once_and_loads_strictly():
    source = official_diffusers_unet()
    tensors = source.state_dict()
    options = options_of_diffusers_config({**source.config, "_class_name": "UNet2DModel"}, "official")
    state_dict, config = convert(tensors, options)
    assert {key: config[key] for key in ("channel", "channel_mult", "attn", "num_res_blocks")} == \
        {"channel": 128, "channel_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 2}
    model = unet_of(config)
    model.load_state_dict(state_dict, strict=True)
    mapping = tensor_mapping(model, DiffusersNames(levels=4))
    assert sorted(mapping.values()) == sorted(tensors)  # a bijection onto the source's tensors
    for ours, theirs in mapping.items():
        assert torch.equal(state_dict[ours].flatten(), tensors[theirs].flatten())
    assert state_dict[TIME_TABLE].shape == (1000, 128)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == sum(p.numel() for p in source.parameters()) == 35_746_307


def test_pesser_checkpoint_imports_to_the_same_state_dict(small_model, small_sources, tmp_path):
    pesser = as_pesser_checkpoint(small_model.state_dict(), levels=2)
    assert {"temb.dense.1.bias", "down.0.downsample.conv.weight", "down.1.attn.0.q.weight",
            "mid.block_2.conv2.weight", "mid.attn_1.proj_out.weight", "up.0.block.1.nin_shortcut.weight",
            "up.1.upsample.conv.weight", "norm_out.weight"} <= pesser.keys()
    torch.save(pesser, tmp_path / "model-790000.ckpt")
    expected, _ = import_weights(str(small_sources["bin"]), img_size=16)
    imported, config = import_weights(str(tmp_path / "model-790000.ckpt"), img_size=16)
    assert imported.keys() == expected.keys()
    assert all(torch.equal(imported[key], expected[key]) for key in expected)
    assert config["attn"] == [1]


def test_a_file_whose_image_size_cannot_be_known_says_so(small_sources):
    with pytest.raises(ConfigError, match=r"none of the DDPM authors' released models and has no "
                                          r"config\.json, so its image size cannot be known: give it with --img_size"):
        import_weights(str(small_sources["bin"]))
    with pytest.raises(ConfigError, match="img_size 15 is not a multiple of 2, as the 2 levels"):
        import_weights(str(small_sources["bin"]), img_size=15)


def test_missing_and_left_over_tensors_are_named(small_model):
    tensors = dict(small_model.state_dict())
    del tensors["up_blocks.0.attentions.1.to_k.bias"]
    tensors["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConfigError) as error:
        convert(tensors)
    message = str(error.value)
    assert "1 tensors are missing (up_blocks.0.attentions.1.to_k.bias)" in message
    assert "1 of its tensors fit nowhere (down_blocks.0.resnets.0.extra.weight)" in message


def tiny_condition_unet():
    """Stable Diffusion's UNet: cross-attention blocks."""
    return diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)


def small_unet_with(**config):
    return diffusers.UNet2DModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **config)


def write_source(model, form, folder):
    """`model` written to `folder` as a diffusers folder, a state dict file, or a pickled module
    (which loading would run pickle code for). Returns the path to import."""
    if form == "folder":
        model.save_pretrained(folder)
        return folder
    path = folder / "weights.pt"
    torch.save(model.state_dict() if form == "state dict" else model, path)
    return path


fourier_unet = partial(small_unet_with, time_embedding_type="fourier", attention_head_dim=None)
OTHER_ARCHITECTURES = {  # case: (model, how it is written, what the error says)
    "cross-attention state dict": (tiny_condition_unet, "state dict",
                                   r"fit nowhere \(down_blocks\.0\.attentions\.0\.norm"),
    "cross-attention folder": (tiny_condition_unet, "folder",
                               "holds a UNet2DConditionModel, not a UNet2DModel"),
    "fourier time embedding folder": (fourier_unet, "folder", "time_embedding_type 'fourier'"),
    "fourier time embedding state dict": (fourier_unet, "state dict", r"fit nowhere \(time_proj\."),
    "multi-head attention folder": (partial(small_unet_with, attention_head_dim=8), "folder",
                                    "attention_head_dim 8, i.e. multi-head attention"),
    "this repo's checkpoint": (partial(UNet, 10, 32, [1, 2], [1], 1, 0.1), "state dict",
                               "already a checkpoint of this repo's UNet"),
    "unknown keys": (lambda: nn.ModuleDict({"encoder": nn.Linear(2, 2)}), "state dict",
                     r"its keys include encoder\.bias"),
    "pickled code": (lambda: nn.Linear(2, 2), "pickled module",
                     r"pickles torch\.nn\.modules\.linear\.Linear objects besides tensors"),
}


@pytest.mark.parametrize("case", OTHER_ARCHITECTURES)
def test_other_architecture_is_refused_naming_what_does_not_fit(case, tmp_path):
    model, form, message = OTHER_ARCHITECTURES[case]
    source = write_source(model(), form, tmp_path)
    with pytest.raises(ConfigError, match=message):
        import_weights(str(source))


def test_script_converts_a_folder_and_main_samples_a_grid_from_it(small_sources, tmp_path):
    out = tmp_path / "official"
    converted = run_script("ImportWeights.py", str(small_sources["folder"]), "--out", str(out),
                           "--T", "10")
    assert converted.returncode == 0, converted.stderr
    config_path = out / "config.json"
    assert f"python Main.py --config {config_path}" in converted.stdout
    config = json.loads(config_path.read_text())
    assert (config["state"], config["T"], config["test_load_weight"]) == ("eval", 10, CHECKPOINT_NAME)
    samples = tmp_path / "samples"
    sampled = run_script("Main.py", "--config", str(config_path), "--T", "10", "--batch_size", "4",
                         "--device", "cpu", "--sampled_dir", str(samples))
    assert sampled.returncode == 0, sampled.stderr
    assert (samples / "NoisyNoGuidenceImgs.png").is_file()
    assert (samples / "SampledNoGuidenceImgs.png").is_file()


def test_script_error_is_one_line_without_traceback(tmp_path):
    torch.save(UNet(10, 32, [1, 2], [1], 1, 0.1).state_dict(), tmp_path / "ckpt_0_.pt")
    result = run_script("ImportWeights.py", str(tmp_path / "ckpt_0_.pt"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and "already a checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()
