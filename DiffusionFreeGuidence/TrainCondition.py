"""Training and eval of the class-conditional DDPM with classifier-free guidance.

The recipe (optimizer, schedule, checkpoints, data) is Diffusion/Train.py's; what differs is
the labels: shifted by one so that 0 is the null label, dropped at random while training, and
the guided sampling of one class per grid row, for one or more guidance weights w.
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
from Diffusion.Distributed import torchrun_processes
from Diffusion.Export import export_samples
from Diffusion.Images import save_grid, starting_noise
from Diffusion.Metrics import report_scores
from Diffusion.Process import ProcessRecorder, frames_of, save_process_gif, save_process_picture
from Diffusion.Sampling import sampler_of, steps_of
from Diffusion.ScheduleCheck import warn_if_x_T_keeps_the_image
from Diffusion.Speed import place
from Diffusion.Train import fit, seed_everything
from Diffusion.TrainingState import weights_to_sample
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
        sampler = sampler_of({**config, "compile": False}, model, w)  # not compiled again each time
        return sampler(starting_noise(len(labels), config, device), labels, progress=False), per_class
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


def trained_model(config, device):
    """The conditional UNet of test_load_weight (its number of classes read from the checkpoint;
    the EMA weights unless use_ema is false), on `device`, in eval mode, and that number."""
    state_dict = weights_to_sample(config["save_dir"], config["test_load_weight"], config, device)
    # An unconditional checkpoint has no class table; it fails to load below, saying so.
    num_labels = num_labels_of(state_dict) or 1
    model = unet_of(config, num_labels)
    load_into(model, state_dict, os.path.join(config["save_dir"], config["test_load_weight"]), config)
    return place(model, config, device).eval(), num_labels


def guidance_weights(config):
    """config["w"] as a list: one grid (and one export folder) per guidance weight."""
    return list(config["w"]) if isinstance(config["w"], (list, tuple)) else [config["w"]]


def side_by_side(samples, per_class):
    """One grid per guidance weight, per_class images per row: [len(samples), 3, H', W']."""
    return torch.stack([make_grid(images, nrow=per_class, pad_value=-1.) for images in samples])


def eval(modelConfig):
    """Sample batch_size // classes images of each class (one class per row) from
    test_load_weight; with a list of guidance weights w, one grid per w, side by side, from
    the same noise; the denoising process of the first image of each class; export
    num_samples single images per w (under torchrun, each process its share)."""
    warn_if_x_T_keeps_the_image(modelConfig)
    with torchrun_processes(modelConfig) as processes:
        config = processes.on_its_device(modelConfig)
        seed_everything(config["seed"])
        model, num_labels = trained_model(config, processes.device)
        classes = classes_to_sample(config, num_labels)
        if processes.is_main:
            save_guided_samples_and_process(config, model, classes, num_labels)
        if config["num_samples"]:
            export(config, model, classes, processes)


def save_guided_samples_and_process(config, model, classes, num_labels):
    """The starting noise, one grid of samples per w (a row per class) and the process."""
    device = torch.device(config["device"])
    per_class = config["batch_size"] // len(classes)
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class) + 1
    x_T = starting_noise(len(labels), config, device)
    save_grid(x_T, config["sampled_dir"], config["sampledNoisyImgName"], per_class)

    weights = guidance_weights(config)
    noise_seed = int(torch.randint(2 ** 62, ()))
    samples, recorders = [], []
    for w in weights:
        torch.manual_seed(noise_seed)  # the same noise at every step for every w
        recorders.append(ProcessRecorder(steps_of(config), frames_of(config)))
        on_step = recorders[-1] if config["process_frames"] else None
        samples.append(sampler_of(config, model, w)(x_T, labels, on_step=on_step))
    save_grid(side_by_side(samples, per_class), config["sampled_dir"], config["sampledImgName"], len(weights))
    if config["process_frames"]:
        save_process(config, recorders, samples, per_class)
    names = class_names(config["save_dir"], num_labels, config["dataset"])
    tqdm.write(f"rows: {', '.join(names[c] for c in classes)} (classes {classes}); grids left to "
               f"right: w = {', '.join(map(str, weights))}")


def save_process(config, recorders, samples, per_class):
    """The process picture (rows: the first image of each class, for each w in turn) and the GIF
    of the grids side by side."""
    for recorder, x_0 in zip(recorders, samples):
        recorder.finish(x_0)
    first_of_each_class = torch.arange(0, len(samples[0]), per_class)
    save_process_picture(torch.cat([r.x_t[:, first_of_each_class] for r in recorders], dim=1),
                         torch.cat([r.x_0[:, first_of_each_class] for r in recorders], dim=1),
                         config["sampled_dir"], config["sampledProcessImgName"])
    frames = torch.stack([side_by_side([r.x_t[frame] for r in recorders], per_class)
                          for frame in range(frames_of(config))])
    save_process_gif(frames, len(recorders), config["sampled_dir"], config["sampledProcessGifName"])


def export_folder(config, w):
    """Where the samples guided by w are exported: export_dir/w{w}."""
    return os.path.join(config["export_dir"], f"w{w:g}")


def export(config, model, classes, processes):
    """num_samples samples per guidance weight, the classes taking turns, as PNG files in
    export_folder(config, w)."""
    device = torch.device(config["device"])
    class_labels = torch.tensor(classes, device=device) + 1
    for w in guidance_weights(config):
        sampler = sampler_of(config, model, w)

        def draw(first, count):
            labels = class_labels[torch.arange(first, first + count, device=device) % len(classes)]
            return sampler(starting_noise(count, config, device), labels)
        export_samples(draw, export_folder(config, w), config["num_samples"], config["batch_size"], processes,
                       config["seed"], description=f"export w={w:g}")


def fid(modelConfig):
    """FID and IS against the training set of fid_images or, when that is None, of num_samples
    samples of test_load_weight for each w, exported first (continuing an earlier export; under
    torchrun, each process exports its share and the first one scores)."""
    with torchrun_processes(modelConfig) as processes:
        config = processes.on_its_device(modelConfig)
        if config["fid_images"] is not None:
            folders = {"samples": config["fid_images"]}
        else:
            model, num_labels = trained_model(config, processes.device)
            export(config, model, classes_to_sample(config, num_labels), processes)
            folders = {f"w = {w:g}": export_folder(config, w) for w in guidance_weights(config)}
        if processes.is_main:
            report_scores(config, folders)
