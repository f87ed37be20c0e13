"""Training and eval of the class-conditional DDPM with classifier-free guidance.

The recipe (optimizer, schedule, checkpoints, data) is Diffusion/Train.py's; what differs is
the labels: shifted by one so that 0 is the null label, dropped at random while training, and
the guided sampling of one class per grid row.
"""
import os
from functools import partial

import torch
from torchvision.utils import make_grid
from tqdm import tqdm

from Diffusion.Checkpoint import class_names, load_into, num_labels_of
from Diffusion.Config import ConfigError
from Diffusion.Data import training_dataset
from Diffusion.Diffusion import SINGLE_PROCESS
from Diffusion.ScheduleCheck import warn_if_x_T_keeps_the_image
from Diffusion.Train import fit, save_grid, seed_everything, starting_noise
from Diffusion.TrainingState import weights_to_sample
from DiffusionFreeGuidence.DiffusionCondition import GaussianDiffusionSampler
from DiffusionFreeGuidence.ModelCondition import UNet

def unet_of(config, num_labels):
    """The conditional UNet that config describes, for `num_labels` classes."""
    return UNet(T=config["T"], num_labels=num_labels, ch=config["channel"],
                ch_mult=config["channel_mult"], num_res_blocks=config["num_res_blocks"],
                dropout=config["dropout"], img_channels=config["img_channels"])


def drop_labels(labels, p_uncond, mode="example", batch=SINGLE_PROCESS):
    """Replace labels [B] by the null label 0 with probability p_uncond (Ho & Salimans 2022,
    Algorithm 1: c <- null with probability p_uncond): each label independently ("example", the
    paper's), or the whole global batch's at once ("batch", the original's)."""
    if mode == "example":
        keep = batch.rand(labels.shape[0], labels.device) >= p_uncond
    else:
        keep = batch.rand_one(labels.device) >= p_uncond
    return labels * keep


def guided_loss(trainer, x_0, labels, batch, p_uncond, label_dropout):
    """Algorithm 1 with labels shifted to 1..num_labels and randomly dropped; the loss is
    reduced as the original: the sum over the batch / batch_size^2 (of the global batch)."""
    conditions = drop_labels(labels + 1, p_uncond, label_dropout, batch)
    return trainer(x_0, conditions, batch=batch).sum() / batch.size(x_0.shape[0]) ** 2


def train(modelConfig):
    warn_if_x_T_keeps_the_image(modelConfig)
    seed_everything(modelConfig["seed"])  # the initial weights
    dataset = training_dataset(modelConfig, labelled=True)
    model = unet_of(modelConfig, num_labels=len(dataset.classes))
    loss = partial(guided_loss, p_uncond=modelConfig["p_uncond"],
                   label_dropout=modelConfig["label_dropout"])
    fit(modelConfig, model, dataset, modelConfig["save_dir"], loss,
        preview=conditional_preview(modelConfig, len(dataset.classes)),
        run_info={"classes": list(dataset.classes)})


def conditional_preview(config, num_labels, per_class=4):
    """preview(model): `per_class` guided samples of each class, one class per row."""
    w = config["w"][0] if isinstance(config["w"], (list, tuple)) else config["w"]

    def preview(model):
        device = next(model.parameters()).device
        labels = torch.arange(1, num_labels + 1, device=device).repeat_interleave(per_class)
        sampler = GaussianDiffusionSampler(model, config["beta_1"], config["beta_T"], config["T"],
                                           w=w, clip_denoised=config["clip_denoised"]).to(device)
        return sampler(starting_noise(len(labels), config, device), labels,
                       progress=False), per_class
    return preview


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


def eval(modelConfig):
    """Sample batch_size // classes images of each class (one class per row) from
    test_load_weight; with a list of guidance weights w, one grid per w, side by side, from
    the same noise."""
    config = modelConfig
    warn_if_x_T_keeps_the_image(config)
    device = torch.device(config["device"])
    seed_everything(config["seed"])
    state_dict = weights_to_sample(config["save_dir"], config["test_load_weight"], config, device)
    # An unconditional checkpoint has no class table; it fails to load below, saying so.
    num_labels = num_labels_of(state_dict) or 1
    model = unet_of(config, num_labels)
    load_into(model, state_dict, os.path.join(config["save_dir"], config["test_load_weight"]), config)
    model.to(device).eval()

    classes = classes_to_sample(config, num_labels)
    per_class = config["batch_size"] // len(classes)
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class) + 1
    x_T = starting_noise(len(labels), config, device)
    save_grid(x_T, config["sampled_dir"], config["sampledNoisyImgName"], per_class)

    weights = config["w"] if isinstance(config["w"], (list, tuple)) else [config["w"]]
    noise_seed = int(torch.randint(2 ** 62, ()))
    grids = []
    for w in weights:
        torch.manual_seed(noise_seed)  # the same noise at every step for every w
        sampler = GaussianDiffusionSampler(model, config["beta_1"], config["beta_T"], config["T"],
                                           w=w, clip_denoised=config["clip_denoised"]).to(device)
        grids.append(make_grid(sampler(x_T, labels), nrow=per_class, pad_value=-1.))
    save_grid(torch.stack(grids), config["sampled_dir"], config["sampledImgName"], len(grids))
    names = class_names(config["save_dir"], num_labels, config["dataset"])
    tqdm.write(f"rows: {', '.join(names[c] for c in classes)} (classes {classes}); grids left to "
               f"right: w = {', '.join(map(str, weights))}")
