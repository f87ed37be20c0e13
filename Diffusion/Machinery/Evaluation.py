"""Sampling a trained model, for both models: `evaluate` (state eval: the grids of samples, the
denoising process, exported samples), `score` (state fid: FID and IS), and the grid and the FID
a training run draws now and then (`preview_of`, `fid_of`).

A model's `layout` says how its samples are conditioned and laid out: `Unconditional` below, or
one class per row for the class-conditional model (DiffusionFreeGuidence/TrainCondition.py).
"""
import os

import torch
from torchvision.utils import make_grid
from tqdm import tqdm

from Diffusion.Machinery.Checkpoint import check_trained_as_configured, load_into, num_labels_of
from Diffusion.Machinery.DenoisingProcess import (
    ProcessRecorder,
    frames_of,
    save_process_gif,
    save_process_picture,
)
from Diffusion.Machinery.Export import export_samples
from Diffusion.Machinery.Images import as_uint8_rgb, save_grid, starting_noise
from Diffusion.Machinery.Metrics import extractor_of, feature_batches, fid_metric, report_scores
from Diffusion.Machinery.Processes import torchrun_processes
from Diffusion.Machinery.Sampling import sampler_of, steps_of
from Diffusion.Machinery.ScheduleCheck import warn_if_x_T_keeps_the_image
from Diffusion.Machinery.Speed import for_sampling, memory_format
from Diffusion.Machinery.TrainingState import weights_to_sample

PROCESS_ROWS = 8  # unconditional samples shown in the picture of the denoising process


class Unconditional:
    """The unconditional model's samples: a grid of `count` images, `per_row` per row, with no
    labels and no guidance weight. A layout gives
    - weights: the guidance weights, one grid (and one export folder) each; (None,): unguided;
    - grid_condition(device), export_condition(indices): the model inputs besides x_t and t for
      the samples of the grid, and for the exported samples of these indices: () here,
      (labels,) for the conditional model;
    - process_rows: which samples of the grid the process picture shows;
    - folder(export_dir, w), name(w): where the samples guided by w are exported, and their name;
    - describe(): a line on the rows of the grid, or None.
    Eval's layout is `for_eval(config, num_labels)`; a training run's grid is `for_preview`;
    `weights_of(config)` are the guidance weights alone (state nll)."""
    weights = (None,)

    def __init__(self, count, per_row):
        self.count, self.per_row = count, per_row
        self.process_rows = slice(0, PROCESS_ROWS)

    @classmethod
    def for_eval(cls, config, num_labels):
        return cls(config["batch_size"], config["nrow"])

    @classmethod
    def for_preview(cls, config, num_labels):
        return cls(16, 4)

    @classmethod
    def weights_of(cls, config):
        return cls.weights

    def grid_condition(self, device):
        return ()

    def export_condition(self, indices):
        return ()

    def folder(self, export_dir, w):
        return export_dir

    def name(self, w):
        return "samples"

    def describe(self):
        return None


def trained_model(config, pieces, device):
    """The model of test_load_weight in the checkpoint folder (the EMA weights unless use_ema
    is false; its classes read from the checkpoint), on `device`, in eval mode, and the number
    of its classes (None: unconditional)."""
    folder, name = config[pieces.folder_key], config["test_load_weight"]
    check_trained_as_configured(folder, config)
    state_dict = weights_to_sample(folder, name, config["use_ema"], device)
    num_labels = num_labels_of(state_dict)
    # An unconditional checkpoint has no class table; it fails to load into the conditional
    # model below, saying so.
    model = pieces.unet(config, num_labels or 1)
    load_into(model, state_dict, os.path.join(folder, name))
    return model.to(device, memory_format=memory_format(config["channels_last"])).eval(), num_labels


def samplers_of(config, pieces, model, weights):
    """[(w, the configured sampler of `model` guided by w)] for each of `weights` (the speed
    options applied once)."""
    network = for_sampling(model, config)
    return [(w, sampler_of(config, pieces.guide(network, w))) for w in weights]


def side_by_side(sample_sets, per_row):
    """Sets of samples [N, C, H, W] (one per guidance weight) as the images of one picture and
    the number of images per row: one set as it is, `per_row` per row; several as one grid
    each, side by side."""
    if len(sample_sets) == 1:
        return sample_sets[0], per_row
    grids = [make_grid(images, nrow=per_row, pad_value=-1.) for images in sample_sets]
    return torch.stack(grids), len(sample_sets)


def evaluate(config, pieces):
    """State eval: from test_load_weight, the grid of starting noise, the grid of samples (one
    per guidance weight, side by side, from the same noise), the denoising process, and
    num_samples exported images (under torchrun, each process its share)."""
    warn_if_x_T_keeps_the_image(config["beta_1"], config["beta_T"], config["T"], config["beta_schedule"])
    with torchrun_processes(config["device"], if_lost=export_kept(config)) as processes:
        config = processes.on_its_device(config)
        if config["seed"] is not None:
            torch.manual_seed(config["seed"])
        model, num_labels = trained_model(config, pieces, processes.device)
        layout = pieces.layout.for_eval(config, num_labels)
        samplers = samplers_of(config, pieces, model, layout.weights)
        if processes.is_main:
            save_grids_and_process(config, samplers, layout)
        if config["num_samples"]:
            export(config, samplers, layout, processes)


def save_grids_and_process(config, samplers, layout):
    """The starting noise, the samples of it (a grid per guidance weight) and the process."""
    device = torch.device(config["device"])
    x_T = starting_noise(layout.count, config, device)
    condition = layout.grid_condition(device)
    save_grid(x_T, config["sampled_dir"], config["sampledNoisyImgName"], layout.per_row)
    noise_seed = int(torch.randint(2 ** 62, ()))
    samples, recorders = [], []
    for _, sampler in samplers:
        torch.manual_seed(noise_seed)  # the same noise at every step for every w
        recorders.append(ProcessRecorder(steps_of(config), frames_of(config)))
        samples.append(sampler(x_T, *condition, on_step=recorders[-1] if config["process_frames"] else None))
    grids, per_row = side_by_side(samples, layout.per_row)
    save_grid(grids, config["sampled_dir"], config["sampledImgName"], per_row)
    if config["process_frames"]:
        save_process(config, recorders, samples, layout)
    if layout.describe():
        tqdm.write(layout.describe())


def save_process(config, recorders, samples, layout):
    """The process picture (rows: layout.process_rows of the grid, for each w in turn; x_t on
    the left, the predicted x_0 on the right) and the GIF of the grids from noise to samples."""
    for recorder, x_0 in zip(recorders, samples):
        recorder.finish(x_0)
    rows = layout.process_rows
    save_process_picture(torch.cat([r.x_t[:, rows] for r in recorders], dim=1),
                         torch.cat([r.x_0[:, rows] for r in recorders], dim=1),
                         config["sampled_dir"], config["sampledProcessImgName"])
    frames = [side_by_side([r.x_t[frame] for r in recorders], layout.per_row)
              for frame in range(frames_of(config))]
    save_process_gif(torch.stack([images for images, _ in frames]), frames[0][1], config["sampled_dir"],
                     config["sampledProcessGifName"])


def export(config, samplers, layout, processes):
    """num_samples samples of each sampler as PNG files, in the layout's folder for its w; returns
    {name: folder}."""
    device = torch.device(config["device"])
    folders = {}
    for w, sampler in samplers:
        def draw(first, count):
            condition = layout.export_condition(torch.arange(first, first + count, device=device))
            return sampler(starting_noise(count, config, device), *condition)
        folder = folders[layout.name(w)] = layout.folder(config["export_dir"], w)
        export_samples(draw, folder, config["num_samples"], config["batch_size"], processes, config["seed"],
                       description="export" if w is None else f"export w={w:g}")
    return folders


def export_kept(config):
    """What a lost process leaves of an export, and how to continue it."""
    return (f": the samples exported so far are kept in {config['export_dir']}; the same command "
            f"continues the export") if config["num_samples"] else ""


def score(config, pieces):
    """State fid: FID and IS against the training set of fid_images or, when that is None, of
    num_samples samples of test_load_weight (for each w), exported first (continuing an earlier
    export; under torchrun, each process exports its share and the first one scores)."""
    with torchrun_processes(config["device"], if_lost=export_kept(config)) as processes:
        config = processes.on_its_device(config)
        if config["fid_images"] is not None:
            folders = {"samples": config["fid_images"]}
        else:
            model, num_labels = trained_model(config, pieces, processes.device)
            layout = pieces.layout.for_eval(config, num_labels)
            folders = export(config, samplers_of(config, pieces, model, layout.weights), layout, processes)
        if processes.is_main:
            report_scores(config, folders)


def fid_of(config, pieces, num_labels):
    """fid(model) -> the FID against the training set of fid_samples samples of `model`, drawn
    in batches of batch_size with the configured sampler and the first guidance weight (the
    classes in turn): a training run's FID every fid_every epochs. The extractor and the training
    set's statistics are had now, so that a missing extractor stops the run at its start and no
    FID draws on random numbers but the samples' own."""
    layout = pieces.layout.for_preview(config, num_labels)
    extractor = extractor_of(config["fid_extractor"])
    metric = fid_metric(config, extractor)
    count, batch_size = config["fid_samples"], config["batch_size"]

    def fid(model):
        device = next(model.parameters()).device
        sampler = sampler_of({**config, "compile": False}, pieces.guide(model, layout.weights[0]))

        def batches():
            for first in range(0, count, batch_size):
                indices = torch.arange(first, min(first + batch_size, count), device=device)
                x_T = starting_noise(len(indices), config, device)
                yield as_uint8_rgb(sampler(x_T, *layout.export_condition(indices), progress=False))
        metric.reset()  # the samples' side; the training set's statistics stay
        for features, _ in feature_batches(batches(), extractor, device):
            metric.update(features, real=False)
        return metric.compute().item()
    return fid


def preview_of(config, pieces, num_labels):
    """preview(model) -> (images [N, C, H, W], images per row): the grid a training run draws
    every sample_every epochs, with the first guidance weight."""
    layout = pieces.layout.for_preview(config, num_labels)

    def preview(model):
        device = next(model.parameters()).device
        sampler = sampler_of({**config, "compile": False}, pieces.guide(model, layout.weights[0]))
        condition = layout.grid_condition(device)
        return sampler(starting_noise(layout.count, config, device), *condition, progress=False), layout.per_row
    return preview
