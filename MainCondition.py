"""Class-conditional DDPM with classifier-free guidance on CIFAR-10 (Ho & Salimans 2022).

    python MainCondition.py                     # train
    python MainCondition.py --state eval        # one row per class, guided by w
    python MainCondition.py --state eval --w 0,1.8,4   # a grid per w, side by side
    python MainCondition.py --state eval --sampler ddim --sample_steps 100   # guided DDIM
"""
import torch

from Diffusion.Config import run_from_command_line, run_state
from Diffusion.Data import default_num_workers
from DiffusionFreeGuidence.TrainCondition import eval, fid, train

modelConfig = {
    "state": "train",  # or "eval", "fid"
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
    "img_channels": 3,
    "grad_clip": 1.,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "w": 1.8,
    "p_uncond": 0.1,
    "save_dir": "./CheckPoints/Condition/",
    "training_load_weight": None,
    "test_load_weight": "ckpt_63_.pt",
    "sampled_dir": "./SampledImgs/",
    "sampledNoisyImgName": "NoisyGuidenceImgs.png",
    "sampledImgName": "SampledGuidenceImgs.png",
    "nrow": 8,
    "labels": None,
    "dataset": "CIFAR10",
    "data_root": ".",
    "num_workers": default_num_workers(),
    "max_images": None,
    "seed": None,
    "clip_denoised": False,
    "label_dropout": "example",
    "ema_decay": 0.9999,
    "use_ema": True,
    "save_every": 8,  # so that ckpt_63_.pt, eval's default (the original's), is among the snapshots
    "keep_last": None,
    "save_state_minutes": 5.,
    "log_every": 100,
    "sample_every": 10,
    "overwrite": False,
    "amp": "none",
    "compile": False,
    "channels_last": False,
    "sampler": "ddpm",
    "sample_steps": None,
    "eta": 0.,
    "skip_type": "uniform",
    "variance": "fixedlarge",
    "process_frames": 10,
    "sampledProcessImgName": "ProcessGuidenceImgs.png",
    "sampledProcessGifName": "ProcessGuidence.gif",
    "num_samples": 0,
    "export_dir": "./SampledImgs/GuidenceSamples/",
    "fid_images": None,
    "fid_extractor": "inception",
    "fid_stats_dir": "./FidStats/",
}


def main(model_config=None):
    """Train or sample with `model_config` (a whole dict like modelConfig; keys it leaves out
    take modelConfig's values)."""
    run_state(model_config, modelConfig, train, eval, fid)


if __name__ == "__main__":
    run_from_command_line(main, modelConfig, description=__doc__)
