"""Every config key of Main.py, once: its default, what it means (`--help` and docs/config.md
show this), and what it takes where the default does not say it: the words it chooses from, the
type of a key whose default is None, a number that may also be a list.

The keys the original's dicts have keep its names and values (Main.py lists them). MainCondition.py
takes these keys with the defaults its model changes, and adds the keys of guidance
(DiffusionFreeGuidence/TrainCondition.py); the unconditional UNet's own keys are at the end.
"""
import os
from dataclasses import dataclass
from typing import Any

import torch

from Diffusion.Diffusion import PREDICTIONS, VARIANCES
from Diffusion.Model import DOWNSAMPLE_PADDINGS
from Diffusion.Likelihood import LOSSES, T_SAMPLINGS
from Diffusion.Schedule import BETA_SCHEDULES

# The states that draw the paper's figures from a checkpoint (Diffusion/Run/Figures.py, docs/paper.md).
FIGURES = ("rate_distortion", "shared_latents", "interpolate", "coarse_to_fine", "quality_over_time",
           "neighbours")

# The states that edit given images (Diffusion/Run/Editing.py, docs/editing.md).
EDITS = ("inpaint", "sdedit")

STATES = ("train", "eval", "fid", "nll", *FIGURES, *EDITS)
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "unipc")


@dataclass(frozen=True)
class Key:
    """A config key: `default`, its one-line `meaning`; `choices`, the only values it takes;
    `kind`, the type of its values where the default does not tell it (a None default: int,
    str, list[int]; or float | list[float] for a number that may also be a list)."""
    default: Any
    meaning: str
    choices: tuple = ()
    kind: Any = None


KEYS = {
    "state": Key("train", "train a model; eval: sample image grids from a checkpoint; fid: FID "
                          "and IS of samples; nll: bits/dim of held-out images; the others draw "
                          "the paper's figures (docs/paper.md); inpaint and sdedit edit "
                          "given images (docs/editing.md)", STATES),
    "epoch": Key(200, "passes over the training set"),
    "batch_size": Key(80, "images per training step, per process under torchrun (scale lr with "
                          "the global batch); images sampled by eval"),
    "T": Key(1000, "diffusion steps"),
    "channel": Key(128, "base channel count of the UNet (a multiple of 32)"),
    "channel_mult": Key([1, 2, 3, 4], "channels of each resolution level, as multiples of channel"),
    "num_res_blocks": Key(2, "ResBlocks per level on the down path (one more on the up path)"),
    "dropout": Key(0.15, "dropout in every ResBlock while training"),
    "lr": Key(1e-4, "learning rate of AdamW before warm-up"),
    "multiplier": Key(2., "warm-up takes the learning rate to lr * multiplier over epoch // 10 epochs"),
    "beta_1": Key(1e-4, "noise variance beta_1 of the first step (linear schedule)"),
    "beta_T": Key(0.02, "noise variance beta_T of the last step (linear schedule)"),
    "img_size": Key(32, "height and width of the images (the UNet halves it once per level)"),
    "grad_clip": Key(1., "largest gradient norm; larger gradients are scaled down"),
    "device": Key("cuda" if torch.cuda.is_available() else "cpu",
                  "torch device: cuda, cuda:1, cpu, ... (default: cuda if present, else cpu)"),
    "training_load_weight": Key(None, "checkpoint to continue training from (in the checkpoint "
                                      "folder); last: the newest there", kind=str),
    "test_load_weight": Key("ckpt_199_.pt", "checkpoint eval samples from (in the checkpoint folder)"),
    "sampled_dir": Key("./SampledImgs/", "folder eval writes its image grids to"),
    "sampledNoisyImgName": Key("NoisyNoGuidenceImgs.png", "file name of the grid of starting noise x_T"),
    "sampledImgName": Key("SampledNoGuidenceImgs.png", "file name of the grid of samples x_0"),
    "nrow": Key(8, "images per row of the grids (MainCondition.py puts one class per row instead)"),
    # The keys this repo adds.
    "img_channels": Key(3, "3: RGB images; 1: grayscale (MNIST, Fashion-MNIST), one channel to model",
                        (1, 3)),
    "dataset": Key("CIFAR10", "CIFAR10, another torchvision dataset (MNIST, CIFAR100, ...), or a "
                              "folder of images"),
    "data_root": Key(".", "where torchvision datasets are downloaded to (a folder per dataset)"),
    "num_workers": Key(min(4, os.cpu_count() or 1),
                       "data-loading worker processes (default: up to 4, no more than the CPUs)"),
    "max_images": Key(None, "train on a fixed random subset of this many images (None: all of them)",
                      kind=int),
    "seed": Key(None, "random seed (None: a different run each time)", kind=int),
    "clip_denoised": Key(False, "clip the predicted x_0 to [-1, 1] at every sampling step"),
    "beta_schedule": Key("linear", "the noise schedule: linear beta_1 .. beta_T (the paper's) or cosine "
                                   "(Nichol & Dhariwal Eq. 17, no beta_1, beta_T)", BETA_SCHEDULES),
    "prediction": Key("eps", "what the UNet outputs: eps (the paper's), x0, v = sqrt(abar) eps - "
                             "sqrt(1 - abar) x_0 (Salimans & Ho 2022), or mu, the posterior mean "
                             "(Table 2's baseline)", PREDICTIONS),
    "loss": Key("simple", "simple: L_simple (Eq. 14, the paper's); bound: the variational bound L "
                          "(Eq. 5, Table 2); hybrid: L_simple + vlb_weight L_vlb (Improved DDPM), which "
                          "trains a learned variance (docs/objectives.md)", LOSSES),
    "vlb_weight": Key(0.001, "lambda of loss hybrid: the weight of L_vlb"),
    "t_sampling": Key("uniform", "how training draws t: uniform (the paper's), or importance (loss bound "
                                 "only): p_t ~ sqrt(E[L_t^2]) (Improved DDPM Sec. 3.3)", T_SAMPLINGS),
    "loss_weight": Key("none", "none: L_simple (the paper's); min_snr: each image's error weighted by "
                               "Min-SNR-gamma (Hang et al. 2023)", ("none", "min_snr")),
    "snr_gamma": Key(5., "gamma of min_snr: the SNR above which timesteps weigh no more"),
    "ema_decay": Key(0.9999, "decay of the exponential moving average of the weights (0: no EMA); "
                             "snapshots hold the EMA weights"),
    "use_ema": Key(True, "eval samples from the EMA weights (false: the raw weights of "
                         "training_state.pt)"),
    "save_every": Key(10, "write the weight snapshot ckpt_{epoch}_.pt every this many epochs (and "
                          "after the last)"),
    "keep_last": Key(None, "keep only the newest this many snapshots (None: all)", kind=int),
    "save_state_minutes": Key(5., "minutes between saves of training_state.pt within an epoch (it "
                                  "is also saved after every epoch and on SIGTERM or Ctrl-C)"),
    "log_every": Key(100, "steps between lines of training_log.jsonl (0: one per epoch only)"),
    "sample_every": Key(10, "epochs between sample grids in the checkpoint folder's samples/ and "
                            "TensorBoard (0: never)"),
    "overwrite": Key(False, "let a new run (training_load_weight None) delete a run already in the "
                            "checkpoint folder"),
    "amp": Key("none", "mixed precision: none (float32), bf16 (GPU or CPU) or fp16 (GPU, with loss "
                       "scaling)", ("none", "bf16", "fp16")),
    "grad_checkpoint": Key(False, "activation checkpointing: each ResBlock (its attention included) "
                                  "keeps only its input and recomputes the rest for the backward "
                                  "pass, for less memory and a slower step (docs/finetune.md)"),
    "accumulate": Key(1, "micro-batches of batch_size per optimizer step: the global batch is "
                         "batch_size x accumulate x processes, with one batch's update"),
    "init_weights": Key(None, "a new run starts from the weights in this file (a ckpt_*_.pt, or "
                              "ImportWeights.py's ckpt_official_.pt), the EMA too, with its own "
                              "steps, optimizer and warm-up (docs/finetune.md)", kind=str),
    "compile": Key(False, "torch.compile the UNet (faster steps after a slow start)"),
    "channels_last": Key(False, "NHWC memory format for the UNet (faster convolutions on GPUs)"),
    "sampler": Key("ddpm", "ddpm: Algorithm 2 (respaced when sample_steps < T); ddim: DDIM (Song "
                           "et al. 2021); dpmsolver++: DPM-Solver++ (Lu et al. 2022); unipc: UniPC "
                           "(Zhao et al. 2023), the last two reaching DDIM-100's samples in 10-25 steps",
                   SAMPLERS),
    "sample_steps": Key(None, "network evaluations per sample (NFE), the timesteps visited out of T "
                              "(None: all T)", kind=int),
    "eta": Key(0., "noise of ddim (0 to 1), dpmsolver++ and unipc (0 or more): 0 deterministic (the "
                   "ODE), 1 as DDPM's posterior (dpmsolver++: SDE-DPM-Solver++)"),
    "eta_min_snr": Key(0., "dpmsolver++ and unipc add eta's noise only on steps from SNR_t = abar_t / "
                           "(1 - abar_t) >= eta_min_snr, near the data (0: on every step)"),
    "skip_type": Key(None, "which sample_steps timesteps are visited: uniform or quadratic in t (as "
                           "DDIM), logSNR: uniform in log(alpha_t / sigma_t), logSNR_split: that, "
                           "half of the steps on each side of eta_min_snr (None: logSNR for "
                           "dpmsolver++ and unipc, uniform for the others)",
                     ("uniform", "quadratic", "logSNR", "logSNR_split"), kind=str),
    "solver_order": Key(2, "order of dpmsolver++ and unipc: the x_0 of how many steps each step "
                           "uses (1: DDIM; 2, the default; 3)", (1, 2, 3)),
    "variance": Key("fixedlarge", "sigma_t^2 of ddpm and of the bound: fixedlarge beta_t (the original), "
                                  "fixedsmall (the posterior's), or learned by the UNet from img_channels "
                                  "more outputs (trained with loss bound or hybrid): learned, log sigma_t^2 "
                                  "itself, or learned_range, between the two (Improved DDPM); ddim and the "
                                  "solvers use only the mean", VARIANCES),
    "process_frames": Key(10, "columns of the process picture and frames of its GIF, at most "
                              "sample_steps + 1 (0: neither)"),
    "sampledProcessImgName": Key("ProcessNoGuidenceImgs.png", "file name of the picture of the "
                                 "denoising process: x_t and predicted x_0"),
    "sampledProcessGifName": Key("ProcessNoGuidence.gif", "file name of the animated GIF of the "
                                 "grid from noise to samples"),
    "num_samples": Key(0, "images eval exports as single PNGs into export_dir (0: none); fid scores "
                          "them"),
    "export_dir": Key("./SampledImgs/NoGuidenceSamples/", "folder of the exported samples "
                      "(MainCondition.py: a subfolder w{w} per w)"),
    "fid_images": Key(None, "folder of images that state fid scores (None: the checkpoint's "
                            "num_samples samples)", kind=str),
    "fid_extractor": Key("inception", "features of FID and IS: inception (the TensorFlow Inception-v3 "
                                      "of the papers, installed by requirements-optional.txt) or a "
                                      "TorchScript file of another network (docs/fid.md)"),
    "fid_stats_dir": Key("./FidStats/", "folder caching the training set's FID statistics"),
    "fid_every": Key(0, "epochs between FIDs of the EMA weights while training, in the run log and "
                        "TensorBoard (0: never)"),
    "fid_samples": Key(1000, "samples of each FID while training, drawn with the configured sampler"),
    "nll_images": Key(None, "held-out images that nll and rate_distortion score (None: all; each "
                            "takes T network evaluations)", kind=int),
    "nll_dataset": Key(None, "folder of held-out images for nll, rate_distortion, interpolate and "
                             "coarse_to_fine (None: the test split of dataset)", kind=str),
    "figure_images": Key(4, "chains of shared_latents, image pairs of interpolate and coarse_to_fine, "
                            "samples of neighbours"),
    "latent_steps": Key(None, "the t at which shared_latents keeps x_t of a chain (None: T, 3T/4, T/2, "
                              "T/4, the paper's 1000, 750, 500, 250)", kind=list[int]),
    "latent_samples": Key(3, "samples that shared_latents draws from each kept x_t"),
    "interpolation_t": Key(None, "the t at which interpolate mixes two images' x_t (None: T/2, the "
                                 "paper's 500)", kind=int),
    "interpolation_steps": Key(None, "the t of each row of coarse_to_fine (None: 0, T/4, T/2, 3T/4, "
                                     "T)", kind=list[int]),
    "quality_steps": Key(11, "points of the reverse process at which quality_over_time scores the "
                             "predicted x_0 of num_samples samples"),
    "neighbours": Key(8, "training images that neighbours shows beside each sample"),
    "edit_images": Key(None, "image file or folder of images (searched recursively) that inpaint and "
                             "sdedit edit, each fitted to img_size", kind=str),
    "mask": Key("center", "the pixels inpaint samples: a named region (center: the central square of "
                          "half the side; left, right, top, bottom: that half; random_boxes), or a "
                          "mask image file or folder of them (white keeps a pixel, black samples it)"),
    "mask_seed": Key(0, "seed of random_boxes (each image gets its own boxes)"),
    "jump_length": Key(10, "inpaint (RePaint): reverse steps between jumps back up the chain"),
    "resample": Key(10, "inpaint (RePaint): how often each jump_length steps are sampled (1: plain "
                        "replacement, no jump)"),
    "strength": Key(0.5, "sdedit: how far the image is noised, t0 = strength T (0: the image back; 1: "
                         "plain sampling)"),
}

# The unconditional UNet's own keys; MainCondition.py has none of them.
UNET_KEYS = {
    "attn": Key([2], "levels (indices into channel_mult) with self-attention"),
    "save_weight_dir": Key("./CheckPoints/", "folder of the checkpoints ckpt_{epoch}_.pt"),
    "group_norm_eps": Key(1e-5, "epsilon of every GroupNorm (1e-6 for the official DDPM model)"),
    "downsample_padding": Key("symmetric", "symmetric (the original) or same (TensorFlow's, the "
                                           "official DDPM model)", DOWNSAMPLE_PADDINGS),
}
