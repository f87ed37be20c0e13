"""Two checkouts of this repo against each other: the training step and the sampling step as a
user gets them, each checkout's own `python Main.py`, the two alternating round after round, so
that a machine that slows down or speeds up affects both alike.

    git worktree add /tmp/before <commit>        # the revision to compare with
    python benchmarks/revisions.py /tmp/before . --rounds 3
    python benchmarks/revisions.py /tmp/before . --rounds 6 --sample_rounds 0   # training only

Training: Main.py trains a small UNet on generated 16x16 images; its images per second are those
the run log records for every epoch but the first (which includes the start-up). Sampling:
Main.py --state eval draws a batch with Algorithm 2; timed from its start, so both checkouts
pay the same start-up, small beside 1000 steps. Both use only the keys
that every revision since the quick starts has.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import cpu_name  # noqa: E402

MODEL = {"img_size": 16, "channel": 64, "channel_mult": "1,2,2", "attn": "1", "num_res_blocks": 2,
         "dropout": 0., "num_workers": 0, "device": "cpu", "seed": 0}


def write_images(folder, count):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def main_py(checkout, work, **keys):
    """Run the checkout's Main.py with `keys` in `work`; returns the seconds it took."""
    arguments = [str(Path(checkout) / "Main.py")]
    for key, value in {**MODEL, **keys}.items():
        arguments += [f"--{key}", str(value)]
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], cwd=work, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(checkout)})
    return time.perf_counter() - start


def training_rate(checkout, work, images, epochs, batch_size):
    folder = Path(work) / "ckpt"
    main_py(checkout, work, dataset=images, save_weight_dir=folder, epoch=epochs, batch_size=batch_size,
            T=1000, overwrite="true", sample_every=0, log_every=0)
    lines = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    return statistics.median(line["images_per_second"] for line in lines if line["kind"] == "epoch"
                             and line["epoch"] > 0)


def sampling_seconds(checkout, work, images, epochs, batch_size):
    """Main.py --state eval of the run training_rate trained (T = 1000)."""
    return main_py(checkout, work, dataset=images, save_weight_dir=Path(work) / "ckpt", state="eval",
                   test_load_weight=f"ckpt_{epochs - 1}_.pt", T=1000, batch_size=batch_size,
                   process_frames=0, sampled_dir=Path(work) / "samples")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--sample_rounds", type=int, default=None,
                        help="rounds that also sample (default: all); the others train only, for more "
                             "training rounds in the same time")
    args = parser.parse_args()
    checkouts = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    with tempfile.TemporaryDirectory() as work:
        images = Path(work) / "images"
        write_images(images, args.images)
        runs = {name: {"train": [], "sample": []} for name in checkouts}
        sample_rounds = args.rounds if args.sample_rounds is None else args.sample_rounds
        for round_ in range(args.rounds):
            for name, checkout in checkouts.items():
                folder = Path(work) / name
                folder.mkdir(exist_ok=True)
                runs[name]["train"].append(training_rate(checkout, folder, images, args.epochs, args.batch_size))
                if round_ < sample_rounds:
                    runs[name]["sample"].append(sampling_seconds(checkout, folder, images, args.epochs,
                                                                 args.sample_batch))
    print(f"{cpu_name()}, {args.rounds} rounds alternating ({sample_rounds} sampling); medians; training "
          f"images/s of each round: " + "; ".join(f"{name} {', '.join(f'{rate:.1f}' for rate in runs[name]['train'])}"
                                                  for name in checkouts) + "\n")
    print("| checkout | training images/s | sampling: seconds for a batch of "
          f"{args.sample_batch}, T = 1000 |\n| --- | --- | --- |")
    for name, checkout in checkouts.items():
        sampling = f"{statistics.median(runs[name]['sample']):.1f}" if sample_rounds else "-"
        print(f"| {name} ({checkout}) | {statistics.median(runs[name]['train']):.1f} | {sampling} |")
    train = statistics.median(runs["after"]["train"]) / statistics.median(runs["before"]["train"])
    sample = (statistics.median(runs["before"]["sample"]) / statistics.median(runs["after"]["sample"])
              if sample_rounds else float("nan"))
    print(f"\nafter / before: training {train:.3f}x, sampling {sample:.3f}x (above 1: after is faster)")


if __name__ == "__main__":
    main()
