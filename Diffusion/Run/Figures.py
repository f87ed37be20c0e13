"""The DDPM paper's figures drawn from a trained model, each a state (docs/paper.md):

    rate_distortion    Fig. 5: rate and distortion after each reverse step, over held-out images
    shared_latents     Fig. 7: samples that share the x_t of a chain, at latent_steps
    interpolate        Fig. 8: pairs of held-out images mixed in x_t at interpolation_t
    coarse_to_fine     Fig. 9: the same at each t of interpolation_steps
    quality_over_time  Fig. 10: FID and IS of the x_0 predicted at quality_steps points
    neighbours         the training images nearest to each sample, in pixels and in features

Each runs Algorithm 2 over all T steps and writes its picture and its numbers (CSV or JSON) into
sampled_dir, a set per guidance weight w of the conditional model (names ending in _w{w}), whose
held-out images take their own classes and whose samples the classes in turn.
"""
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from Diffusion.Latents import interpolate as interpolations
from Diffusion.Latents import shared_latent_samples
from Diffusion.Likelihood import rate_and_distortion
from Diffusion.Run.Checkpoints import write_atomically
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Evaluation import (
    ProcessRecorder, held_out_images, held_out_sums, on_every_process, samplers_of, trained_model)
from Diffusion.Run.Metrics import extractor_of, feature_batches, reference_images, report_scores
from Diffusion.Run.Processes import gather
from Diffusion.Run.Sampling import as_uint8_rgb, export_samples, save_grid, starting_noise

LAMBDAS = [step / 10 for step in range(11)]  # Fig. 8's mixing weights


def pyplot():
    """matplotlib.pyplot drawing into files; without matplotlib, a ConfigError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the plots need matplotlib, which is not installed: "
                          "pip install -r requirements-optional.txt") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def paper_samplers(config, variant, model):
    """[(w, Algorithm 2 over all T steps guided by w)], with the seed set."""
    if config["seed"] is not None:
        torch.manual_seed(config["seed"])
    return samplers_of({**config, "sampler": "ddpm", "sample_steps": None}, variant, model)


def output_path(config, name, w, extension=""):
    """sampled_dir/{name}.{extension}, or {name}_w{w}.{extension} for guidance weight w."""
    name = f"{name}{'' if w is None else f'_w{w:g}'}"
    return os.path.join(config["sampled_dir"], f"{name}.{extension}" if extension else name)


def write(path, save):
    """save(temporary path), renamed to `path` (Checkpoints.write_atomically), and said."""
    write_atomically(save, path)
    tqdm.write(f"wrote {path}")


def write_table(path, header, rows):
    text = "\n".join(",".join(map(str, row)) for row in [header, *rows]) + "\n"
    write(path, lambda temporary: Path(temporary).write_text(text))


def write_json(path, values):
    write(path, lambda temporary: Path(temporary).write_text(json.dumps(values, indent=1)))


def draw_rows(config, name, w, blocks):
    """blocks [rows, columns, N, C, H, W] in [-1, 1] as one picture, a row per image of N and row."""
    save_grid(blocks.permute(2, 0, 1, 3, 4, 5).flatten(0, 2), output_path(config, name, w, "png"), blocks.shape[1])


def plot(plt, path, panels, title):
    """One panel per (x, y, x label, y label, line label), side by side, saved as a PNG at path."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for axis, (x, y, x_label, y_label, label) in zip(axes[0], panels):
        axis.plot(x, y, marker="o" if len(x) < 30 else None, label=label)
        axis.set(xlabel=x_label, ylabel=y_label)
        axis.legend()
    figure.suptitle(title)
    write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)


# --- Fig. 5 ------------------------------------------------------------------------------------


@on_every_process
def rate_distortion(config, variant, process):
    """State rate_distortion: over held-out images (as state nll, each process its share), the rate
    and the distortion after each reverse step (Likelihood.rate_and_distortion): a CSV (t = T..0),
    a JSON of the end of the chain, and the plot. Returns {w: that JSON}."""
    plt = pyplot()
    model, num_labels = trained_model(config, variant, process.device)
    images = held_out_images(config, num_labels)
    T, results = config["T"], {}
    for w, sampler in paper_samplers(config, variant, model):
        def sums(x_0, condition, generator, on_step):
            measured = rate_and_distortion(x_0, lambda x_t, t: sampler.p_mean_variance_and_x0(x_t, t, *condition),
                                           sampler.alphas_bar, generator, on_step)
            count = torch.tensor([float(len(x_0))], dtype=torch.float64, device=x_0.device)
            return torch.cat([measured["rate"].sum(1), measured["squared_error"].sum(1),
                              measured["decoder"].sum()[None], count])
        total = held_out_sums(images, num_labels, config, process, sums, 2 * T + 4, "rate-distortion").cpu()
        rate, rmse = total[:T + 1] / total[-1], (total[T + 1:2 * T + 2] / total[-1]).sqrt()
        if not process.is_main:
            continue
        steps = list(range(T, -1, -1))  # the paper's t, as the reverse process visits them
        write_table(output_path(config, "rate_distortion", w, "csv"), ["reverse_steps", "t", "rate_bits_per_dim",
                    "distortion_rmse"], [[T - t, t, f"{rate[t]:.6f}", f"{rmse[t]:.6f}"] for t in steps])
        results[w] = {"images": int(total[-1]), "rate_bits_per_dim": rate[1].item(),
                      "distortion_bits_per_dim": (total[-2] / total[-1]).item(),
                      "bound_bits_per_dim": rate[0].item(), "rmse_at_t1": rmse[1].item()}
        write_json(output_path(config, "rate_distortion", w, "json"), results[w])
        tqdm.write(f"{'' if w is None else f'w = {w:g}: '}rate {rate[1]:.3f} bits/dim, distortion "
                   f"{results[w]['distortion_bits_per_dim']:.3f} bits/dim (RMSE {rmse[1]:.3f} on [0, 255] "
                   f"at t = 1), over {int(total[-1])} held-out images")
        chain = steps[:-1]  # the plot ends at x_1, as the paper's: L_0 is the distortion in bits
        reverse_steps, label = [T - t for t in chain], "" if w is None else f"w = {w:g}"
        plot(plt, output_path(config, "rate_distortion", w, "png"),
             [(reverse_steps, rmse[chain], "reverse steps (T - t)", "distortion (RMSE, 0..255)", label or "distortion"),
              (reverse_steps, rate[chain], "reverse steps (T - t)", "rate (bits/dim)", label or "rate"),
              (rate[chain], rmse[chain], "rate (bits/dim)", "distortion (RMSE, 0..255)", label or "rate-distortion")],
             f"Rate and distortion, {int(total[-1])} held-out images, t = T..1 (DDPM Fig. 5)")
    return results


# --- Figs. 7 to 9 ------------------------------------------------------------------------------


@on_every_process
def shared_latents(config, variant, process):
    """State shared_latents: figure_images chains kept at each t of latent_steps, latent_samples
    samples of p(x_0 | x_t) from each: a row per chain and t, x_t first. Drawn by the first process."""
    if not process.is_main:
        return
    model, num_labels = trained_model(config, variant, process.device)
    T, chains = config["T"], config["figure_images"]
    steps = config["latent_steps"] or [T, 3 * T // 4, T // 2, T // 4]
    condition = variant.grid.for_eval(config, num_labels).export_condition(torch.arange(chains, device=process.device))
    for w, sampler in paper_samplers(config, variant, model):
        x_T = starting_noise(chains, config["img_channels"], config["img_size"], process.device)
        latents, samples = shared_latent_samples(sampler, x_T, steps, config["latent_samples"], *condition,
                                                 progress=True)
        draw_rows(config, "shared_latents", w, torch.cat([latents[:, None], samples], dim=1))
        write_json(output_path(config, "shared_latents", w, "json"), {"rows": "a row per chain and t: x_t, then "
                   "its samples", "t": steps, "chains": chains, "samples": config["latent_samples"]})


def image_pairs(size, labels, count):
    """count pairs of indices into `size` images, spread over them: evenly spaced without `labels`;
    with the images' labels, two of a class per pair, the classes in turn. [(first, second)]."""
    if labels is None:
        step = size // (2 * count)
        pairs = [(2 * k * step, (2 * k + 1) * step) for k in range(count)] if step else []
    else:
        by_class = {label: [i for i, each in enumerate(labels) if each == label] for label in sorted(set(labels))}
        classes = list(by_class.values())
        pairs = [tuple(classes[k % len(classes)][2 * (k // len(classes)):][:2]) for k in range(count)]
    if len(pairs) < count or any(len(pair) < 2 for pair in pairs):
        raise ConfigError(f"figure_images {count} asks for {count} pairs of the {size} held-out images"
                          f"{', two of a class each' if labels is not None else ''}, which have fewer: lower "
                          f"figure_images, or give more held-out images (nll_dataset).")
    return pairs


def interpolation_rows(config, variant, process, steps, name):
    """figure_images pairs of held-out images mixed at each t of `steps`, a row per pair and t:
    x_0, the decodes for lambda = 0, 0.1, .., 1, x'_0. Drawn by the first process."""
    if not process.is_main:
        return
    model, num_labels = trained_model(config, variant, process.device)
    images = held_out_images({**config, "nll_images": None}, num_labels)
    labels = [int(label) for label in images.targets] if num_labels is not None else None
    pairs = image_pairs(len(images), labels, config["figure_images"])
    x_0, x_0_other = (torch.stack([images[pair[side]][0] for pair in pairs]).to(process.device) for side in (0, 1))
    condition = () if labels is None else (torch.tensor([labels[a] for a, _ in pairs], device=process.device) + 1,)
    for w, sampler in paper_samplers(config, variant, model):
        mixes = torch.stack([interpolations(sampler, x_0, x_0_other, t, LAMBDAS, *condition, seed=config["seed"] or 0,
                                            progress=True)
                             for t in steps])
        ends = [image.expand(len(steps), 1, *x_0.shape) for image in (x_0, x_0_other)]
        draw_rows(config, name, w, torch.cat([ends[0], mixes, ends[1]], dim=1))
        write_json(output_path(config, name, w, "json"), {"rows": "a row per pair and t: x_0, the decodes for "
                   "each lambda, x'_0", "t": steps, "lambdas": LAMBDAS, "held_out_pairs": pairs})


@on_every_process
def interpolate(config, variant, process):
    """State interpolate (Fig. 8): pairs of held-out images mixed at interpolation_t (None: T/2)."""
    t = config["interpolation_t"]
    interpolation_rows(config, variant, process, [config["T"] // 2 if t is None else t], "interpolate")


@on_every_process
def coarse_to_fine(config, variant, process):
    """State coarse_to_fine (Fig. 9): the pairs mixed at each t of interpolation_steps."""
    T = config["T"]
    steps = config["interpolation_steps"] or [0, T // 4, T // 2, 3 * T // 4, T]
    interpolation_rows(config, variant, process, steps, "coarse_to_fine")


# --- Fig. 10 and the nearest neighbours --------------------------------------------------------


@on_every_process
def quality_over_time(config, variant, process):
    """State quality_over_time: num_samples samples, the x_0 predicted after each of quality_steps
    evenly spaced numbers of steps exported (a folder each, continued when interrupted, each process
    its share), then FID and IS of each folder: a CSV and the plot. Returns {w: [(steps, scores)]}."""
    plt = pyplot()
    extractor = extractor_of(config["fid_extractor"], config["img_size"]) if process.is_main else None
    model, num_labels = trained_model(config, variant, process.device)
    grid, T, points = variant.grid.for_eval(config, num_labels), config["T"], config["quality_steps"]
    kept = sorted(ProcessRecorder(T, points).kept_states)  # the numbers of steps taken
    results = {}
    for w, sampler in paper_samplers(config, variant, model):
        folders = {f"{steps} steps": os.path.join(output_path(config, "quality_over_time", w), f"steps_{steps:05d}")
                   for steps in kept}
        def draw(first, count):
            recorder = ProcessRecorder(T, points)
            x_T = starting_noise(count, config["img_channels"], config["img_size"], process.device)
            condition = grid.export_condition(torch.arange(first, first + count, device=process.device))
            recorder.finish(sampler(x_T, *condition, on_step=recorder, progress=False))
            return recorder.x_0
        export_samples(draw, list(folders.values()), config["num_samples"], config["batch_size"], process,
                       config["seed"], description="quality over time")
        if not process.is_main:
            continue
        scores = report_scores(config, folders, extractor)
        rows = results[w] = [(steps, T - steps, scores[f"{steps} steps"]["fid"], scores[f"{steps} steps"]["is"])
                             for steps in kept]
        write_table(output_path(config, "quality_over_time", w, "csv"), ["reverse_steps", "t", "fid", "is"], rows)
        label = config["fid_extractor"] if w is None else f"w = {w:g}"
        panels = [([row[0] for row in rows], [row[2] for row in rows], "reverse steps (T - t)", "FID", label)]
        if all(row[3] is not None for row in rows):
            panels.append(([row[0] for row in rows], [row[3] for row in rows], "reverse steps (T - t)", "IS", label))
        plot(plt, output_path(config, "quality_over_time", w, "png"), panels,
             f"Quality of the predicted x_0, {config['num_samples']} samples (DDPM Fig. 10)")
    return results


@on_every_process
def neighbours(config, variant, process):
    """State neighbours: figure_images samples and the `neighbours` training images nearest to each
    by Euclidean distance, between pixels (uint8 RGB) and between fid_extractor's features: a picture
    per space (a row per sample: it, then its neighbours, nearest first) and a JSON of [distance,
    training-set index]. Each process searches its share of the training set. Returns {w: the JSON}."""
    extractor = extractor_of(config["fid_extractor"], config["img_size"])
    model, num_labels = trained_model(config, variant, process.device)
    count, training, results = config["figure_images"], reference_images(config), {}
    condition = variant.grid.for_eval(config, num_labels).export_condition(torch.arange(count, device=process.device))
    for w, sampler in paper_samplers(config, variant, model):
        x_T = starting_noise(count, config["img_channels"], config["img_size"], process.device)
        samples = gather(as_uint8_rgb(sampler(x_T, *condition)).cpu() if process.is_main else None, process)[0]
        found = gather(search_training_set(samples, training, extractor, config, process), process)
        if not process.is_main:
            continue
        results[w] = {}
        for space in ("pixels", "features"):
            distances, indices = keep_nearest(torch.cat([f[space][0] for f in found], 1),
                                              torch.cat([f[space][1] for f in found], 1), config["neighbours"])
            rows = torch.stack([torch.stack([sample, *(training[i][0] for i in row)]) for sample, row
                                in zip(samples, indices.tolist())])  # [N, 1 + k, 3, H, W]
            draw_rows(config, f"neighbours_{space}", w, rows[None].transpose(1, 2).float() / 127.5 - 1.)
            results[w][space] = [[[round(d, 4), i] for d, i in zip(*row)] for row in zip(distances.tolist(),
                                                                                         indices.tolist())]
        write_json(output_path(config, "neighbours", w, "json"), {"extractor": config["fid_extractor"], **results[w]})
    return results


def keep_nearest(distances, indices, k):
    """The k smallest of distances [N, M] in each row, nearest first, and their indices [N, M]."""
    nearest, order = distances.topk(min(k, distances.shape[1]), dim=1, largest=False)
    return nearest, indices.gather(1, order)


def closest(queries, candidates, numbers, k, best=None):
    """The k nearest of `candidates` [M, D], numbered `numbers` [M], to each of `queries` [N, D] by
    Euclidean distance, merged with `best`, an earlier result: (distances [N, k], numbers [N, k])."""
    distances = torch.cdist(queries.double(), candidates.double())
    indices = numbers.expand_as(distances)
    if best is not None:
        distances, indices = torch.cat([best[0], distances], 1), torch.cat([best[1], indices], 1)
    return keep_nearest(distances, indices, k)


def search_training_set(samples, training, extractor, config, process):
    """The `neighbours` images of this process's share of `training` (uint8 images) nearest to each of
    `samples` (uint8 [N, 3, H, W]): {"pixels": (distances, indices), "features": ...}, on the CPU."""
    mine = list(range(process.rank, len(training), process.world_size))
    loader = DataLoader(Subset(training, mine), batch_size=config["batch_size"], num_workers=config["num_workers"])
    device, k, seen, best = process.device, config["neighbours"], 0, {"pixels": None, "features": None}

    def spaces(images):  # uint8 [N, 3, H, W] -> the points of each space
        return {"pixels": images.flatten(1), "features": next(feature_batches([images], extractor, device))[0]}
    queries = spaces(samples.to(device))
    for images, _ in tqdm(loader, desc="nearest training images", leave=False, dynamic_ncols=True,
                          disable=not process.is_main):
        images, numbers = images.to(device), torch.tensor(mine[seen:seen + len(images)], device=device)
        candidates = spaces(images)
        best = {space: closest(queries[space], candidates[space], numbers, k, best[space]) for space in best}
        seen += len(images)
    return {space: tuple(tensor.cpu() for tensor in found) for space, found in best.items()}
