"""RePaint's resampling measured (Lugmayr et al. 2022, Sec. 4.2): held-out images with the center
masked, completed by `python Main.py --state inpaint` with resample 1 (plain replacement) and 10
(the paper's), run as a user runs it, on a model that never saw them.

    python Main.py --config configs/quickstart.json                    # the model (README quick start)
    python benchmarks/stand_in_classifier.py --dataset DATA/train --img_size 16 --epochs 6 --out classifier.pt
    python benchmarks/editing.py --dataset DATA/held_out --extractor classifier.pt --out OUT [--images 1000]

For each row: the wall time of the command, the FID of the completed images against all the
held-out images (features of the stand-in classifier, benchmarks/stand_in_classifier.py,
comparable only within the table), and the **seam gradient ratio**: across the mask's edge, the
mean squared difference of neighbouring pixels (one kept, one sampled), in the completed images
over that in the same images before masking. 1: the seam is as smooth as the real image there;
above 1: an edge where the two parts meet; below 1: smoother than real. The reference row is as
many training images against the held-out ones: the FID of real images of that count.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from Diffusion.Run.Config import read_config_file  # noqa: E402
from Diffusion.Run.Data import ImageFiles, image_transform  # noqa: E402
from Diffusion.Run.Editing import named_mask  # noqa: E402
from Diffusion.Run.Metrics import dataset_batches, extractor_of, folder_images, scores_of  # noqa: E402


def spread_subset(dataset_folder, count, folder):
    """`folder` holding links to `count` images of dataset_folder, evenly spread over its sorted files
    (every class of a folder per class); returns it."""
    paths = ImageFiles(dataset_folder, None).paths
    step = max(1, len(paths) // count)
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(paths[::step][:count]):
        link = folder / f"{index:06d}{Path(path).suffix}"
        if not link.exists():
            link.symlink_to(os.path.abspath(path))
    return folder


def seam_pairs(mask):
    """The pairs of neighbouring pixels across the edge of `mask` [1, H, W] (1 kept, 0 sampled):
    boolean [H, W - 1] (left-right pairs) and [H - 1, W] (top-bottom pairs)."""
    kept = mask[0] > 0.5
    return kept[:, 1:] != kept[:, :-1], kept[1:] != kept[:-1]


def seam_energy(images, pairs):
    """The mean squared difference across the seam of each image [N, C, H, W] in [0, 1] -> [N]."""
    across, down = pairs
    horizontal = (images[..., 1:] - images[..., :-1]).square().mean(1)[:, across]
    vertical = (images[..., 1:, :] - images[..., :-1, :]).square().mean(1)[:, down]
    return torch.cat([horizontal, vertical], dim=1).mean(1)


def as_unit(folder, img_size, count):
    """The first `count` images of `folder` in sorted order, [count, 1, H, W] in [0, 1] (gray)."""
    files = ImageFiles(str(folder), image_transform(img_size, 1, for_model=False))
    return torch.stack([files[index][0] for index in range(count)]).float() / 255.


def inpaint(args, config, inputs, resample):
    """Runs the user's command for one row; returns (its wall time in seconds, the results' folder)."""
    out = args.out / f"resample_{resample}"
    command = [sys.executable, "Main.py", "--config", args.config, "--state", "inpaint", "--edit_images", str(inputs),
               "--mask", "center", "--resample", str(resample), "--jump_length", str(args.jump_length),
               "--sampled_dir", str(out), "--batch_size", str(args.batch_size), "--amp", args.amp,
               "--save_weight_dir", str(args.save_weight_dir), "--test_load_weight", args.checkpoint]
    start = time.perf_counter()
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr[-2000:]}")
    return seconds, out / "inpaint" / "results"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="the held-out images, a folder (per class)")
    parser.add_argument("--extractor", type=Path, required=True,
                        help="the stand-in classifier's TorchScript file (benchmarks/stand_in_classifier.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="configs/quickstart.json")
    parser.add_argument("--save_weight_dir", type=Path, help="the model's folder (default: the config's)")
    parser.add_argument("--checkpoint", default="ckpt_19_.pt")
    parser.add_argument("--training_set", type=Path, help="for the reference row (default: the config's dataset)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resample", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--jump_length", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--amp", choices=("none", "bf16"), default="bf16")
    args = parser.parse_args()
    config = {**read_config_file(REPO / args.config), "batch_size": 500, "num_workers": 0, "device": "cpu",
              "data_root": "."}
    args.save_weight_dir = (args.save_weight_dir or REPO / config["save_weight_dir"]).resolve()
    args.out, args.extractor, args.dataset = (path.resolve() for path in (args.out, args.extractor, args.dataset))
    img_size = config["img_size"]
    inputs = spread_subset(args.dataset, args.images, args.out / "inputs")
    extractor = extractor_of(str(args.extractor), img_size)
    against = {**config, "dataset": str(args.dataset), "fid_stats_dir": str(args.out / "stats"),
               "fid_extractor": str(args.extractor)}  # FID against all the held-out images
    pairs = seam_pairs(named_mask("center", img_size))
    real_seam = seam_energy(as_unit(inputs, img_size, args.images), pairs).mean().item()
    rows = {}
    training = spread_subset(args.training_set or REPO / config["dataset"], args.images, args.out / "training")
    reference = scores_of(dataset_batches(folder_images(str(training), img_size), against, "training"), against, extractor)
    print(f"| {args.images} held-out images, center masked | time | FID | seam gradient ratio |\n"
          f"| --- | --- | --- | --- |\n| {args.images} training images (reference) | – | {reference['fid']:.2f} | – |",
          flush=True)
    for resample in args.resample:
        seconds, results = inpaint(args, config, inputs, resample)
        scores = scores_of(dataset_batches(folder_images(str(results), img_size), against, "completed"), against, extractor)
        ratio = seam_energy(as_unit(results, img_size, args.images), pairs).mean().item() / real_seam
        rows[resample] = {"seconds": seconds, "fid": scores["fid"], "seam_gradient_ratio": ratio}
        print(f"| RePaint resample {resample}, jump_length {args.jump_length} | {seconds:.0f} s | {scores['fid']:.2f} | "
              f"{ratio:.3f} |", flush=True)
    (args.out / "editing.json").write_text(json.dumps({"reference_fid": reference["fid"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
