"""The DDPM authors' released architectures (docs/checkpoints.md): parameters, network FLOPs and
the time of one sample, Algorithm 2's 1000 network evaluations, with --amp bf16 (or none: float32).

    python benchmarks/released.py --device cpu --batch_size 1 --rounds 2
    python benchmarks/released.py --device cuda --batch_size 16 --rounds 5

Random weights in the imported config of each architecture (Conversion/Import.py RELEASED:
CIFAR-10 at 32x32; CelebA-HQ and LSUN church, bedroom and cat at 256x256, which share one). The
network is run as eval runs it with --amp bf16 (Sampling.under_speed_options; compile and
channels_last off); the median of --rounds timed evaluations of a batch (on a GPU after one
untimed) gives seconds per image and step, and x 1000 per sample. FLOPs per image and step:
torch.utils.flop_counter.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import cpu_name  # noqa: E402
from Conversion.Import import RELEASED  # noqa: E402
from Diffusion.Run.Sampling import under_speed_options  # noqa: E402
from Diffusion.Train import unet_of  # noqa: E402

NAMES = {32: "CIFAR-10", 256: "CelebA-HQ, LSUN church, bedroom, cat"}


def config_of(architecture, settings):
    return {**architecture, **settings, "T": 1000, "img_channels": 3, "group_norm_eps": 1e-6,
            "downsample_padding": "same"}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config, batch_size, rounds, device, amp):
    model = unet_of(config).to(device).eval()
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    on_gpu = device.type == "cuda"
    network = under_speed_options(model, amp, False, False, device)
    size = config["img_size"]
    x, t = torch.randn(batch_size, 3, size, size, device=device), torch.full((batch_size,), 500, device=device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(x[:1], t[:1])
        if on_gpu:
            network(x, t)  # untimed: allocation, kernel selection
        seconds = []
        for _ in range(rounds):
            synchronize(device)
            start = time.perf_counter()
            network(x, t)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    per_step = statistics.median(seconds) / batch_size
    return {"parameters": parameters, "gflops_per_step": counter.get_total_flops() / 1e9,
            "seconds_per_image_step": per_step, "seconds_per_sample": 1000 * per_step}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--amp", default="bf16", choices=("none", "bf16"))
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}, amp {args.amp}, batch {args.batch_size}, median of {args.rounds}\n")
    print("| architecture | parameters | GFLOPs per image and step | s per image and step | one sample (1000 steps) |")
    print("| --- | --- | --- | --- | --- |")
    for architecture, settings in RELEASED:
        row = measure(config_of(architecture, settings), args.batch_size, args.rounds, device, args.amp)
        print(f"| {NAMES[settings['img_size']]} ({settings['img_size']}x{settings['img_size']}) | "
              f"{row['parameters'] / 1e6:.1f}M | {row['gflops_per_step']:.1f} | "
              f"{row['seconds_per_image_step']:.4f} | {row['seconds_per_sample'] / 60:.1f} min |", flush=True)
        print(json.dumps(row), file=sys.stderr)


if __name__ == "__main__":
    main()
