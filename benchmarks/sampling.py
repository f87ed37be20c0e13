"""What fast sampling costs: speed and FID of DDPM-1000, DDIM and the ODE solvers, in one run.

    python benchmarks/sampling.py --speed default                    # the default models (GPU)
    python benchmarks/sampling.py --speed small --fid_dir RUN --data_root DATA --seeds 0,1,2

Speed: seconds per image of one whole sampling run of batch_size images, for each sampler,
unguided (Main.py's UNet) and guided (MainCondition.py's UNet, w = 1.8: two estimates per
step), both with T = 1000. `--speed default` times the default architectures, `--speed small`
the small one below; the weights are random (speed does not depend on them).

FID: for the small model trained by the command in benchmarks/RESULTS.md (its checkpoint in
RUN/ckpt, sampled from its EMA weights), num_samples images of each sampler and seed are
exported into RUN/samples/<sampler>/seed<seed> (an interrupted run continues there; --amp bf16
runs the network in bfloat16, 1.7-2.5x faster on a CPU with AVX-512 BF16), timed, and
scored against the training set with the same feature extractor; each row gives the FID of
every seed, their mean, the FID of all seeds' images together (less biased: FID falls as
the images grow in number) and the seconds per image of the export. Offline, the extractor is a
stand-in classifier trained on the dataset's labels (benchmarks/stand_in_classifier.py;
RUN/classifier.pt, trained when missing): its FID is NOT the papers' Inception FID, only
comparable within the table. The row
"training images" scores num_samples real images the same way: the floor that a perfect model
would reach with so few images (and as many as all seeds' together).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plots import pyplot  # noqa: E402
from benchmarks.speed import cpu_name, script_defaults  # noqa: E402
from benchmarks.stand_in_classifier import train_classifier  # noqa: E402
from Diffusion.Run.Evaluation import PlainGrid, export, samplers_of, trained_model  # noqa: E402
from Diffusion.Run.Metrics import (dataset_batches, extractor_of, folder_images, reference_images,  # noqa: E402
                                   report_scores, scores_of)
from Diffusion.Run.Processes import Process  # noqa: E402
from Diffusion.Run.Sampling import sampler_of, save_picture, starting_noise  # noqa: E402
from Diffusion.Train import UNCONDITIONAL, unet_of  # noqa: E402
from DiffusionFreeGuidence.DiffusionCondition import ClassifierFreeGuidance  # noqa: E402
from DiffusionFreeGuidence.TrainCondition import unet_of as conditional_unet_of  # noqa: E402

# The small model of the FID table; its samples are drawn with the predicted x_0 clipped, as the
# DDPM paper's FID was measured.
SMALL = {"dataset": "FashionMNIST", "img_size": 16, "channel": 32, "channel_mult": [1, 2, 2],
         "attn": [], "num_res_blocks": 1, "T": 1000, "beta_1": 1e-4, "beta_T": 0.02, "dropout": 0.,
         "clip_denoised": True}
SOLVERS = (("DPM-Solver++", "dpmsolver++"), ("UniPC", "unipc"))
# (NFE, eta, eta_min_snr) of DPM-Solver++ with noise: three settings at every NFE, then the scan
# (mostly at 20 NFE) that chose eta 10 from SNR 0.1
NOISE_ROWS = ([(steps, eta, snr) for steps in (10, 15, 20, 25) for eta, snr in ((1., 0.), (10., 1.), (10., 0.1))]
              + [(15, 2., 0.), (15, 5., 1.), (20, 2., 0.), (20, 1., 0.1), (20, 3., 0.03), (20, 3., 0.1),
                 (20, 3., 0.3), (20, 10., 0.3), (20, 5., 1.), (20, 10., 3.), (25, 5., 1.), (10, 5., 1.)])
UNIPC_NOISE_ROWS = [(steps, 10., 0.1) for steps in (10, 15, 20, 25)] + [(10, 10., 1.), (20, 1., 0.)]


def noise_rows(name, sampler, rows, skip_type="logSNR", label=""):
    """{row name: config} of `sampler` with the noise of each (NFE, eta, eta_min_snr) of `rows`,
    on timesteps uniform in log-SNR (logSNR_split: half of them on each side of eta_min_snr)."""
    return {f"{name}-{steps} eta {eta:g}" + (f" from SNR {snr:g}" if snr else "") + label:
            {"sampler": sampler, "sample_steps": steps, "eta": eta, "eta_min_snr": snr, "skip_type": skip_type}
            for steps, eta, snr in rows}


SAMPLERS = {"DDPM-1000": {"sampler": "ddpm", "sample_steps": None},
            "DDIM-100": {"sampler": "ddim", "sample_steps": 100, "eta": 0.},
            "DDIM-25": {"sampler": "ddim", "sample_steps": 25, "eta": 0.},
            # the solvers at their defaults (order 2, timesteps uniform in log-SNR), then other choices
            **{f"{name}-{steps}": {"sampler": sampler, "sample_steps": steps, "solver_order": 2}
               for name, sampler in SOLVERS for steps in (10, 15, 20, 25)},
            **{f"{name}-{steps} order 3": {"sampler": sampler, "sample_steps": steps, "solver_order": 3}
               for name, sampler in SOLVERS for steps in (10, 20)},
            **{f"{name}-10 {skip_type}": {"sampler": sampler, "sample_steps": 10, "skip_type": skip_type}
               for name, sampler in SOLVERS for skip_type in ("uniform", "quadratic")},
            # with noise: eta 1 is SDE-DPM-Solver++ (on every step but the last); "from SNR s" adds
            # it only on the steps from SNR_t >= s (eta_min_snr) on; UniPC's corrector re-uses it
            **noise_rows("DPM-Solver++", "dpmsolver++", NOISE_ROWS),
            **noise_rows("UniPC", "unipc", UNIPC_NOISE_ROWS),
            # skip_type logSNR_split: half of the steps below the noise window
            **noise_rows("DPM-Solver++", "dpmsolver++", [(10, 10., 0.1), (20, 10., 0.1)], "logSNR_split", " half below"),
            **noise_rows("UniPC", "unipc", [(steps, 10., 0.1) for steps in (10, 15, 20, 25)], "logSNR_split",
                         " half below"),
            # refused by Main.py's checks (eta above 1 with order 3), measured to show why
            **{f"{name}-20 eta 10 from SNR {snr:g} order 3": {"sampler": sampler, "sample_steps": 20, "eta": 10.,
                                                             "eta_min_snr": snr, "solver_order": 3}
               for name, sampler, snr in (("DPM-Solver++", "dpmsolver++", 1.), ("UniPC", "unipc", 0.1))}}
SPEED_SAMPLERS = ("DDPM-1000", "DDIM-100", "DDIM-25", "DPM-Solver++-20", "UniPC-10")


def seconds_per_image(config, model, guided, batch_size, device):
    """Wall-clock seconds of one whole sampling run of batch_size images, per image."""
    sampler = sampler_of(config, ClassifierFreeGuidance(model, 1.8) if guided else model)
    x_T = starting_noise(batch_size, config["img_channels"], config["img_size"], device)
    condition = (torch.randint(1, 11, (batch_size,), device=device),) if guided else ()
    with torch.no_grad():  # warm-up: one network evaluation
        sampler.denoise(x_T, torch.full((batch_size,), len(sampler.timesteps) - 1, device=device), *condition)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sampler(x_T, *condition, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / batch_size


def speed_rows(architecture, batch_size, device):
    base = {**script_defaults("Main"), **(SMALL if architecture == "small" else {}), "T": 1000,
            "device": str(device)}
    conditional = {**script_defaults("MainCondition"), **(SMALL if architecture == "small" else {}), "T": 1000,
                   "device": str(device)}
    models = {False: unet_of(base).to(device).eval(),
              True: conditional_unet_of(conditional, num_labels=10).to(device).eval()}
    rows = []
    for name in SPEED_SAMPLERS:
        times = {guided: seconds_per_image({**(conditional if guided else base), **SAMPLERS[name]},
                                           models[guided], guided, batch_size, device)
                 for guided in (False, True)}
        rows.append((name, times[False], times[True]))
    return rows


def write_training_images(config, folder, count, first=0):
    """`count` random training images as PNGs, to score as a real 'sample' (the `first`..first +
    count - 1 of one random order)."""
    dataset = reference_images(config)
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))[first:first + count]
    os.makedirs(folder, exist_ok=True)
    for index, (image, _) in enumerate(Subset(dataset, chosen.tolist())):
        save_picture(image.float() / 127.5 - 1., os.path.join(folder, f"{index:06d}.png"))


def fid_rows(args, device):
    """{sampler: {"fids": [per seed], "seconds_per_image": mean}} and the floor row."""
    run = Path(args.fid_dir)
    config = {**script_defaults("Main"), **SMALL, "img_channels": args.img_channels, "device": str(device),
              "data_root": args.data_root,
              "save_weight_dir": str(run / "ckpt"), "test_load_weight": args.checkpoint,
              "num_samples": args.num_samples, "batch_size": args.fid_batch_size,
              "num_workers": 0, "fid_stats_dir": str(run / "fid_stats"),
              "fid_extractor": str(run / "classifier.pt"), "amp": args.amp}
    if not os.path.isfile(config["fid_extractor"]):
        accuracy = train_classifier(config, config["fid_extractor"])
        print(f"stand-in classifier: {accuracy:.1%} accuracy on 5,000 held-out training images")
    model, _ = trained_model(config, UNCONDITIONAL, device)
    rows = {}
    for name, choice in SAMPLERS.items():
        if args.samplers and name not in args.samplers:
            continue
        folders, seconds = {}, []
        for seed in args.seeds:
            sampler_config = {**config, **choice, "seed": seed,
                              "export_dir": str(run / "samples" / name.replace(" ", "_") / f"seed{seed}")}
            folder = Path(sampler_config["export_dir"])
            timing = folder.with_suffix(".seconds_per_image")  # of the export drawn in one go
            exported_before = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
            start = time.perf_counter()
            export(sampler_config, samplers_of(sampler_config, UNCONDITIONAL, model),
                   PlainGrid.for_eval(sampler_config, None), Process(device))
            if exported_before == 0:
                timing.write_text(str((time.perf_counter() - start) / args.num_samples))
            if timing.is_file():
                seconds.append(float(timing.read_text()))
            folders[seed] = sampler_config["export_dir"]
        scores = report_scores(config, {f"{name}, seed {seed}": folder for seed, folder in folders.items()})
        fids = [result["fid"] for result in scores.values()]
        rows[name] = {"fids": fids, "mean": statistics.mean(fids),
                      "pooled": pooled_fid(config, folders.values()),
                      "seconds_per_image": statistics.mean(seconds) if seconds else None}
    real = [run / "samples" / "training-images"] + [run / "samples" / f"training-images-{index}"
                                                    for index in range(1, len(args.seeds))]
    for index, folder in enumerate(real):
        if not folder.is_dir():
            write_training_images(config, folder, args.num_samples, first=index * args.num_samples)
    fid = report_scores(config, {"training images": str(real[0])})["training images"]["fid"]
    rows["training images"] = {"fids": [fid], "mean": fid, "pooled": pooled_fid(config, real),
                               "seconds_per_image": None}
    return rows


def pooled_fid(config, folders):
    """The FID of the images of all `folders` together (less biased and less noisy than the
    mean of their FIDs, as FID falls with the number of images)."""
    images = ConcatDataset([folder_images(folder, config["img_size"]) for folder in folders])
    batches = dataset_batches(images, config, f"features of {len(images)} images")
    return scores_of(batches, config, extractor_of(config["fid_extractor"], config["img_size"]))["fid"]


def picture(run, names, path, count=8, scale=4):
    """The first `count` exported images of seed 0 of each sampler, one row each, labelled with
    its name, `scale` pixels per pixel: the samplers draw from the same noise per batch, so the
    columns start alike."""
    plt = pyplot()
    folders = [run / "samples" / name.replace(" ", "_") / "seed0" for name in names]
    with Image.open(folders[0] / "000000.png") as first:
        inches = first.width * scale / 100
    figure, axes = plt.subplots(len(names), count, figsize=(count * inches, len(names) * inches), dpi=100,
                                squeeze=False)
    figure.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0.05, hspace=0.05)
    for row, (name, folder) in enumerate(zip(names, folders)):
        for column, cell in enumerate(axes[row]):
            with Image.open(folder / f"{column:06d}.png") as image:
                if image.mode == "L":
                    cell.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    cell.imshow(image.convert("RGB"), interpolation="nearest")
            cell.set(xticks=[], yticks=[])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    figure.savefig(path, bbox_inches="tight")  # widened to the row labels, left of the images
    plt.close(figure)
    print(f"wrote {path}")


def versus(rows, name, column):
    """The row's FID in `column` ("mean" of the seeds', or "pooled") against DDPM-1000's, in %."""
    if "DDPM-1000" not in rows or name == "DDPM-1000":
        return "-"
    return f"{100 * (rows[name][column] / rows['DDPM-1000'][column] - 1):+.0f}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--speed", choices=["default", "small", "none"], default="default")
    parser.add_argument("--batch_size", type=int, default=None, help="speed: default 80 on CUDA, 8 on CPU")
    parser.add_argument("--fid_dir", default=None, help="FID: the run folder (RUN/ckpt holds the checkpoint)")
    parser.add_argument("--checkpoint", default="ckpt_7_.pt")
    parser.add_argument("--data_root", default=".")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--img_channels", type=int, choices=[1, 3], default=3, help="FID: of the small model")
    parser.add_argument("--fid_batch_size", type=int, default=250)
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0])
    parser.add_argument("--picture", default=None, help="FID: draw the first samples of each row here (PNG)")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none",
                        help="FID: the samples drawn under this autocast (x_t stays float32)")
    parser.add_argument("--samplers", type=lambda text: text.split(","), default=None,
                        help="FID: the rows to run, by name (default: all)")
    args = parser.parse_args()
    if args.picture:
        pyplot()  # without matplotlib, say so now rather than after the sampling
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, {device.type}: {machine}, {torch.get_num_threads()} CPU threads\n")
    if args.speed != "none":
        batch_size = args.batch_size or (80 if device.type == "cuda" else 8)
        rows = speed_rows(args.speed, batch_size, device)
        print(f"| {args.speed} models, T = 1000, batch {batch_size} | s/image unguided | s/image guided "
              f"| speed-up unguided | speed-up guided |\n| --- | --- | --- | --- | --- |")
        for name, unguided, guided in rows:
            print(f"| {name} | {unguided:.3f} | {guided:.3f} | {rows[0][1] / unguided:.1f}x "
                  f"| {rows[0][2] / guided:.1f}x |")
    if args.fid_dir:
        rows = fid_rows(args, device)
        print(f"\n| {args.num_samples} images, EMA weights | FID per seed ({', '.join(map(str, args.seeds))}) "
              f"| mean | vs DDPM-1000 | all {len(args.seeds) * args.num_samples} images | vs DDPM-1000 "
              f"| s/image |\n| --- | --- | --- | --- | --- | --- | --- |")
        for name, row in rows.items():
            speed = f"{row['seconds_per_image']:.4f}" if row["seconds_per_image"] else "-"
            print(f"| {name} | {' / '.join(f'{fid:.2f}' for fid in row['fids'])} | {row['mean']:.2f} "
                  f"| {versus(rows, name, 'mean')} | {row['pooled']:.3f} | {versus(rows, name, 'pooled')} "
                  f"| {speed} |")
        if args.picture:
            picture(Path(args.fid_dir), [name for name in rows if name != "training images"], args.picture)


if __name__ == "__main__":
    main()
