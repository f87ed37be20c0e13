"""What classifier-free guidance brings to Diffusion/'s training and sampling: its UNet, the
labels (shifted by one so that 0 is the null label, dropped at random while training), the loss
reduced as the original's, the guided noise estimate, and grids of one class per row for one or
more guidance weights w. Training, eval, export and FID are Diffusion/'s, given this variant.
"""
from dataclasses import replace
from functools import partial

import torch

from Diffusion.Run.Checkpoints import class_names
from Diffusion.Run.Config import ConfigError, complete
from Diffusion.Run.Evaluation import evaluate, guidance_weights
from Diffusion.Run.Keys import KEYS, Key
from Diffusion.Run.Processes import SINGLE_PROCESS
from Diffusion.Train import Variant, fit, output_channels
from DiffusionFreeGuidence.DiffusionCondition import ClassifierFreeGuidance
from DiffusionFreeGuidence.ModelCondition import UNet

# MainCondition.py's keys: Main.py's with the defaults the conditional model changes, and those
# of guidance.
GUIDANCE_KEYS = {
    **KEYS,
    **{key: replace(KEYS[key], default=value) for key, value in {
        "epoch": 70, "T": 500, "channel_mult": [1, 2, 2, 2], "multiplier": 2.5, "beta_T": 0.028,
        "test_load_weight": "ckpt_63_.pt", "sampledNoisyImgName": "NoisyGuidenceImgs.png",
        "sampledImgName": "SampledGuidenceImgs.png",
        "save_every": 8,  # so that ckpt_63_.pt, eval's default (the original's), is a snapshot
        "sampledProcessImgName": "ProcessGuidenceImgs.png", "sampledProcessGifName": "ProcessGuidence.gif",
        "export_dir": "./SampledImgs/GuidenceSamples/"}.items()},
    "w": Key(1.8, "guidance weight: eps = (1 + w) eps(x, c) - w eps(x); a list gives one grid per value",
             kind=float | list[float]),
    "save_dir": Key("./CheckPoints/Condition/", "folder of this model's checkpoints ckpt_{epoch}_.pt"),
    "p_uncond": Key(0.1, "probability that a training example's label is replaced by the null label"),
    "labels": Key(None, "classes eval samples, one per row (None: every class); inpaint and sdedit: "
                         "the classes each image is edited towards, a result each (None: none, the "
                         "unconditional estimate)", kind=list[int]),
    "label_dropout": Key("example", "example: drop each label with p_uncond (the paper); batch: drop "
                                    "the whole batch's labels with p_uncond (the original)",
                         ("example", "batch")),
}


def unet_of(config, num_labels):
    """The conditional UNet that config describes, for `num_labels` classes."""
    return UNet(T=config["T"], num_labels=num_labels, ch=config["channel"],
                ch_mult=config["channel_mult"], num_res_blocks=config["num_res_blocks"],
                dropout=config["dropout"], img_channels=config["img_channels"],
                out_channels=output_channels(config))


def drop_labels(labels, p_uncond, mode="example", draws=SINGLE_PROCESS):
    """Replace labels [B] by the null label 0 with probability p_uncond (Ho & Salimans 2022,
    Algorithm 1: c <- null with probability p_uncond): each label independently ("example", the
    paper's), or the whole global batch's at once ("batch", the original's). draws: a
    GlobalBatchRandomness (Processes.py)."""
    if mode == "example":
        keep = draws.rand(labels.shape[0], labels.device) >= p_uncond
    else:
        keep = draws.rand_one(labels.device) >= p_uncond
    return labels * keep


def dropped_labels(labels, draws, p_uncond, label_dropout):
    """The model input of a training batch: its labels shifted to 1..num_labels, some dropped."""
    return (drop_labels(labels + 1, p_uncond, label_dropout, draws),)


def condition_of(config):
    """dropped_labels with config's p_uncond and label_dropout."""
    return partial(dropped_labels, p_uncond=config["p_uncond"], label_dropout=config["label_dropout"])


def guided_loss(error, global_batch):
    """Algorithm 1's loss, reduced as the original's guided model: the sum over the batch /
    batch_size^2 (of the global batch)."""
    return error.sum() / global_batch ** 2


class ClassRows:
    """The conditional model's samples (a grid, as Diffusion/Run/Evaluation.py's PlainGrid):
    one row of `per_row` images for each of `classes` (0-based), one grid per guidance weight of
    `weights`; exported samples take the classes in turn. `names`: the names of all the
    checkpoint's classes."""

    def __init__(self, classes, per_row, weights, names):
        self.classes, self.per_row, self.weights, self.names = classes, per_row, weights, names
        self.count = per_row * len(classes)
        self.process_rows = slice(0, self.count, per_row)  # the first image of each class

    @classmethod
    def for_eval(cls, config, num_labels):
        """config["labels"] (or every class), batch_size // classes images of each."""
        classes = classes_to_sample(config, num_labels)
        return cls(classes, config["batch_size"] // len(classes), guidance_weights(config),
                   class_names(config["save_dir"], num_labels, config["dataset"]))

    @classmethod
    def for_preview(cls, config, num_labels):
        """4 samples of each class, with the first w."""
        return cls(list(range(num_labels)), 4, guidance_weights(config)[:1],
                   class_names(config["save_dir"], num_labels, config["dataset"]))

    def grid_condition(self, device):
        """The labels of the grid's samples [count], in 1..num_labels (0 is the null label)."""
        return (torch.tensor(self.classes, device=device).repeat_interleave(self.per_row) + 1,)

    def export_condition(self, indices):
        """The labels of the exported samples with these indices [N]: the classes in turn."""
        classes = torch.tensor(self.classes, device=indices.device)
        return (classes[indices % len(classes)] + 1,)

    def describe(self):
        return (f"rows: {', '.join(self.names[c] for c in self.classes)} (classes {self.classes}); "
                f"grids left to right: w = {', '.join(map(str, self.weights))}")


def classes_to_sample(config, num_labels):
    """The 0-based classes of the grid's rows: config["labels"], or every class."""
    classes = config["labels"] if config["labels"] is not None else list(range(num_labels))
    if max(classes) >= num_labels:
        raise ConfigError(f"labels {classes} names class {max(classes)}, but the checkpoint "
                          f"knows {num_labels} classes (0..{num_labels - 1}).")
    if config["batch_size"] < len(classes):
        raise ConfigError(f"batch_size {config['batch_size']} is below the {len(classes)} "
                          f"classes to sample (one row each): raise batch_size or list fewer "
                          f"labels.")
    return classes


CONDITIONAL = Variant(
    keys=GUIDANCE_KEYS, checkpoints_key="save_dir", labelled=True, unet=unet_of, condition=condition_of,
    loss=guided_loss, guide=ClassifierFreeGuidance, grid=ClassRows,
    absent={"attn": "the class-conditional model's attention is fixed (self-attention after every "
                    "down-path block, as the original); leave it out"})


def train(modelConfig):
    """Train the class-conditional model of `modelConfig` (keys it leaves out take their
    defaults)."""
    fit(complete(modelConfig, CONDITIONAL.keys, CONDITIONAL.absent), CONDITIONAL)


def eval(modelConfig):
    """Sample one row per class from test_load_weight, a grid per guidance weight w (keys it
    leaves out take their defaults)."""
    evaluate(complete(modelConfig, CONDITIONAL.keys, CONDITIONAL.absent), CONDITIONAL)
