"""Class-conditional DDPM with classifier-free guidance on CIFAR-10 (Ho & Salimans 2022).

    python MainCondition.py                     # train
    python MainCondition.py --state eval        # one row per class, guided by w
    python MainCondition.py --state eval --w 0,1.8,4   # a grid per w, side by side
    python MainCondition.py --config configs/quickstart_guided.json   # the quick start on a CPU
    python MainCondition.py --state eval --sampler ddim --sample_steps 100   # guided DDIM
    python MainCondition.py --help              # every key, with its default and meaning
"""
import torch

from Diffusion.Run.Scripts import run_script, run_state
from DiffusionFreeGuidence.TrainCondition import CONDITIONAL

# The original's keys and values; every other key (the dataset, EMA, samplers, speed options,
# FID, ...) takes its default unless set here or as --key value (see --help, docs/config.md).
modelConfig = {
    "state": "train",  # or "eval", "fid", "nll"
    "epoch": 70,
    "batch_size": 80,
    "T": 500,
    "channel": 128,
    "channel_mult": [1, 2, 2, 2],
    "num_res_blocks": 2,
    "dropout": 0.15,
    "lr": 1e-4,
    "multiplier": 2.5,
    "beta_1": 1e-4,
    "beta_T": 0.028,
    "img_size": 32,
    "grad_clip": 1.,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "w": 1.8,
    "save_dir": "./CheckPoints/Condition/",
    "training_load_weight": None,
    "test_load_weight": "ckpt_63_.pt",
    "sampled_dir": "./SampledImgs/",
    "sampledNoisyImgName": "NoisyGuidenceImgs.png",
    "sampledImgName": "SampledGuidenceImgs.png",
    "nrow": 8,
}


def main(model_config=None):
    """Train or sample with `model_config` (a dict like modelConfig; keys it leaves out take
    modelConfig's values, then their defaults)."""
    run_state({**modelConfig, **(model_config or {})}, CONDITIONAL)


if __name__ == "__main__":
    run_script(main, modelConfig, CONDITIONAL, description=__doc__)
