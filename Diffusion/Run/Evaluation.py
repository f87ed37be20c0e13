"""A trained model evaluated, for both models: state eval (the grids of samples, the denoising
process, the exported samples), state fid (FID and IS of exported samples), state nll (the bound of
DDPM Eq. 5 on held-out images), each in every process of torchrun; and the grid and the FID a training
run draws now and then. A model's `grid` (`PlainGrid`, or TrainCondition.py's ClassRows) lays out its
samples; each guidance weight w of the conditional model gets its own grid, from the same noise. The
denoising process: `process_frames` evenly spaced states of a sampler run (ProcessRecorder) make a
picture of a few samples going from noise to image and an animated GIF of the whole grid.
"""
import functools
import math
import os

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm

from Diffusion.Likelihood import variational_bound
from Diffusion.Run.Checkpoints import (
    check_trained_as_configured, load_into, num_labels_of, weights_to_sample, write_atomically)
from Diffusion.Run.Config import ConfigError, steps_of
from Diffusion.Run.Data import image_folder, image_transform, is_torchvision_dataset, torchvision_dataset
from Diffusion.Run.Metrics import extractor_of, feature_batches, fid_metric, report_scores
from Diffusion.Run.Processes import memory_format, sum_over_processes, torchrun_group
from Diffusion.Run.Sampling import (
    as_uint8_rgb, batch_seed, export_samples, sampler_of, save_grid, starting_noise, to_unit_range,
    under_speed_options, warn_if_x_T_keeps_the_image)

PROCESS_ROWS = 8  # unconditional samples shown in the picture of the denoising process
FRAME_MILLISECONDS = 150  # each GIF frame, but the last
LAST_FRAME_MILLISECONDS = 2000  # the samples stay a while before the loop starts again
TERMS = ("total", "prior", "diffusion", "decoder")  # of the bound, in state nll


class PlainGrid:
    """The unconditional model's samples: `count` images, `per_row` per row. A grid gives the model
    inputs besides x_t and t of its samples (grid_condition: () here, (labels,) when conditional) and
    of exported indices (export_condition), the samples the process picture shows (process_rows) and a
    line on its rows (describe). Eval's grid is `for_eval(config, num_labels)`, training's `for_preview`."""

    def __init__(self, count, per_row):
        self.count, self.per_row, self.process_rows = count, per_row, slice(0, PROCESS_ROWS)

    @classmethod
    def for_eval(cls, config, num_labels):
        return cls(config["batch_size"], config["nrow"])

    @classmethod
    def for_preview(cls, config, num_labels):
        return cls(16, 4)

    def grid_condition(self, device):
        return ()

    def export_condition(self, indices):
        return ()

    def describe(self):
        return None


def guidance_weights(config):
    """The guidance weights w of config, one grid (and export folder) each; (None,) when unconditional."""
    w = config.get("w")
    return tuple(w) if isinstance(w, (list, tuple)) else (w,)


def export_folder(export_dir, w):
    """Where the samples guided by w are exported: a subfolder w{w} of export_dir per w."""
    return export_dir if w is None else os.path.join(export_dir, f"w{w:g}")


def on_every_process(state):
    """state(config, variant, process) run in every process of torchrun (or in this one), with config's
    device that of the process (cuda:LOCAL_RANK under torchrun on GPUs)."""
    @functools.wraps(state)
    def run(config, variant):
        kept = (f": the samples exported so far are kept in {config['export_dir']}; the same command "
                f"continues the export") if config["num_samples"] and config["state"] in ("eval", "fid") else ""
        with torchrun_group(config["device"], if_lost=kept) as process:
            return state({**config, "device": str(process.device)}, variant, process)
    return run


def trained_model(config, variant, device):
    """(the model of test_load_weight in the checkpoint folder, EMA weights unless use_ema is false, on
    `device`, in eval mode; the number of its classes, read from the checkpoint, None: unconditional)."""
    folder, name = config[variant.checkpoints_key], config["test_load_weight"]
    check_trained_as_configured(folder, config)
    state_dict = weights_to_sample(folder, name, config["use_ema"], device)
    num_labels = num_labels_of(state_dict)
    # An unconditional checkpoint has no class table: a conditional model refuses it, saying so.
    model = variant.unet(config, num_labels or 1)
    load_into(model, state_dict, os.path.join(folder, name))
    return model.to(device, memory_format=memory_format(config["channels_last"])).eval(), num_labels


def samplers_of(config, variant, model):
    """[(w, the configured sampler of `model` guided by w)] for each w of config (speed options once)."""
    network = under_speed_options(model, config["amp"], config["compile"], config["channels_last"],
                                  config["device"])
    return [(w, sampler_of(config, variant.guide(network, w))) for w in guidance_weights(config)]


@on_every_process
def evaluate(config, variant, process):
    """State eval: from test_load_weight, the grid of starting noise, the grid of samples (one per
    guidance weight, side by side), the denoising process, and num_samples exported images."""
    warn_if_x_T_keeps_the_image(config["beta_1"], config["beta_T"], config["T"], config["beta_schedule"])
    if config["seed"] is not None:
        torch.manual_seed(config["seed"])
    model, num_labels = trained_model(config, variant, process.device)
    grid = variant.grid.for_eval(config, num_labels)
    samplers = samplers_of(config, variant, model)
    if process.is_main:
        save_grids_and_process(config, samplers, grid)
    if config["num_samples"]:
        export(config, samplers, grid, process)


def side_by_side(sample_sets, per_row):
    """Sets of samples [N, C, H, W] (one per guidance weight) as (the images of one picture, images per
    row): one set as it is, `per_row` per row; several as one grid each, side by side."""
    if len(sample_sets) == 1:
        return sample_sets[0], per_row
    grids = [make_grid(images, nrow=per_row, pad_value=-1.) for images in sample_sets]
    return torch.stack(grids), len(sample_sets)


def save_grids_and_process(config, samplers, grid):
    """The starting noise, the samples of it (a grid per guidance weight) and the process."""
    device = torch.device(config["device"])
    x_T = starting_noise(grid.count, config["img_channels"], config["img_size"], device)
    save_grid(x_T, os.path.join(config["sampled_dir"], config["sampledNoisyImgName"]), grid.per_row)
    frames = min(config["process_frames"], steps_of(config) + 1)
    noise_seed = int(torch.randint(2 ** 62, ()))
    samples, recorders = [], []
    for _, sampler in samplers:
        torch.manual_seed(noise_seed)  # the same noise at every step for every w
        recorders.append(ProcessRecorder(steps_of(config), frames))
        samples.append(sampler(x_T, *grid.grid_condition(device), on_step=recorders[-1] if frames else None))
    pictures, per_row = side_by_side(samples, grid.per_row)
    save_grid(pictures, os.path.join(config["sampled_dir"], config["sampledImgName"]), per_row)
    if frames:
        save_process(config, grid, recorders, samples)
    if grid.describe():
        tqdm.write(grid.describe())


class ProcessRecorder:
    """Pass as the sampler's on_step, then finish(x_0) with its result: keeps `frames` evenly spaced
    states of the steps + 1 of a run, on the device. `x_t` and `x_0` are then [F, B, C, H, W]: the
    states and the x_0 predicted from each (the final image predicts itself)."""

    def __init__(self, steps, frames):
        self.kept_states = set(torch.linspace(0, steps, frames).round().long().tolist())
        self.state, self.states, self.predictions = 0, [], []

    def __call__(self, x_t, x_0):
        if self.state in self.kept_states:
            self.states.append(x_t)
            self.predictions.append(x_0)
        self.state += 1

    def finish(self, x_0):
        self(x_0, x_0)
        self.x_t, self.x_0 = torch.stack(self.states), torch.stack(self.predictions)


def save_process(config, grid, recorders, samples):
    """The recorders finished with their samples, then the process picture, a row per sample of
    grid.process_rows for each w in turn: x_t at the kept states on the left, the x_0 predicted at each
    on the right; and a GIF, a grid per kept state."""
    for recorder, x_0 in zip(recorders, samples):
        recorder.finish(x_0)
    rows, folder = grid.process_rows, config["sampled_dir"]
    def block(frames):  # [F, R, C, H, W] -> the R rows of F states
        return make_grid(frames.transpose(0, 1).flatten(0, 1), nrow=frames.shape[0], pad_value=-1.)
    x_t, x_0 = (torch.cat([getattr(r, part)[:, rows] for r in recorders], dim=1) for part in ("x_t", "x_0"))
    save_grid(torch.stack([block(x_t), block(x_0)]), os.path.join(folder, config["sampledProcessImgName"]), nrow=2)
    frames = [side_by_side([r.x_t[frame] for r in recorders], grid.per_row) for frame in range(len(x_t))]
    pictures = [to_pil_image(make_grid(to_unit_range(images.cpu()), nrow=per_row)) for images, per_row in frames]
    durations = [FRAME_MILLISECONDS] * (len(pictures) - 1) + [LAST_FRAME_MILLISECONDS]
    path = os.path.join(folder, config["sampledProcessGifName"])
    write_atomically(lambda temporary: pictures[0].save(temporary, format="GIF", save_all=True, loop=0,
                                                        append_images=pictures[1:], duration=durations), path)
    tqdm.write(f"wrote {path}")


def export(config, samplers, grid, process):
    """num_samples samples of each sampler as PNGs in its w's folder -> {"samples" or "w = ...": folder}."""
    device = torch.device(config["device"])
    folders = {}
    for w, sampler in samplers:
        def draw(first, count):
            condition = grid.export_condition(torch.arange(first, first + count, device=device))
            return sampler(starting_noise(count, config["img_channels"], config["img_size"], device), *condition)
        folder = folders["samples" if w is None else f"w = {w:g}"] = export_folder(config["export_dir"], w)
        export_samples(draw, folder, config["num_samples"], config["batch_size"], process, config["seed"],
                       description="export" if w is None else f"export w={w:g}")
    return folders


@on_every_process
def score(config, variant, process):
    """State fid: FID and IS against the training set of fid_images or, when that is None, of
    num_samples samples of test_load_weight (for each w), exported first (continuing an earlier export;
    under torchrun, each process exports its share and the first one scores). The extractor is had
    first, so that one that cannot be had stops the run before the export."""
    extractor = extractor_of(config["fid_extractor"], config["img_size"]) if process.is_main else None
    if config["fid_images"] is not None:
        folders = {"samples": config["fid_images"]}
    else:
        model, num_labels = trained_model(config, variant, process.device)
        grid = variant.grid.for_eval(config, num_labels)
        folders = export(config, samplers_of(config, variant, model), grid, process)
    if process.is_main:
        report_scores(config, folders, extractor)


def preview_sampler(config, variant, model, num_labels):
    """(the configured sampler without compile, with the first guidance weight, and the grid of its
    samples): for a training run's grid and FID."""
    sampler = sampler_of({**config, "compile": False}, variant.guide(model, guidance_weights(config)[0]))
    return sampler, variant.grid.for_preview(config, num_labels)


def preview_of(config, variant, num_labels):
    """preview(model) -> (images [N, C, H, W], images per row): a training run's every sample_every epochs."""
    def preview(model):
        sampler, grid = preview_sampler(config, variant, model, num_labels)
        device = next(model.parameters()).device
        x_T = starting_noise(grid.count, config["img_channels"], config["img_size"], device)
        return sampler(x_T, *grid.grid_condition(device), progress=False), grid.per_row
    return preview


def fid_of(config, variant, num_labels):
    """fid(model) -> the FID against the training set of fid_samples samples of `model` (batches of
    batch_size, the first w, the classes in turn), a training run's every fid_every epochs. Extractor and
    statistics are had now: a missing extractor stops the run at once; only the samples draw random numbers."""
    extractor = extractor_of(config["fid_extractor"], config["img_size"])
    metric = fid_metric(config, extractor)
    count, batch_size = config["fid_samples"], config["batch_size"]
    def fid(model):
        sampler, grid = preview_sampler(config, variant, model, num_labels)
        device = next(model.parameters()).device
        def batches():
            for first in range(0, count, batch_size):
                indices = torch.arange(first, min(first + batch_size, count), device=device)
                x_T = starting_noise(len(indices), config["img_channels"], config["img_size"], device)
                yield as_uint8_rgb(sampler(x_T, *grid.export_condition(indices), progress=False))
        metric.reset()  # the samples' side; the training set's statistics stay
        for features, _ in feature_batches(batches(), extractor, device):
            metric.update(features, real=False)
        return metric.compute().item()
    return fid


# --- state nll --------------------------------------------------------------------------------


def held_out_images(config, num_labels):
    """The first nll_images (None: all) of nll_dataset (a folder; a subfolder per class when conditional)
    or of `dataset`'s test split (torchvision), as the model sees them ([-1, 1], img_size, no flip)."""
    transform = image_transform(config["img_size"], config["img_channels"])
    if config["nll_dataset"] is not None:
        images = image_folder(config["nll_dataset"], transform, labelled=num_labels is not None)
    elif is_torchvision_dataset(config["dataset"]):
        images = torchvision_dataset(config["dataset"], config["data_root"], transform, train=False)
    else:
        raise ConfigError(f"state nll scores held-out images, and dataset {config['dataset']!r} is a folder, "
                          f"which has no test split: set nll_dataset to a folder of held-out images.")
    classes = getattr(images, "classes", None) or []
    if num_labels is not None and len(classes) != num_labels:
        raise ConfigError(f"the checkpoint knows {num_labels} classes, but the held-out images have "
                          f"{len(classes)}: give held-out images of the same classes (nll_dataset).")
    if config["nll_images"] is not None and config["nll_images"] < len(images):
        images = Subset(images, range(config["nll_images"]))
    return images


@on_every_process
def likelihood(config, variant, process):
    """State nll: the negative log-likelihood of held-out images in bits per dimension, as DDPM's Table 1
    reports it: the variational bound of Eq. 5 (Diffusion/Likelihood.py) with the network of sampling
    (EMA weights, speed options; when conditional, the guided estimate of each w with the images' own
    classes), over all T steps with the model's variance (fixed or learned), each process scoring its
    share. Prints and returns {name: {term: (mean, standard error)}}, a name per w ("w = 1.8: ";
    unconditional: ""): the bound ("total") and its parts: the prior L_T, the KL terms summed
    ("diffusion"), the decoder L_0."""
    model, num_labels = trained_model(config, variant, process.device)
    images = held_out_images(config, num_labels)
    full_chain = {**config, "sampler": "ddpm", "sample_steps": None}  # all T steps
    results = {}
    for w, sampler in samplers_of(full_chain, variant, model):
        sums = held_out_sums(images, num_labels, config, process, bound_sums(sampler), len(TERMS) + 2, "nll")
        name = "" if w is None else f"w = {w:g}: "
        results[name] = mean_and_error(sums.tolist())
        total, error = results[name]["total"]
        process.say(f"{name}NLL <= {total:.3f} ± {error:.3f} bits/dim (the bound of DDPM Eq. 5, mean "
                    f"and standard error over {len(images)} held-out images, {config['variance']} "
                    f"variance): prior L_T {results[name]['prior'][0]:.4f}, KL terms "
                    f"{results[name]['diffusion'][0]:.3f}, decoder L_0 {results[name]['decoder'][0]:.3f}")
    return results


def bound_sums(sampler):
    """sums(x_0, condition, generator, on_step) -> [sum of each term of the bound, sum of squared
    totals, images], float64 [6], of a batch x_0 with the model inputs `condition`."""
    def sums(x_0, condition, generator, on_step):
        bound = variational_bound(x_0, lambda x_t, t: sampler.p_mean_variance(x_t, t, *condition),
                                  sampler.alphas_bar, generator, on_step=on_step)
        count = torch.tensor(float(len(x_0)), dtype=torch.float64, device=x_0.device)
        return torch.stack([bound[term].sum() for term in TERMS] + [bound["total"].square().sum(), count])
    return sums


def held_out_sums(images, num_labels, config, process, sums_of_batch, size, description):
    """The sum over all batches of `images`, each process scoring its share, of sums_of_batch(x_0,
    condition, generator, on_step) -> float64 [size], which walks the T steps calling on_step after
    each. Batch b's noise is seeded by (seed, b), as in the export: the same in any process."""
    loader = DataLoader(images, batch_size=config["batch_size"], num_workers=config["num_workers"])
    mine = [b for b in range(len(loader)) if b % process.world_size == process.rank]
    total = torch.zeros(size, dtype=torch.float64, device=process.device)
    with tqdm(total=len(mine) * config["T"], desc=description, unit="step", dynamic_ncols=True,
              disable=not process.is_main) as bar:
        for batch, (x_0, labels) in enumerate(loader):
            if batch not in mine:
                continue
            x_0 = x_0.to(process.device)
            condition = () if num_labels is None else (labels.to(process.device) + 1,)
            generator = torch.Generator(process.device).manual_seed(batch_seed(config["seed"] or 0, batch))
            total += sums_of_batch(x_0, condition, generator, bar.update)
    return sum_over_processes(total, process)


def mean_and_error(sums):
    """{term: (mean, standard error of the mean)} from bound_sums' sums over all images (None for the parts' errors)."""
    count, square = sums[-1], sums[-2]
    mean = {term: total / count for term, total in zip(TERMS, sums)}
    variance = max(square / count - mean["total"] ** 2, 0.) * count / max(count - 1, 1)
    return {term: (mean[term], math.sqrt(variance / count) if term == "total" else None) for term in TERMS}
