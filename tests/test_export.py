"""Exporting Main.py's model to diffusers: DDPMPipeline loads the folder and reproduces this
repo's network (eps within 1e-5) and Algorithm 2 (a chain from the same noise within 1e-3);
importing the folder gives back the same state dict; what UNet2DModel cannot express is refused."""
import json

import diffusers
import pytest
import torch
from conftest import checked
from test_import_weights import small_diffusers_unet

import ExportWeights
from Conversion.Export import export_to_diffusers
from Conversion.Import import import_weights, write_imported
from Diffusion.Diffusion import GaussianDiffusionSampler
from Diffusion.Model import UNet
from Diffusion.Run.Checkpoints import TIME_TABLE
from Diffusion.Run.Config import ConfigError
from Diffusion.Train import unet_of
from DiffusionFreeGuidence.ModelCondition import UNet as ConditionalUNet

# This repo's defaults (symmetric padding, GroupNorm eps 1e-5, its interleaved time table,
# fixedlarge, no clipping) on a tiny UNet; and the official model's options.
TINY = {"T": 10, "channel": 32, "channel_mult": [1, 2], "attn": [1], "num_res_blocks": 1, "img_size": 16,
        "dropout": 0.1}
OFFICIAL = {"group_norm_eps": 1e-6, "downsample_padding": "same", "variance": "fixedsmall", "clip_denoised": True}


def perturbed(model, seed=0):
    """`model` with noise on every trained tensor: its initialisation starts every residual
    branch near zero, which would hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def exported_run(tmp_path, options):
    """A checkpoint of a perturbed tiny UNet in a run folder, exported by ExportWeights.py.
    Returns (this repo's model, its config, the exported folder)."""
    config = checked({**TINY, **options, "save_weight_dir": str(tmp_path / "run"),
                      "test_load_weight": "ckpt_0_.pt"})
    model = perturbed(unet_of(config))
    (tmp_path / "run").mkdir()
    torch.save(model.state_dict(), tmp_path / "run" / "ckpt_0_.pt")
    arguments = [f"--{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
                 for key, value in {**TINY, **options}.items()]
    ExportWeights.main(["--out", str(tmp_path / "out"), "--save_weight_dir", str(tmp_path / "run"),
                        "--test_load_weight", "ckpt_0_.pt", *arguments])
    return model, config, tmp_path / "out"


@pytest.mark.parametrize("options", [{}, OFFICIAL], ids=["this repo's defaults", "official options"])
def test_pipeline_reproduces_eps_and_the_ddpm_chain(tmp_path, options):
    model, config, out = exported_run(tmp_path, options)
    pipeline = diffusers.DDPMPipeline.from_pretrained(out)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, config["T"] - 1])
    with torch.no_grad():
        eps, expected = pipeline.unet(x, t).sample, model(x, t)
    assert ((eps - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # Algorithm 2 from the same x_T and z: both draw x_T, then z for t = T-1 .. 1, from torch's generator.
    sampler = GaussianDiffusionSampler(model, config["beta_1"], config["beta_T"], config["T"],
                                       config["clip_denoised"], config["variance"])
    torch.manual_seed(5)
    ours = (sampler(torch.randn(2, 3, 16, 16), progress=False) + 1) / 2
    torch.manual_seed(5)
    theirs = pipeline(batch_size=2, num_inference_steps=config["T"], output_type="np").images
    assert (ours.permute(0, 2, 3, 1) - torch.from_numpy(theirs)).abs().max() < 1e-3
    assert ours.std() > 0.05  # a chain, not a constant image


@pytest.mark.parametrize("options", [{}, OFFICIAL], ids=["this repo's defaults", "official options"])
def test_export_then_import_gives_the_same_state_dict(tmp_path, options):
    model, config, out = exported_run(tmp_path, options)
    imported, imported_config = import_weights(str(out))
    assert imported.keys() == model.state_dict().keys()
    assert all(torch.equal(imported[key], value) for key, value in model.state_dict().items())
    for key in ("T", "channel", "channel_mult", "attn", "num_res_blocks", "img_size", "group_norm_eps",
                "downsample_padding", "variance", "clip_denoised", "beta_1", "beta_T", "dropout"):
        assert imported_config[key] == config[key], key
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["variance_type"], scheduler["clip_sample"]) == \
        ({"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[config["variance"]], config["clip_denoised"])


def test_imported_official_model_exports_back_to_its_own_tensors(tmp_path):
    """The official time table (sines then cosines, freq_shift 1) goes out as it came in."""
    source = small_diffusers_unet(seed=3)
    source.save_pretrained(tmp_path / "source")
    state_dict, config = import_weights(str(tmp_path / "source"), T=10)
    write_imported(state_dict, config, str(tmp_path / "imported"))
    ExportWeights.main(["--out", str(tmp_path / "out"), "--config", str(tmp_path / "imported" / "config.json")])
    exported = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet")
    assert exported.config.flip_sin_to_cos is False and exported.config.freq_shift == 1
    assert all(torch.equal(exported.state_dict()[key], value) for key, value in source.state_dict().items())


def test_what_unet2dmodel_cannot_express_is_refused_naming_the_key(tmp_path):
    config = checked(TINY)
    model = UNet(10, 32, [1, 2], [1], 1, 0.1)
    odd_table = {**model.state_dict(), TIME_TABLE: torch.randn(10, 32)}
    with pytest.raises(ConfigError, match=rf"{TIME_TABLE} is not a sinusoidal table that UNet2DModel computes"):
        export_to_diffusers(odd_table, config, model, str(tmp_path / "out"))
    conditional = ConditionalUNet(10, 3, 32, [1, 2], 1, 0.1)
    with pytest.raises(ConfigError, match=r"class-conditional model cannot be exported exactly: .*cond_proj"):
        export_to_diffusers(conditional.state_dict(), config, model, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="variance .learned. has no exact counterpart in diffusers. DDPMScheduler variance_type"):
        export_to_diffusers(model.state_dict(), {**config, "variance": "learned"}, model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
