"""Unconditional DDPM on CIFAR-10 (Ho et al. 2020).

    python Main.py                        # train
    python Main.py --state eval           # sample grids from test_load_weight
    python Main.py --config configs/quickstart.json   # the five-minute quick start on a CPU
    python Main.py --state eval --sampler ddim --sample_steps 100   # DDIM, 10x faster
    python Main.py --state fid --num_samples 50000   # export samples, then FID and IS
    python Main.py --state nll --nll_images 100      # bits/dim of held-out images (DDPM Table 1)
    python Main.py --help                 # every key, with its default and meaning
"""
import torch

from Diffusion.Run.Scripts import run_script, run_state
from Diffusion.Train import UNCONDITIONAL

# The original's keys and values; every other key (the dataset, EMA, samplers, speed options,
# FID, ...) takes its default unless set here or as --key value (see --help, docs/config.md).
modelConfig = {
    "state": "train",  # or "eval", "fid", "nll"
    "epoch": 200,
    "batch_size": 80,
    "T": 1000,
    "channel": 128,
    "channel_mult": [1, 2, 3, 4],
    "attn": [2],
    "num_res_blocks": 2,
    "dropout": 0.15,
    "lr": 1e-4,
    "multiplier": 2.,
    "beta_1": 1e-4,
    "beta_T": 0.02,
    "img_size": 32,
    "grad_clip": 1.,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "training_load_weight": None,
    "save_weight_dir": "./CheckPoints/",
    "test_load_weight": "ckpt_199_.pt",
    "sampled_dir": "./SampledImgs/",
    "sampledNoisyImgName": "NoisyNoGuidenceImgs.png",
    "sampledImgName": "SampledNoGuidenceImgs.png",
    "nrow": 8,
}


def main(model_config=None):
    """Train or sample with `model_config` (a dict like modelConfig; keys it leaves out take
    modelConfig's values, then their defaults)."""
    run_state({**modelConfig, **(model_config or {})}, UNCONDITIONAL)


if __name__ == "__main__":
    run_script(main, modelConfig, UNCONDITIONAL, description=__doc__)
