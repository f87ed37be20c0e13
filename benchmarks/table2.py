"""Table 2 of the DDPM paper, and Improved DDPM's hybrid row, measured: each objective and
parameterization trained the same number of steps, sampled with Algorithm 2, scored for FID and
for the NLL bound in bits/dim.

    python benchmarks/table2.py --run RUN --dataset digits/train --held_out digits/held_out
    python benchmarks/table2.py --run RUN --parallel 7 --epochs 40 ...       # on a GPU, all at once

Each row trains the small model of benchmarks/RESULTS.md (benchmarks/sampling.py's SMALL, gray,
batch 128, lr 2e-4, seed 0) with the real `python Main.py` into RUN/<row>/ckpt (an interrupted
run continues there). Its EMA weights then draw --num_samples images with Algorithm 2 on all T
steps, scored against the training set with the stand-in classifier (RUN/classifier.pt, trained
when missing; benchmarks/stand_in_classifier.py): its FID ranks the rows, it is not the paper's
Inception FID. The NLL is `Main.py --state nll` over --nll_images held-out images. A row that
diverges is kept: the table says what happened (the run's error, NaN samples). The table goes
to stdout and to RUN/table2.json, row by row as they are scored.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recipes import run_in_parallel  # noqa: E402
from benchmarks.sampling import SMALL  # noqa: E402
from benchmarks.speed import cpu_name, script_defaults  # noqa: E402
from benchmarks.stand_in_classifier import train_classifier  # noqa: E402
from Diffusion.Run.Evaluation import PlainGrid, export, likelihood, samplers_of, trained_model  # noqa: E402
from Diffusion.Run.Metrics import report_scores  # noqa: E402
from Diffusion.Run.Processes import Process  # noqa: E402
from Diffusion.Train import UNCONDITIONAL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Table 2's rows (the paper's FID on CIFAR-10; None: "-", training was unstable) and IDDPM's.
ROWS = {
    "mu, L, learned Sigma": ({"prediction": "mu", "loss": "bound", "variance": "learned"}, 23.69),
    "mu, L, fixed Sigma": ({"prediction": "mu", "loss": "bound", "variance": "fixedlarge"}, 13.22),
    "mu, MSE": ({"prediction": "mu", "loss": "simple"}, None),
    "eps, L, learned Sigma": ({"prediction": "eps", "loss": "bound", "variance": "learned"}, None),
    "eps, L, fixed Sigma": ({"prediction": "eps", "loss": "bound", "variance": "fixedlarge"}, 13.51),
    "eps, L_simple": ({}, 3.17),
    "eps, hybrid, learned_range": ({"loss": "hybrid", "variance": "learned_range"}, None),
    "eps, L, fixed Sigma, importance t": ({"loss": "bound", "variance": "fixedlarge", "t_sampling": "importance"},
                                          None),
}
TRAINING = {**SMALL, "img_channels": 1, "batch_size": 128, "lr": 2e-4, "multiplier": 2., "seed": 0,
            "num_workers": 0, "save_every": 1, "sample_every": 0, "log_every": 50}


def folder_of(run, row):
    return Path(run) / "".join(c if c.isalnum() else "_" for c in row)


def row_config(args, row):
    """The config of a row's run: TRAINING, its keys, the dataset, its folder."""
    return {**TRAINING, **ROWS[row][0], "dataset": args.dataset, "epoch": args.epochs, "T": args.T,
            "beta_T": args.beta_T,
            "amp": args.amp, "save_weight_dir": str(folder_of(args.run, row) / "ckpt"),
            "sampled_dir": str(folder_of(args.run, row) / "samples")}


def training_command(args, row):
    """`python Main.py` of the row, continuing its run if one is there."""
    config = row_config(args, row)
    if (folder_of(args.run, row) / "ckpt" / "training_state.pt").is_file():
        config["training_load_weight"] = "last"
    folder_of(args.run, row).mkdir(parents=True, exist_ok=True)
    path = folder_of(args.run, row) / "config.json"
    path.write_text(json.dumps(config))
    return [sys.executable, str(REPO / "Main.py"), "--config", str(path)], folder_of(args.run, row) / "train.log"


def train(args):
    """Train the rows whose last snapshot is missing; {row: what stopped its training} for those that failed."""
    waiting = [row for row in args.rows
               if not (folder_of(args.run, row) / "ckpt" / f"ckpt_{args.epochs - 1}_.pt").is_file()]
    statuses = run_in_parallel({row: training_command(args, row) for row in waiting}, args.parallel,
                               {"OMP_NUM_THREADS": str(args.threads)})
    return {row: last_error(folder_of(args.run, row) / "train.log") for row, status in statuses.items() if status}


def last_error(log):
    """The last line of a failed run's log that says what stopped it."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "error" in line.lower() or "diverged" in line), lines[-1])


def training_record(run, row):
    """The last epoch line of the row's run log: its step, loss and skipped steps."""
    path = folder_of(run, row) / "ckpt" / "training_log.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []
    epochs = [line for line in lines if line["kind"] == "epoch"]
    return epochs[-1] if epochs else {}


def score(args, row, device):
    """{fid, nll, loss, skipped}: FID of num_samples Algorithm-2 samples, and the NLL bound."""
    config = {**script_defaults("Main"), **row_config(args, row), "device": str(device), "sampler": "ddpm",
              "sample_steps": None, "num_samples": args.num_samples, "batch_size": args.batch_size,
              "test_load_weight": f"ckpt_{args.epochs - 1}_.pt", "fid_stats_dir": str(Path(args.run) / "fid_stats"),
              "fid_extractor": str(Path(args.run) / "classifier.pt"), "nll_dataset": args.held_out,
              "nll_images": args.nll_images, "export_dir": str(folder_of(args.run, row) / "samples" / "export"),
              "state": "nll", "amp": "none"}
    record = training_record(args.run, row)
    result = {"loss": record.get("loss"), "skipped_steps": record.get("skipped_steps"), "step": record.get("step")}
    model, _ = trained_model(config, UNCONDITIONAL, device)
    try:
        export(config, samplers_of(config, UNCONDITIONAL, model), PlainGrid.for_eval(config, None), Process(device))
        result["fid"] = report_scores(config, {row: config["export_dir"]})[row]["fid"]
    except FloatingPointError as error:
        result["fid"], result["failure"] = None, str(error).split(":")[0]
    nll = likelihood(config, UNCONDITIONAL)[""]["total"]
    result["nll"], result["nll_error"] = nll
    return result


def table(results, paper):
    """The markdown table of the rows' results, beside the paper's FID."""
    lines = ["| row | FID (stand-in) | NLL bits/dim | last loss | skipped steps | paper's FID (CIFAR-10) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, result in results.items():
        fid = "-" if result.get("fid") is None else f"{result['fid']:.2f}"
        if "failure" in result:
            fid += f" ({result['failure']})"
        nll = result.get("nll")
        nll = "-" if nll is None or not math.isfinite(nll) else f"{nll:.3f} ± {result['nll_error']:.3f}"
        loss = result.get("loss")
        lines.append(f"| {row} | {fid} | {nll} | {'-' if loss is None else f'{loss:.4g}'} | "
                     f"{result.get('skipped_steps', '-')} | {'-' if paper[row] is None else paper[row]} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--dataset", default="FashionMNIST", help="training set: a torchvision dataset or a folder")
    parser.add_argument("--held_out", default=None, help="folder of held-out images for the NLL (None: the test split)")
    parser.add_argument("--rows", type=lambda text: text.split(";"), default=list(ROWS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--T", type=int, default=SMALL["T"])
    parser.add_argument("--beta_T", type=float, default=SMALL["beta_T"])
    parser.add_argument("--amp", default="none")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--nll_images", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each training")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    failed = train(args)
    classifier = Path(args.run) / "classifier.pt"
    if not classifier.is_file():
        train_classifier({**script_defaults("Main"), **TRAINING, "dataset": args.dataset, "device": str(device)},
                         str(classifier))
    results = {}
    for row in args.rows:
        results[row] = {"failure": failed[row]} if row in failed else score(args, row, device)
        (Path(args.run) / "table2.json").write_text(json.dumps(results, indent=1))
    machine = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(f"\n{machine}; {args.epochs} epochs of batch 128 on {args.dataset}, T = {args.T}, beta_T = {args.beta_T}, EMA weights; "
          f"FID of {args.num_samples} Algorithm-2 samples (stand-in features), NLL over {args.nll_images} "
          f"held-out images\n")
    print(table(results, {row: ROWS[row][1] for row in args.rows}))


if __name__ == "__main__":
    main()
