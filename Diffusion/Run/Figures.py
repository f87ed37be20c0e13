"""The DDPM paper's figures drawn from a trained model, for both models, each a state (docs/paper.md):

    rate_distortion    Fig. 5 (Sec. 4.3): rate and distortion against the reverse process's steps,
                       over held-out images
    shared_latents     Fig. 7: samples that share the x_t of one chain, at latent_steps
    interpolate        Fig. 8 (Sec. 4.4): two held-out images mixed in x_t at interpolation_t
    coarse_to_fine     Fig. 9: the same at each t of interpolation_steps
    quality_over_time  Fig. 10: FID and IS of the x_0 predicted at quality_steps points of the chain
    neighbours         the training images closest to each sample, in pixels and in features

Each runs the paper's sampler, Algorithm 2 over all T steps (with the config's variance and
clip_denoised), and writes into sampled_dir its picture and its numbers (CSV or JSON), one set per
guidance weight w of the conditional model (names ending in _w{w}), whose images take their own
classes and whose samples take the classes in turn. Plots are drawn with matplotlib.
"""
import csv
import json
import os

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from Diffusion.Latents import interpolate as interpolations
from Diffusion.Latents import shared_latent_samples
from Diffusion.Likelihood import rate_and_distortion
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Evaluation import (
    ProcessRecorder, held_out_images, held_out_sums, on_every_process, samplers_of, trained_model)
from Diffusion.Run.Metrics import extractor_of, feature_batches, reference_images, report_scores
from Diffusion.Run.Processes import gather
from Diffusion.Run.Sampling import as_uint8_rgb, export_samples, save_grid, starting_noise

LAMBDAS = [step / 10 for step in range(11)]  # Fig. 8's mixing weights, 0 to 1


def pyplot():
    """matplotlib.pyplot drawing into files (the Agg backend: no display); a ConfigError that says
    how to install it when it is missing, had before any work."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("this state plots with matplotlib, which is not installed: "
                          "pip install -r requirements-optional.txt") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def paper_samplers(config, variant, model):
    """[(w, Algorithm 2 over all T steps guided by w)]: the sampler of the paper's figures."""
    return samplers_of({**config, "sampler": "ddpm", "sample_steps": None}, variant, model)


def output_path(config, name, w, extension):
    """sampled_dir/{name}.{extension}, or {name}_w{w}.{extension} for guidance weight w (sampled_dir made)."""
    os.makedirs(config["sampled_dir"], exist_ok=True)
    return os.path.join(config["sampled_dir"], f"{name}{'' if w is None else f'_w{w:g}'}.{extension}")


def write_json(path, values):
    with open(f"{path}.tmp", "w") as file:
        json.dump(values, file, indent=1)
    os.replace(f"{path}.tmp", path)
    tqdm.write(f"wrote {path}")


def write_csv(path, header, rows):
    with open(f"{path}.tmp", "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    os.replace(f"{path}.tmp", path)
    tqdm.write(f"wrote {path}")


def save_plot(figure, path):
    figure.savefig(f"{path}.tmp", format="png", dpi=120, bbox_inches="tight")
    os.replace(f"{path}.tmp", path)
    tqdm.write(f"wrote {path}")


def seed_from(config):
    if config["seed"] is not None:
        torch.manual_seed(config["seed"])


# --- Fig. 5: rate and distortion -------------------------------------------------------------


@on_every_process
def rate_distortion(config, variant, process):
    """State rate_distortion: over held-out images (as state nll), the rate (bits/dim sent) and the
    distortion (RMSE on [0, 255] of the x_0 predicted from x_t) after each step of the reverse
    process; CSV, JSON and the plot of Fig. 5. Returns {w: the JSON's summary}."""
    plt = pyplot()
    model, num_labels = trained_model(config, variant, process.device)
    images = held_out_images(config, num_labels)
    T, results = config["T"], {}
    for w, sampler in paper_samplers(config, variant, model):
        def sums_of_batch(x_0, condition, generator, on_step):
            measured = rate_and_distortion(x_0, lambda x_t, t: sampler.p_mean_variance_and_x0(x_t, t, *condition),
                                           sampler.alphas_bar, generator, on_step)
            count = torch.tensor([float(len(x_0))], dtype=torch.float64, device=x_0.device)
            return torch.cat([measured["rate"].sum(1), measured["squared_error"].sum(1),
                              measured["decoder"].sum()[None], count])
        sums = held_out_sums(images, num_labels, config, process, sums_of_batch, 2 * T + 4, "rate-distortion")
        if process.is_main:
            results[w] = write_rate_distortion(config, w, sums.cpu(), plt)
    return results


def write_rate_distortion(config, w, sums, plt):
    """The table (t = T .. 0), the summary and the plot of rate_distortion's sums."""
    T = config["T"]
    count = sums[-1]
    rate, rmse = sums[:T + 1] / count, (sums[T + 1:2 * T + 2] / count).sqrt()
    steps = list(range(T, -1, -1))  # the paper's t, as the reverse process visits them
    write_csv(output_path(config, "rate_distortion", w, "csv"),
              ["reverse_steps", "t", "rate_bits_per_dim", "distortion_rmse"],
              [[T - t, t, f"{rate[t]:.6f}", f"{rmse[t]:.6f}"] for t in steps])
    summary = {"images": int(count), "rate_bits_per_dim": rate[1].item(),
               "distortion_bits_per_dim": (sums[2 * T + 2] / count).item(), "bound_bits_per_dim": rate[0].item(),
               "rmse_at_t1": rmse[1].item()}
    write_json(output_path(config, "rate_distortion", w, "json"), summary)
    tqdm.write(f"{'' if w is None else f'w = {w:g}: '}rate {summary['rate_bits_per_dim']:.3f} bits/dim, "
               f"distortion {summary['distortion_bits_per_dim']:.3f} bits/dim (RMSE {summary['rmse_at_t1']:.3f} "
               f"on [0, 255] at t = 1), over {summary['images']} held-out images")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    reverse_steps = [T - t for t in steps]
    for axis, x, y, x_label, y_label in (
            (axes[0], reverse_steps, rmse[steps], "reverse process steps (T - t)", "distortion (RMSE, [0, 255])"),
            (axes[1], reverse_steps, rate[steps], "reverse process steps (T - t)", "rate (bits/dim)"),
            (axes[2], rate[steps], rmse[steps], "rate (bits/dim)", "distortion (RMSE, [0, 255])")):
        axis.plot(x, y, label="this model" if w is None else f"this model, w = {w:g}")
        axis.set(xlabel=x_label, ylabel=y_label)
        axis.legend()
    figure.suptitle(f"Rate-distortion over {summary['images']} held-out images (DDPM Fig. 5)")
    save_plot(figure, output_path(config, "rate_distortion", w, "png"))
    plt.close(figure)
    return summary


# --- Fig. 7: shared latents ------------------------------------------------------------------


@on_every_process
def shared_latents(config, variant, process):
    """State shared_latents: figure_images chains, each kept at latent_steps, latent_samples samples
    of p(x_0 | x_t) from each: a row per chain and t, x_t on the left. Drawn by the first process."""
    if not process.is_main:
        return
    seed_from(config)
    model, num_labels = trained_model(config, variant, process.device)
    T, count, chains = config["T"], config["latent_samples"], config["figure_images"]
    steps = config["latent_steps"] or [T, 3 * T // 4, T // 2, T // 4]
    condition = variant.grid.for_eval(config, num_labels).export_condition(torch.arange(chains, device=process.device))
    for w, sampler in paper_samplers(config, variant, model):
        x_T = starting_noise(chains, config["img_channels"], config["img_size"], process.device)
        latents, samples = shared_latent_samples(sampler, x_T, steps, count, *condition)
        rows = torch.cat([latents[:, None], samples], dim=1)  # [steps, 1 + count, chains, C, H, W]
        save_grid(rows.permute(2, 0, 1, 3, 4, 5).flatten(0, 2), config["sampled_dir"],
                  os.path.basename(output_path(config, "shared_latents", w, "png")), nrow=1 + count)
        write_json(output_path(config, "shared_latents", w, "json"),
                   {"rows": "a row per chain and t", "t": steps, "chains": chains, "samples_per_latent": count})


# --- Figs. 8 and 9: interpolation ------------------------------------------------------------


def image_pairs(images, count, labelled):
    """count pairs of indices into `images`: (0, 1), (2, 3), ...; `labelled`, each image with the next
    one of its class. Returns [(first, second)]."""
    pairs, waiting = [], {}
    for index in range(len(images)):
        label = images[index][1] if labelled else 0
        if label in waiting:
            pairs.append((waiting.pop(label), index))
            if len(pairs) == count:
                return pairs
        else:
            waiting[label] = index
    raise ConfigError(f"figure_images {count} asks for {count} pairs of held-out images, but only "
                      f"{len(pairs)} can be made of {len(images)}{' (of the same class)' if labelled else ''}: "
                      f"lower figure_images, or give more held-out images (nll_dataset).")


def pair_batches(config, images, pairs, device):
    """(x_0 [N, C, H, W], x'_0 [N, C, H, W], labels [N]) of the pairs, on device."""
    first = torch.stack([images[a][0] for a, _ in pairs]).to(device)
    second = torch.stack([images[b][0] for _, b in pairs]).to(device)
    labels = torch.tensor([int(images[a][1]) for a, _ in pairs], device=device)
    return first, second, labels


def interpolation_rows(config, variant, process, steps, name, figure):
    """The decodes of each pair mixed at each t of `steps`, a row per pair and t: x_0, the mixes for
    lambda = 0, 0.1, .., 1, x'_0. Drawn by the first process."""
    if not process.is_main:
        return
    seed_from(config)
    model, num_labels = trained_model(config, variant, process.device)
    images = held_out_images({**config, "nll_images": None}, num_labels)
    pairs = image_pairs(images, config["figure_images"], num_labels is not None)
    x_0, x_0_other, labels = pair_batches(config, images, pairs, process.device)
    condition = () if num_labels is None else (labels + 1,)
    for w, sampler in paper_samplers(config, variant, model):
        mixes = torch.stack([interpolations(sampler, x_0, x_0_other, t, LAMBDAS, *condition, seed=config["seed"] or 0)
                             for t in tqdm(steps, desc=name, leave=False, dynamic_ncols=True)])
        rows = torch.cat([x_0.expand(len(steps), *x_0.shape)[:, None], mixes,
                          x_0_other.expand(len(steps), *x_0.shape)[:, None]], dim=1)  # [t, 2 + L, N, ...]
        save_grid(rows.permute(2, 0, 1, 3, 4, 5).flatten(0, 2), config["sampled_dir"],
                  os.path.basename(output_path(config, name, w, "png")), nrow=len(LAMBDAS) + 2)
        write_json(output_path(config, name, w, "json"),
                   {"figure": figure, "rows": "a row per pair and t: x_0, the decodes for each lambda, x'_0",
                    "t": steps, "lambdas": LAMBDAS, "held_out_pairs": pairs})


@on_every_process
def interpolate(config, variant, process):
    """State interpolate (Fig. 8): figure_images pairs of held-out images mixed at interpolation_t."""
    t = config["interpolation_t"] if config["interpolation_t"] is not None else config["T"] // 2
    interpolation_rows(config, variant, process, [t], "interpolate", "DDPM Fig. 8")


@on_every_process
def coarse_to_fine(config, variant, process):
    """State coarse_to_fine (Fig. 9): the same pairs mixed at each t of interpolation_steps."""
    T = config["T"]
    steps = config["interpolation_steps"] or [0, T // 4, T // 2, 3 * T // 4, T]
    interpolation_rows(config, variant, process, steps, "coarse_to_fine", "DDPM Fig. 9")


# --- Fig. 10: quality over the reverse process -----------------------------------------------


@on_every_process
def quality_over_time(config, variant, process):
    """State quality_over_time: num_samples samples drawn by Algorithm 2, the x_0 predicted after each of
    quality_steps evenly spaced numbers of steps exported as PNGs (one folder each, continued when
    interrupted, each process its share), then FID and IS of each folder: CSV, JSON and the plot of
    Fig. 10. Returns {w: [(reverse steps, scores)]}."""
    plt = pyplot()
    extractor = extractor_of(config["fid_extractor"], config["img_size"]) if process.is_main else None
    model, num_labels = trained_model(config, variant, process.device)
    grid, T = variant.grid.for_eval(config, num_labels), config["T"]
    kept = sorted(ProcessRecorder(T, config["quality_steps"]).kept_states)  # reverse steps taken
    results = {}
    for w, sampler in paper_samplers(config, variant, model):
        folder = output_path(config, "quality_over_time", w, "")[:-1]
        folders = [os.path.join(folder, f"steps_{steps:05d}") for steps in kept]
        def draw(first, count):
            recorder = ProcessRecorder(T, config["quality_steps"])
            x_T = starting_noise(count, config["img_channels"], config["img_size"], process.device)
            condition = grid.export_condition(torch.arange(first, first + count, device=process.device))
            recorder.finish(sampler(x_T, *condition, on_step=recorder, progress=False))
            return recorder.x_0
        export_samples(draw, folders, config["num_samples"], config["batch_size"], process, config["seed"],
                       description="quality over time")
        if process.is_main:
            scores = report_scores(config, dict(zip((f"{steps} steps" for steps in kept), folders)), extractor)
            results[w] = [(steps, scores[f"{steps} steps"]) for steps in kept]
            write_quality(config, w, results[w], plt)
    return results


def write_quality(config, w, results, plt):
    """The table and the plot of quality_over_time: FID and IS against the reverse process's steps."""
    rows = [[steps, config["T"] - steps, scores["fid"], scores["is"], scores["is_std"]] for steps, scores in results]
    write_csv(output_path(config, "quality_over_time", w, "csv"), ["reverse_steps", "t", "fid", "is", "is_std"], rows)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot([row[0] for row in rows], [row[2] for row in rows], marker="o", label=config["fid_extractor"])
    axes[0].set(xlabel="reverse process steps (T - t)", ylabel="FID of the predicted x_0")
    if all(row[3] is not None for row in rows):
        axes[1].plot([row[0] for row in rows], [row[3] for row in rows], marker="o", label=config["fid_extractor"])
    axes[1].set(xlabel="reverse process steps (T - t)", ylabel="Inception Score of the predicted x_0")
    for axis in axes:
        axis.legend()
    figure.suptitle(f"Sample quality over the reverse process, {config['num_samples']} samples (DDPM Fig. 10)")
    save_plot(figure, output_path(config, "quality_over_time", w, "png"))
    plt.close(figure)


# --- nearest neighbours ----------------------------------------------------------------------


@on_every_process
def neighbours(config, variant, process):
    """State neighbours: figure_images samples (the classes in turn) and, beside each, the `neighbours`
    training images nearest to it by Euclidean distance, between pixels (uint8 RGB) and between
    fid_extractor's features: a picture of each (a row per sample: the sample, then its neighbours,
    nearest first) and the distances and training-set indices as JSON. Each process searches its
    share of the training set. Returns {w: {"pixels": [[(distance, index)]], "features": ...}}."""
    extractor = extractor_of(config["fid_extractor"], config["img_size"])
    seed_from(config)
    model, num_labels = trained_model(config, variant, process.device)
    condition = variant.grid.for_eval(config, num_labels).export_condition(
        torch.arange(config["figure_images"], device=process.device))
    training, results = reference_images(config), {}
    for w, sampler in paper_samplers(config, variant, model):
        samples = None
        if process.is_main:
            x_T = starting_noise(config["figure_images"], config["img_channels"], config["img_size"], process.device)
            samples = as_uint8_rgb(sampler(x_T, *condition)).cpu()
        samples = gather(samples, process)[0]
        found = gather(search_training_set(samples, training, extractor, config, process), process)
        if process.is_main:
            nearest = {space: keep_nearest(torch.cat([f[space][0] for f in found], 1),
                                           torch.cat([f[space][1] for f in found], 1), config["neighbours"])
                       for space in ("pixels", "features")}
            results[w] = write_neighbours(config, w, samples, training, nearest)
    return results


def keep_nearest(distances, indices, k):
    """The k smallest of distances [N, M] in each row, nearest first, with their indices [N, M]."""
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
    device, k = process.device, config["neighbours"]
    sample_pixels, sample_features = samples.flatten(1).to(device), next(feature_batches([samples], extractor, device))[0]
    pixels = features = None
    seen = 0
    for images, _ in tqdm(loader, desc="nearest training images", leave=False, dynamic_ncols=True,
                          disable=not process.is_main):
        images = images.to(device)
        numbers = torch.tensor(mine[seen:seen + len(images)], device=device)
        image_features = next(feature_batches([images], extractor, device))[0]
        pixels = closest(sample_pixels, images.flatten(1), numbers, k, pixels)
        features = closest(sample_features, image_features, numbers, k, features)
        seen += len(images)
    return {"pixels": tuple(t.cpu() for t in pixels), "features": tuple(t.cpu() for t in features)}


def write_neighbours(config, w, samples, training, nearest):
    """A picture per space (a row per sample: it, then its neighbours) and the JSON of both."""
    def as_model_range(images):
        return images.float() / 127.5 - 1.
    for space, (_, indices) in nearest.items():
        rows = [torch.cat([sample[None], torch.stack([training[i][0] for i in row.tolist()])])
                for sample, row in zip(samples, indices)]
        save_grid(as_model_range(torch.cat(rows)), config["sampled_dir"],
                  os.path.basename(output_path(config, f"neighbours_{space}", w, "png")), nrow=1 + indices.shape[1])
    found = {space: [[(round(d, 4), i) for d, i in zip(distances.tolist(), indices.tolist())]
                     for distances, indices in zip(*nearest[space])] for space in nearest}
    write_json(output_path(config, "neighbours", w, "json"),
               {"rows": "a row per sample: [distance, training-set index] of its nearest images, nearest first",
                "extractor": config["fid_extractor"], **found})
    return found
