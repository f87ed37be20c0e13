"""The follow-ups' training recipes against the original's, measured: FID against training time.

    python benchmarks/recipes.py --run RUN --data_root DATA            # train, sample, score, plot
    python benchmarks/recipes.py --run RUN --data_root DATA --parallel 2   # two trainings at once

Each recipe trains the small Fashion-MNIST model of benchmarks/RESULTS.md (benchmarks/sampling.py's
SMALL, gray, batch 128, lr 2e-4, seed 0) for --epochs epochs with the real `python Main.py`, one
CPU thread each, into RUN/<recipe>/ckpt (an interrupted run continues there). At each of
--points (epochs) its snapshot's EMA weights draw num_samples images per seed with the same
sampler for every recipe (--sampler, --sample_steps), scored against the training set with
the stand-in classifier of benchmarks/stand_in_classifier.py (RUN/classifier.pt, trained when missing; its FID
compares the recipes with each other, not with published numbers). Every recipe does the same
work per step, so training time is steps at one speed, the median of all the runs' epochs.
Prints the table and draws FID against minutes of training, one line per recipe, into --plot.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plots import pyplot  # noqa: E402
from benchmarks.sampling import SMALL  # noqa: E402
from benchmarks.speed import cpu_name, script_defaults  # noqa: E402
from benchmarks.stand_in_classifier import train_classifier  # noqa: E402
from Diffusion.Run.Evaluation import PlainGrid, export, samplers_of, trained_model  # noqa: E402
from Diffusion.Run.Metrics import report_scores  # noqa: E402
from Diffusion.Run.Processes import Process  # noqa: E402
from Diffusion.Train import UNCONDITIONAL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "original": {},
    "cosine": {"beta_schedule": "cosine"},
    "v": {"prediction": "v"},
    "min-SNR": {"loss_weight": "min_snr"},
    "v + min-SNR": {"prediction": "v", "loss_weight": "min_snr"},
    "cosine + v + min-SNR": {"beta_schedule": "cosine", "prediction": "v", "loss_weight": "min_snr"},
}
TRAINING = {**SMALL, "img_channels": 1, "batch_size": 128, "lr": 2e-4, "multiplier": 2., "seed": 0,
            "num_workers": 0, "save_every": 1, "sample_every": 0, "log_every": 0}


def folder_of(run, recipe):
    return Path(run) / recipe.replace(" ", "").replace("+", "_")


def training_command(recipe, run, data_root, epochs):
    """`python Main.py` of the recipe, continuing its run if one is there."""
    config = {**TRAINING, **RECIPES[recipe], "dataset": SMALL["dataset"], "data_root": data_root,
              "epoch": epochs, "save_weight_dir": str(folder_of(run, recipe) / "ckpt"),
              "sampled_dir": str(folder_of(run, recipe) / "unused")}
    if (folder_of(run, recipe) / "ckpt" / "training_state.pt").is_file():
        config["training_load_weight"] = "last"
    folder_of(run, recipe).mkdir(parents=True, exist_ok=True)
    path = folder_of(run, recipe) / "config.json"
    path.write_text(json.dumps(config))
    return [sys.executable, str(REPO / "Main.py"), "--config", str(path)]


def train(recipes, run, data_root, epochs, parallel):
    """Train the recipes whose last snapshot is missing, `parallel` at a time, one thread each."""
    waiting = [recipe for recipe in recipes
               if not (folder_of(run, recipe) / "ckpt" / f"ckpt_{epochs - 1}_.pt").is_file()]
    commands = {recipe: (training_command(recipe, run, data_root, epochs), folder_of(run, recipe) / "train.log")
                for recipe in waiting}
    for recipe, status in run_in_parallel(commands, parallel).items():
        if status:
            raise SystemExit(f"{recipe}: Main.py exited with {status} (its log: {commands[recipe][1]})")


def run_in_parallel(commands, parallel, environment=None):
    """Run {name: (command, log file)}, `parallel` at a time, each with one CPU thread (and the
    `environment` variables). Returns {name: its exit status}."""
    waiting, running, statuses = list(commands), [], {}
    while waiting or running:
        while waiting and len(running) < parallel:
            name = waiting.pop(0)
            command, log_path = commands[name]
            with open(log_path, "a") as log:
                running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                       env={**os.environ, "OMP_NUM_THREADS": "1",
                                                            **(environment or {})})))
        time.sleep(5)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                statuses[name] = process.returncode
    return statuses


def epoch_lines(run, recipe):
    """{epoch: the run log's line of its end} (the last one, should an epoch have run twice)."""
    lines = [json.loads(line) for line in (folder_of(run, recipe) / "ckpt" / "training_log.jsonl")
             .read_text().splitlines() if line.endswith("}")]
    return {line["epoch"]: line for line in lines if line["kind"] == "epoch"}


def images_per_second(run, recipes):
    """The median training speed of all the recipes' epochs: every recipe does the same work per
    step, so one speed turns steps into minutes for all of them alike (a run that shared the
    CPU with another is not charged for it)."""
    return statistics.median(line["images_per_second"] for recipe in recipes
                             for line in epoch_lines(run, recipe).values())


def score_points(args, device, rate):
    """{recipe: [(minutes, [FID per seed])]} at each point, minutes at `rate` images per second."""
    config = {**script_defaults("Main"), **TRAINING, "data_root": args.data_root, "device": str(device),
              "num_samples": args.num_samples, "batch_size": args.batch_size, "sampler": args.sampler,
              "sample_steps": args.sample_steps, "fid_stats_dir": str(Path(args.run) / "fid_stats"),
              "fid_extractor": str(Path(args.run) / "classifier.pt")}
    if not os.path.isfile(config["fid_extractor"]):
        train_classifier(config, config["fid_extractor"])
    results = {}
    for recipe in args.recipes:
        steps = {epoch: line["step"] for epoch, line in epoch_lines(args.run, recipe).items()}
        results[recipe] = []
        for epoch in args.points:
            point = {**config, **RECIPES[recipe], "save_weight_dir": str(folder_of(args.run, recipe) / "ckpt"),
                     "test_load_weight": f"ckpt_{epoch}_.pt"}
            model, _ = trained_model(point, UNCONDITIONAL, device)
            folders = {}
            for seed in args.seeds:
                sampled = {**point, "seed": seed,
                           "export_dir": str(folder_of(args.run, recipe) / "samples" / f"epoch{epoch}" / f"seed{seed}")}
                export(sampled, samplers_of(sampled, UNCONDITIONAL, model),
                       PlainGrid.for_eval(sampled, None), Process(device))
                folders[f"{recipe}, epoch {epoch}, seed {seed}"] = sampled["export_dir"]
            fids = [scores["fid"] for scores in report_scores(point, folders).values()]
            results[recipe].append((steps[epoch] * TRAINING["batch_size"] / rate / 60, fids))
    return results


def plot(results, path, title):
    """FID (mean over seeds) against minutes of training, one line with markers per recipe, as a
    760x480 PNG."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.6, 4.8), dpi=100)
    for recipe, rows in results.items():
        axes.plot([minutes for minutes, _ in rows], [statistics.mean(fids) for _, fids in rows],
                  marker="o", label=recipe)
    axes.set(title=title, xlabel="minutes of training (1 CPU thread)", ylabel="FID (stand-in features)")
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data_root", default=".")
    parser.add_argument("--recipes", type=lambda text: text.split(";"), default=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--points", type=lambda text: [int(e) for e in text.split(",")], default=[0, 1, 3, 6])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1])
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--sampler", default="dpmsolver++")
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--plot", default=str(REPO / "docs" / "recipes.png"))
    args = parser.parse_args()
    pyplot()  # without matplotlib, say so now rather than after the training
    device = torch.device("cpu")
    train(args.recipes, args.run, args.data_root, args.epochs, args.parallel)
    rate = images_per_second(args.run, args.recipes)
    results = score_points(args, device, rate)
    print(f"{cpu_name()}, 1 thread per training, minutes at the median {rate:.0f} images/s of all epochs; "
          f"{args.num_samples} images per seed ({', '.join(map(str, args.seeds))}), {args.sampler} "
          f"{args.sample_steps} NFE, EMA weights, stand-in features\n")
    print("| recipe | " + " | ".join(f"epoch {e + 1}" for e in args.points) + " |\n|" + " --- |" * (len(args.points) + 1))
    for recipe, rows in results.items():
        cells = [f"{statistics.mean(f):.2f} ({' / '.join(f'{x:.2f}' for x in f)}) at {m:.0f} min" for m, f in rows]
        print(f"| {recipe} | " + " | ".join(cells) + " |")
    plot(results, args.plot, f"FID (stand-in features, {args.num_samples} images) against training time")
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
