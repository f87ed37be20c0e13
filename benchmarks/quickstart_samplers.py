"""The samplers on the quick start's model, run as a user runs them: FID and the share of speckled samples.

    python Main.py --config configs/quickstart.json                    # the model (README quick start)
    python benchmarks/sampling.py --speed none --fid_dir RUN ...       # trains RUN/classifier.pt
    python benchmarks/quickstart_samplers.py --extractor RUN/classifier.pt --out OUT

For each row, `python Main.py --config configs/quickstart.json --state fid` exports num_samples
samples of the quick start's checkpoint into OUT/<row> (an interrupted export continues) and
scores them against the training set with the stand-in classifier's features (comparable only
within the table). "speckled" is the share of samples whose mean |Laplacian| exceeds that of 99%
of the training images at the same size: the grainy samples that a model's probability-flow ODE
can leave, which the FID of so few images weighs little.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from Diffusion.Run.Config import read_config_file  # noqa: E402
from Diffusion.Run.Metrics import dataset_batches, folder_images, reference_images  # noqa: E402

NOISE = ["--eta", "10", "--eta_min_snr", "0.1"]
SPLIT = NOISE + ["--skip_type", "logSNR_split"]
ROWS = {"DDPM-200 (Algorithm 2, the default)": [],
        "DDIM-200, eta 0 (the ODE, every step)": ["--sampler", "ddim", "--sample_steps", "200", "--eta", "0"],
        "DPM-Solver++-20": ["--sampler", "dpmsolver++", "--sample_steps", "20"],
        "UniPC-20": ["--sampler", "unipc", "--sample_steps", "20"],
        "UniPC-20 eta 10 from SNR 0.1": ["--sampler", "unipc", "--sample_steps", "20", *NOISE],
        "UniPC-20 eta 10 from SNR 0.1 half below": ["--sampler", "unipc", "--sample_steps", "20", *SPLIT],
        "UniPC-10 eta 10 from SNR 0.1": ["--sampler", "unipc", "--sample_steps", "10", *NOISE],
        "UniPC-10 eta 10 from SNR 0.1 half below": ["--sampler", "unipc", "--sample_steps", "10", *SPLIT]}
LAPLACIAN = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]])[None, None]


def roughness(images):
    """Mean |Laplacian| of each image's first channel, borders left out: (N, C, H, W) in [0, 1] -> (N,)."""
    return F.conv2d(images[:, :1], LAPLACIAN, padding=1)[..., 1:-1, 1:-1].abs().mean((1, 2, 3))


def images_roughness(images, config, description, count=None):
    """roughness of the first `count` (default: all) uint8 images of a dataset, as the FID reads them."""
    values, seen = [], 0
    for batch in dataset_batches(images, config, description):
        values.append(roughness(batch.float() / 255))
        seen += len(batch)
        if count and seen >= count:
            break
    return torch.cat(values)[:count]


def fid_of(name, arguments, args):
    """Runs the user's command for one row; returns the FID it prints."""
    folder = args.out / re.sub(r"[^A-Za-z0-9.+-]+", "_", name)
    command = [sys.executable, "Main.py", "--config", args.config, "--state", "fid",
               "--num_samples", str(args.num_samples), "--batch_size", "250", "--amp", args.amp,
               "--fid_extractor", str(args.extractor), "--data_root", str(args.data_root),
               "--fid_stats_dir", str(args.out / "stats"), "--export_dir", str(folder), *arguments]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if process.returncode != 0:
        sys.exit(f"{name}: {' '.join(command)} failed:\n{process.stderr[-2000:]}")
    return float(re.findall(r"FID ([0-9.]+)", process.stdout + process.stderr)[-1]), folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.json")
    parser.add_argument("--extractor", type=Path, required=True,
                        help="the stand-in classifier's TorchScript file (benchmarks/stand_in_classifier.py)")
    parser.add_argument("--out", type=Path, required=True, help="the exports and the reference statistics")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--data_root", type=Path, default=Path("."), help="where the dataset is (as Main.py's data_root)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="bf16")
    args = parser.parse_args()
    args.out, args.extractor, args.data_root = (path.resolve() for path in (args.out, args.extractor, args.data_root))
    config = {**read_config_file(REPO / args.config), "data_root": str(args.data_root),
              "batch_size": 500, "num_workers": 0}
    threshold = images_roughness(reference_images(config), config, "training images", args.num_samples).quantile(0.99)
    print(f"| {args.num_samples} samples of {args.config} | FID | speckled |\n| --- | --- | --- |")
    for name, arguments in ROWS.items():
        fid, folder = fid_of(name, arguments, args)
        samples = images_roughness(folder_images(str(folder), config["img_size"]), config, name)
        speckled = (samples > threshold).float().mean().item()
        print(f"| {name} | {fid:.2f} | {speckled:.1%} |", flush=True)


if __name__ == "__main__":
    main()
