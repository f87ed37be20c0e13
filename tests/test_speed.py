"""The speed options on a CPU: bf16 autocast and channels_last train, and what they train loads
and samples with none of them; fp16 is refused off CUDA; steps whose loss is not finite are
skipped, counted, and a run that keeps producing them stops with a sentence.
(torch.compile and CUDA are exercised by benchmarks/training.py on a GPU.)"""
from pathlib import Path

import pytest
import torch

import Main
from conftest import as_arguments, run_or_fail, run_script
from Diffusion import Train
from Diffusion.Run.Checkpoints import TRAINING_STATE
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Sampling import sampler_of, under_speed_options


def test_bf16_channels_last_training_loads_and_samples_without_them(tiny_config, tmp_path):
    Train.train({**tiny_config, "epoch": 2, "amp": "bf16", "channels_last": True, "sample_every": 1})
    folder = Path(tiny_config["save_weight_dir"])
    state = torch.load(folder / TRAINING_STATE, weights_only=True)
    assert all(value.dtype == torch.float32 for value in state["model"].values())  # weights stay fp32
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert (folder / "samples" / "epoch_1.png").is_file()  # sampled under bf16 while training
    config = {**tiny_config, "state": "eval", "test_load_weight": "ckpt_1_.pt", "batch_size": 2,
              "sampled_dir": str(tmp_path / "samples")}
    run_or_fail("Main.py", *as_arguments(config), cwd=tmp_path)
    assert (tmp_path / "samples" / config["sampledImgName"]).is_file()


def test_fp16_off_cuda_is_refused_naming_the_key(tiny_config):
    with pytest.raises(ConfigError) as error:
        Main.main({**tiny_config, "amp": "fp16"})
    assert "amp fp16" in str(error.value) and "bf16" in str(error.value)


def test_a_run_whose_loss_stays_non_finite_stops_with_a_sentence(tiny_config, tmp_path):
    # lr 1e30: the first step throws the weights to ~1e30, every later loss is inf or nan
    config = {**tiny_config, "epoch": 60, "batch_size": 2, "lr": 1e30, "sample_every": 0,
              "log_every": 1, "save_every": 100}
    process = run_script("Main.py", *as_arguments(config), cwd=tmp_path)
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert "the loss was not finite for 50 steps in a row" in process.stderr
    assert "Lower lr" in process.stderr
    log = (Path(config["save_weight_dir"]) / "training_log.jsonl").read_text().splitlines()
    assert '"skipped_steps": 50' in log[-1]


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_sampling_under_bf16_keeps_x_t_float32_and_close_to_float32_sampling(tiny_config, sampler):
    torch.manual_seed(0)
    model = Train.unet_of({**tiny_config, "T": 20}).eval()
    with torch.no_grad():  # weights of a size that makes the network's output matter
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    config = {**tiny_config, "T": 20, "sampler": sampler, "sample_steps": 10, "eta": 0.}
    x_T = torch.randn(4, 3, 16, 16)
    seen = []
    samples = {}
    for amp in ("none", "bf16"):
        options = {**config, "amp": amp, "channels_last": amp == "bf16"}
        sampler = sampler_of(options, under_speed_options(model, options["amp"], options["compile"],
                                                          options["channels_last"], options["device"]))
        samples[amp] = sampler(x_T, progress=False, on_step=lambda x_t, x_0: seen.append(x_t.dtype))
    assert set(seen) == {torch.float32}
    assert samples["bf16"].dtype == torch.float32
    difference = (samples["bf16"] - samples["none"]).abs()
    assert 0 < difference.mean() < 0.05  # bf16 differs, by rounding only
