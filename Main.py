"""Unconditional DDPM on CIFAR-10 (Ho et al. 2020).

    python Main.py                        # train
    python Main.py --state eval           # sample grids from test_load_weight
    python Main.py --epoch 1 --batch_size 16 --channel_mult 1,2,2   # any key, see --help
    python Main.py --state eval --sampler ddim --sample_steps 100   # DDIM, 10x faster
    python Main.py --state fid --num_samples 50000   # export samples, then FID and IS
"""
import torch

from Diffusion.Config import run_from_command_line, run_state
from Diffusion.Data import default_num_workers
from Diffusion.Train import eval, fid, train

modelConfig = {
    "state": "train",  # or "eval", "fid"
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
    "img_channels": 3,
    "grad_clip": 1.,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "training_load_weight": None,
    "save_weight_dir": "./CheckPoints/",
    "test_load_weight": "ckpt_199_.pt",
    "sampled_dir": "./SampledImgs/",
    "sampledNoisyImgName": "NoisyNoGuidenceImgs.png",
    "sampledImgName": "SampledNoGuidenceImgs.png",
    "nrow": 8,
    "dataset": "CIFAR10",
    "data_root": ".",
    "num_workers": default_num_workers(),
    "max_images": None,
    "seed": None,
    "group_norm_eps": 1e-5,
    "downsample_padding": "symmetric",
    "clip_denoised": False,
    "ema_decay": 0.9999,
    "use_ema": True,
    "save_every": 10,
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
    "sampledProcessImgName": "ProcessNoGuidenceImgs.png",
    "sampledProcessGifName": "ProcessNoGuidence.gif",
    "num_samples": 0,
    "export_dir": "./SampledImgs/NoGuidenceSamples/",
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
