"""Every config key of Main.py and MainCondition.py: `KINDS` says what values each takes (and
how the command line spells them), `MEANINGS` what it does (shown by `--help` and the README's
table), `WHY_ABSENT` why a script lacks a key the other one has.
"""
from dataclasses import dataclass
from typing import Any, Callable

from Diffusion.Model import DOWNSAMPLE_PADDINGS


@dataclass(frozen=True)
class Kind:
    """The values a key takes: `name` for messages, `parse` for command-line text (raises
    ValueError), `accepts` for Python values."""
    name: str
    metavar: str
    parse: Callable[[str], Any]
    accepts: Callable[[Any], bool]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return _is_int(value) or isinstance(value, float)


def _parse_bool(text):
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _parse_list(parse_item):
    return lambda text: [parse_item(item) for item in text.replace("[", "").replace("]", "").split(",")
                         if item.strip()]


def _optional(kind):
    def parse(text):
        return None if text.lower() == "none" else kind.parse(text)
    return Kind(f"{kind.name} or None", kind.metavar, parse, lambda value: value is None or kind.accepts(value))


def _choice(*choices):
    def parse(text):
        if text not in choices:
            raise ValueError(text)
        return text
    return Kind(" or ".join(repr(c) for c in choices), "{" + ",".join(choices) + "}", parse,
                lambda value: value in choices)


def _choice_of_ints(*choices):
    def parse(text):
        if int(text) not in choices:
            raise ValueError(text)
        return int(text)
    return Kind(" or ".join(map(str, choices)), "{" + ",".join(map(str, choices)) + "}", parse,
                lambda value: _is_int(value) and value in choices)


INT = Kind("an integer", "N", int, _is_int)
FLOAT = Kind("a number", "X", float, _is_number)
STR = Kind("a string", "TEXT", str, lambda value: isinstance(value, str))
BOOL = Kind("true or false", "BOOL", _parse_bool, lambda value: isinstance(value, bool))
INT_LIST = Kind("a list of integers (1,2,2 on the command line)", "N,N,...", _parse_list(int),
                lambda value: isinstance(value, (list, tuple)) and all(_is_int(v) for v in value))
FLOAT_OR_FLOAT_LIST = Kind(
    "a number or a list of numbers (0,1,3 on the command line)", "X[,X,...]",
    lambda text: _parse_list(float)(text) if "," in text or "[" in text else float(text),
    lambda value: _is_number(value) or (isinstance(value, (list, tuple)) and len(value) > 0
                                        and all(_is_number(v) for v in value)))

KINDS = {
    "state": _choice("train", "eval", "fid"),
    "epoch": INT,
    "batch_size": INT,
    "T": INT,
    "channel": INT,
    "channel_mult": INT_LIST,
    "attn": INT_LIST,
    "num_res_blocks": INT,
    "dropout": FLOAT,
    "lr": FLOAT,
    "multiplier": FLOAT,
    "beta_1": FLOAT,
    "beta_T": FLOAT,
    "img_size": INT,
    "img_channels": _choice_of_ints(1, 3),
    "grad_clip": FLOAT,
    "device": STR,
    "training_load_weight": _optional(STR),
    "save_weight_dir": STR,
    "save_dir": STR,
    "test_load_weight": STR,
    "sampled_dir": STR,
    "sampledNoisyImgName": STR,
    "sampledImgName": STR,
    "nrow": INT,
    "dataset": STR,
    "data_root": STR,
    "num_workers": INT,
    "max_images": _optional(INT),
    "seed": _optional(INT),
    "group_norm_eps": FLOAT,
    "downsample_padding": _choice(*DOWNSAMPLE_PADDINGS),
    "clip_denoised": BOOL,
    "w": FLOAT_OR_FLOAT_LIST,
    "p_uncond": FLOAT,
    "labels": _optional(INT_LIST),
    "ema_decay": FLOAT,
    "use_ema": BOOL,
    "save_every": INT,
    "keep_last": _optional(INT),
    "save_state_minutes": FLOAT,
    "log_every": INT,
    "sample_every": INT,
    "overwrite": BOOL,
    "label_dropout": _choice("example", "batch"),
    "amp": _choice("none", "bf16", "fp16"),
    "compile": BOOL,
    "channels_last": BOOL,
    "sampler": _choice("ddpm", "ddim"),
    "sample_steps": _optional(INT),
    "eta": FLOAT,
    "skip_type": _choice("uniform", "quadratic"),
    "variance": _choice("fixedlarge", "fixedsmall"),
    "process_frames": INT,
    "sampledProcessImgName": STR,
    "sampledProcessGifName": STR,
    "num_samples": INT,
    "export_dir": STR,
    "fid_images": _optional(STR),
    "fid_extractor": STR,
    "fid_stats_dir": STR,
}

MEANINGS = {
    "state": "train a model; eval: sample image grids from a checkpoint; fid: FID and IS of samples",
    "epoch": "passes over the training set",
    "batch_size": "images per training step, per process under torchrun (scale lr with the global "
                  "batch); images sampled by eval",
    "T": "diffusion steps",
    "channel": "base channel count of the UNet (a multiple of 32)",
    "channel_mult": "channels of each resolution level, as multiples of channel",
    "attn": "levels (indices into channel_mult) with self-attention",
    "num_res_blocks": "ResBlocks per level on the down path (one more on the up path)",
    "dropout": "dropout in every ResBlock while training",
    "lr": "learning rate of AdamW before warm-up",
    "multiplier": "warm-up takes the learning rate to lr * multiplier over epoch // 10 epochs",
    "beta_1": "noise variance beta_1 of the first step (linear schedule)",
    "beta_T": "noise variance beta_T of the last step (linear schedule)",
    "img_size": "height and width of the images (the UNet halves it once per level)",
    "img_channels": "3: RGB images; 1: grayscale (MNIST, Fashion-MNIST), one channel to model",
    "grad_clip": "largest gradient norm; larger gradients are scaled down",
    "device": "torch device: cuda, cuda:1, cpu, ...",
    "training_load_weight": "checkpoint to continue training from (in the checkpoint folder); "
                            "last: the newest there",
    "save_weight_dir": "folder of the checkpoints ckpt_{epoch}_.pt",
    "save_dir": "folder of this model's checkpoints ckpt_{epoch}_.pt",
    "test_load_weight": "checkpoint eval samples from (in the checkpoint folder)",
    "sampled_dir": "folder eval writes its image grids to",
    "sampledNoisyImgName": "file name of the grid of starting noise x_T",
    "sampledImgName": "file name of the grid of samples x_0",
    "nrow": "images per row of the grids (MainCondition.py puts one class per row instead)",
    "dataset": "CIFAR10, another torchvision dataset (MNIST, CIFAR100, ...), or a folder of images",
    "data_root": "where torchvision datasets are downloaded to (a folder per dataset)",
    "num_workers": "data-loading worker processes",
    "max_images": "train on a fixed random subset of this many images (None: all of them)",
    "seed": "random seed (None: a different run each time)",
    "group_norm_eps": "epsilon of every GroupNorm (1e-6 for the official DDPM model)",
    "downsample_padding": "symmetric (the original) or same (TensorFlow's, the official DDPM model)",
    "clip_denoised": "clip the predicted x_0 to [-1, 1] at every sampling step",
    "w": "guidance weight: eps = (1 + w) eps(x, c) - w eps(x); a list gives one grid per value",
    "p_uncond": "probability that a training example's label is replaced by the null label",
    "labels": "classes eval samples, one per row (None: every class)",
    "ema_decay": "decay of the exponential moving average of the weights (0: no EMA); "
                 "snapshots hold the EMA weights",
    "use_ema": "eval samples from the EMA weights (false: the raw weights of training_state.pt)",
    "save_every": "write the weight snapshot ckpt_{epoch}_.pt every this many epochs (and after "
                  "the last)",
    "keep_last": "keep only the newest this many snapshots (None: all)",
    "save_state_minutes": "minutes between saves of training_state.pt within an epoch (it is also "
                          "saved after every epoch and on SIGTERM or Ctrl-C)",
    "log_every": "steps between lines of training_log.jsonl (0: one per epoch only)",
    "sample_every": "epochs between sample grids in the checkpoint folder's samples/ and "
                    "TensorBoard (0: never)",
    "overwrite": "let a new run (training_load_weight None) delete a run already in the "
                 "checkpoint folder",
    "label_dropout": "example: drop each label with p_uncond (the paper); batch: drop the whole "
                     "batch's labels with p_uncond (the original)",
    "amp": "mixed precision: none (float32), bf16 (GPU or CPU) or fp16 (GPU, with loss scaling)",
    "compile": "torch.compile the UNet (faster steps after a slow start)",
    "channels_last": "NHWC memory format for the UNet (faster convolutions on GPUs)",
    "sampler": "ddpm: Algorithm 2 (respaced when sample_steps < T); ddim: DDIM (Song et al. 2021)",
    "sample_steps": "network evaluations per sample, out of T (None: all T)",
    "eta": "DDIM's noise: 0 deterministic, 1 as DDPM's posterior variance (ddim only)",
    "skip_type": "which sample_steps timesteps are visited: uniform or quadratic (as DDIM)",
    "variance": "sigma_t^2 of ddpm: fixedlarge beta_t (the original) or fixedsmall (the posterior's)",
    "process_frames": "columns of the process picture and frames of its GIF, at most sample_steps + 1 (0: neither)",
    "sampledProcessImgName": "file name of the picture of the denoising process: x_t and predicted x_0",
    "sampledProcessGifName": "file name of the animated GIF of the grid from noise to samples",
    "num_samples": "images eval exports as single PNGs into export_dir (0: none); fid scores them",
    "export_dir": "folder of the exported samples (MainCondition.py: a subfolder per w)",
    "fid_images": "folder of images that state fid scores (None: the checkpoint's num_samples samples)",
    "fid_extractor": "features of FID and IS: inception (downloaded once) or a StandInClassifier file",
    "fid_stats_dir": "folder caching the training set's FID statistics",
}


# Keys one script lacks on purpose, and why (said instead of "unknown config key").
WHY_ABSENT = {
    "attn": "the class-conditional model's attention is fixed (self-attention after every "
            "down-path block, as the original); leave it out",
}
