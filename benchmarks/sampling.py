"""What fast sampling costs: speed and FID of DDPM-1000, DDIM-100 and DDIM-50, in one run.

    python benchmarks/sampling.py --speed default                    # the default models (GPU)
    python benchmarks/sampling.py --speed small --fid_dir RUN --data_root DATA   # a small model (CPU)

Speed: seconds per image of one whole sampling run of batch_size images, for each sampler,
unguided (Main.py's UNet) and guided (MainCondition.py's UNet, w = 1.8: two estimates per
step), both with T = 1000. `--speed default` times the default architectures, `--speed small`
the small one below; the weights are random (speed does not depend on them).

FID: for the small model trained by the command in benchmarks/RESULTS.md (its checkpoint in
RUN/ckpt), num_samples images of each sampler are exported into RUN/samples/<sampler> (an
interrupted run continues there) and scored against the training set with the same feature
extractor. Offline, Inception's weights cannot be downloaded, so the extractor is a
StandInClassifier trained here on the dataset's labels (RUN/classifier.pt, trained when
missing): its FID is NOT the papers' Inception FID, only comparable within the table. The row
"training images" scores num_samples real images the same way: the floor that a perfect model
would reach with so few images.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, random_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import cpu_name, script_defaults  # noqa: E402
from Diffusion.Machinery.Evaluation import Unconditional, export, samplers_of, trained_model  # noqa: E402
from Diffusion.Machinery.Images import save_png_atomically, starting_noise  # noqa: E402
from Diffusion.Machinery.Metrics import StandInClassifier, reference_images, report_scores  # noqa: E402
from Diffusion.Machinery.Processes import Processes  # noqa: E402
from Diffusion.Machinery.Sampling import sampler_of  # noqa: E402
from Diffusion.Train import UNCONDITIONAL, unet_of  # noqa: E402
from DiffusionFreeGuidence.DiffusionCondition import ClassifierFreeGuidance  # noqa: E402
from DiffusionFreeGuidence.TrainCondition import unet_of as conditional_unet_of  # noqa: E402

# The small model of the FID table; its samples are drawn with the predicted x_0 clipped, as the
# DDPM paper's FID was measured.
SMALL = {"dataset": "FashionMNIST", "img_size": 16, "channel": 32, "channel_mult": [1, 2, 2],
         "attn": [], "num_res_blocks": 1, "T": 1000, "beta_1": 1e-4, "beta_T": 0.02, "dropout": 0.,
         "clip_denoised": True}
SAMPLERS = {"DDPM-1000": {"sampler": "ddpm", "sample_steps": None},
            "DDPM-100 (respaced)": {"sampler": "ddpm", "sample_steps": 100},
            "DDIM-100": {"sampler": "ddim", "sample_steps": 100, "eta": 0.},
            "DDIM-50": {"sampler": "ddim", "sample_steps": 50, "eta": 0.},
            "DDIM-100-eta1": {"sampler": "ddim", "sample_steps": 100, "eta": 1.}}
SPEED_SAMPLERS = ("DDPM-1000", "DDIM-100", "DDIM-50")


def seconds_per_image(config, model, guided, batch_size, device):
    """Wall-clock seconds of one whole sampling run of batch_size images, per image."""
    sampler = sampler_of(config, ClassifierFreeGuidance(model, 1.8) if guided else model)
    x_T = starting_noise(batch_size, config, device)
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


def train_classifier(config, path, epochs=3):
    """A StandInClassifier trained on the labels of the training set (5,000 images held out)."""
    torch.manual_seed(0)
    dataset = reference_images(config)
    training, held_out = random_split(dataset, [len(dataset) - 5000, 5000])
    classifier = StandInClassifier(num_classes=len(dataset.classes))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for _ in range(epochs):
        for images, labels in DataLoader(training, batch_size=256, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(classifier(images), labels).backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        correct = sum((classifier(images).argmax(1) == labels).sum().item()
                      for images, labels in DataLoader(held_out, batch_size=500))
    torch.save(classifier.state_dict(), path)
    return correct / len(held_out)


def write_training_images(config, folder, count):
    """`count` random training images as PNGs, to score as a real 'sample'."""
    dataset = reference_images(config)
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))[:count]
    os.makedirs(folder, exist_ok=True)
    for index, (image, _) in enumerate(Subset(dataset, chosen.tolist())):
        save_png_atomically(image.float() / 127.5 - 1., os.path.join(folder, f"{index:06d}.png"))


def fid_rows(args, device):
    run = Path(args.fid_dir)
    config = {**script_defaults("Main"), **SMALL, "img_channels": args.img_channels, "device": str(device),
              "data_root": args.data_root,
              "save_weight_dir": str(run / "ckpt"), "test_load_weight": args.checkpoint,
              "num_samples": args.num_samples, "batch_size": args.fid_batch_size, "seed": 0,
              "num_workers": 0, "fid_stats_dir": str(run / "fid_stats"),
              "fid_extractor": str(run / "classifier.pt")}
    if not os.path.isfile(config["fid_extractor"]):
        accuracy = train_classifier(config, config["fid_extractor"])
        print(f"stand-in classifier: {accuracy:.1%} accuracy on 5,000 held-out training images")
    model, _ = trained_model(config, UNCONDITIONAL, device)
    folders = {}
    for name, choice in SAMPLERS.items():
        sampler_config = {**config, **choice, "export_dir": str(run / "samples" / name.split()[0])}
        start = time.perf_counter()
        export(sampler_config, samplers_of(sampler_config, UNCONDITIONAL, model, (None,)),
               Unconditional.for_eval(sampler_config, None), Processes(device))
        print(f"{name}: exported in {time.perf_counter() - start:.0f} s")
        folders[name] = sampler_config["export_dir"]
    real = run / "samples" / "training-images"
    if not real.is_dir():
        write_training_images(config, real, args.num_samples)
    folders["training images"] = str(real)
    return report_scores(config, folders)


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
    args = parser.parse_args()
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
        scores = fid_rows(args, device)
        print(f"\n| {args.num_samples} images | FID (stand-in features) | IS (stand-in) |\n| --- | --- | --- |")
        for name, result in scores.items():
            print(f"| {name} | {result['fid']:.2f} | {result['is']:.2f} ± {result['is_std']:.2f} |")


if __name__ == "__main__":
    main()
