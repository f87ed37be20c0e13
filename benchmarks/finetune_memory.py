"""Peak memory and time of one training step of the 256x256 DDPM architecture (CelebA-HQ, LSUN;
114M parameters) with and without grad_checkpoint and accumulate (Diffusion/Run/Memory.py).

    python benchmarks/finetune_memory.py --device cpu --batches 1,2 --amp bf16
    python benchmarks/finetune_memory.py --device cuda --batches 1,2,4,8,16 --amp bf16

Each row is one step of Train.fit's loop, built from its parts (AccumulatedDraws, the loss,
backward, optimizer_step with fused AdamW, the EMA update), in a fresh process, so that one row's
memory does not count in another's. For each global batch B: "plain" (one batch of B),
"grad_checkpoint", "accumulate B" (B micro-batches of 1) and both. Memory: on CUDA the peak
allocated (torch.cuda.max_memory_allocated) during the second step, above what is allocated before
it (weights, EMA, AdamW's moments); on a CPU the peak resident set (ru_maxrss) of the process, and
the same above the resident set before the first step (which also allocates AdamW's two moments,
0.9 GB). Time: that step's seconds.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import cpu_name  # noqa: E402
from Conversion.Import import RELEASED  # noqa: E402
from Diffusion.Diffusion import GaussianDiffusionTrainer  # noqa: E402
from Diffusion.EMA import EMA  # noqa: E402
from Diffusion.Run.Memory import AccumulatedDraws, checkpoint_blocks  # noqa: E402
from Diffusion.Run.Processes import autocast  # noqa: E402
from Diffusion.Train import backward, optimizer_step, original_loss, unet_of  # noqa: E402

ARCHITECTURE, SETTINGS = RELEASED[1]  # the 256x256 models
ROWS = {"plain": (False, False), "grad_checkpoint": (True, False), "accumulate": (False, True),
        "accumulate + grad_checkpoint": (True, True)}
GIB = 2 ** 30


def resident_gib():
    """The process's peak resident set so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def one_row(batch, grad_checkpoint, accumulate, amp, device):
    """Set up the 256x256 model's training and take steps of global batch `batch`; the row's numbers."""
    config = {**ARCHITECTURE, **SETTINGS, "T": 1000, "img_channels": 3, "group_norm_eps": 1e-6,
              "downsample_padding": "same"}
    model = unet_of(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-4, fused=True)
    ema = EMA(model, 0.9999)
    if grad_checkpoint:
        checkpoint_blocks(model)
    trainer = GaussianDiffusionTrainer(model, 1e-4, 0.02, 1000).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    micro_batch = 1 if accumulate else batch
    draws = AccumulatedDraws(torch.Generator(device).manual_seed(0), accumulate=batch // micro_batch)
    images = torch.rand(batch // micro_batch, micro_batch, 3, 256, 256, device=device) * 2 - 1

    def step():
        for x_0, last in draws.micro_batches(list(images)):
            t, noise = draws.randint(1000, len(x_0), device), draws.randn_like(x_0)
            with autocast(device, amp):
                loss = original_loss(trainer(x_0, t=t, noise=noise), draws.size(len(x_0)))
            backward(loss, scaler)
        optimizer_step(model, optimizer, scaler, 1.)
        ema.update(model)

    if device.type == "cuda":
        step()  # AdamW's moments allocated
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / GIB
    else:
        before = resident_gib()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / GIB
    else:
        peak = resident_gib()
    return {"peak_gib": peak, "above_gib": peak - before, "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--amp", default="bf16", choices=("none", "bf16"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"some of: {', '.join(ROWS)}")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, in its own process
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.row:
        batch, name = args.row.split(":", 1)
        grad_checkpoint, accumulate = ROWS[name]
        print(json.dumps(one_row(int(batch), grad_checkpoint, accumulate, args.amp, device)))
        return
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    memory = "peak allocated" if device.type == "cuda" else "peak resident set"
    print(f"torch {torch.__version__}, {machine}, amp {args.amp}: one training step of the 256x256 model\n")
    print(f"| global batch | options | {memory} (GiB) | above the set-up (GiB) | s per step |")
    print("| --- | --- | --- | --- | --- |")
    for batch in map(int, args.batches.split(",")):
        for name in args.rows.split(","):
            if name.startswith("accumulate") and batch == 1:
                continue  # accumulate 1 is plain
            run = subprocess.run([sys.executable, __file__, "--device", args.device, "--amp", args.amp,
                                  "--row", f"{batch}:{name}"], capture_output=True, text=True)
            if run.returncode:
                print(f"| {batch} | {name} | failed: {run.stderr.strip().splitlines()[-1]} | | |", flush=True)
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            label = name.replace("accumulate", f"accumulate {batch} (micro-batch 1)")
            print(f"| {batch} | {label} | {row['peak_gib']:.2f} | {row['above_gib']:.2f} | {row['seconds']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
