"""Many samples as single PNG files (for FID): `num_samples` images drawn in batches of
`batch_size`, continuing where an earlier, interrupted export stopped.

Image k is `{k:06d}.png`. Batch b holds images b*batch_size .. (b+1)*batch_size - 1 and draws
its noise from a seed made of (seed, b): a batch is the same whether it is drawn in the first
run or after an interruption, and only batches with a missing file are drawn again. Under
torchrun, process r of N draws batches r, r + N, r + 2N, ...: the same images, N times faster.
"""
import os

import torch
from tqdm import tqdm

from Diffusion.Machinery.Processes import common_seed, wait_for_all
from Diffusion.Machinery.Images import save_png_atomically


def sample_file(folder, index):
    return os.path.join(folder, f"{index:06d}.png")


def batch_seed(seed, batch):
    """The seed of batch `batch` of an export seeded by `seed`: distinct for every pair."""
    return hash((seed, batch)) % 2 ** 63


def export_samples(draw, folder, num_samples, batch_size, processes, seed=None, description="export"):
    """Write images 0 .. num_samples - 1 that are not yet in `folder`; draw(first, count) ->
    images [count, 3, H, W] in [-1, 1] for indices first .. first + count - 1 (the conditional
    model picks each index's class from it). A progress bar counts the images, with an ETA.
    processes (Processes.Processes): each draws its share of the batches, and all return
    together. seed None: a new random export. Returns how many images this process wrote."""
    rank, world_size = processes.rank, processes.world_size
    os.makedirs(folder, exist_ok=True)
    seed = common_seed(seed, processes)  # the same in every process
    batches = [range(first, min(first + batch_size, num_samples))
               for first in range(0, num_samples, batch_size)]
    missing = {index for index in range(num_samples) if not os.path.exists(sample_file(folder, index))}
    if missing != set(range(num_samples)) and rank == 0:
        tqdm.write(f"{folder} already holds {num_samples - len(missing)} of the {num_samples} "
                   f"samples: continuing with the {len(missing)} missing")
    mine = [(batch, indices) for batch, indices in enumerate(batches) if batch % world_size == rank]
    share = sum(len(indices) for _, indices in mine)
    to_draw = sum(len(missing.intersection(indices)) for _, indices in mine)
    of_share = f" (process 0's share: 1/{world_size})" if world_size > 1 else ""
    written = 0
    with tqdm(total=share, initial=share - to_draw, desc=description + of_share, unit="img",
              dynamic_ncols=True, disable=rank != 0) as bar:
        for batch, indices in mine:
            if missing.isdisjoint(indices):
                continue
            torch.manual_seed(batch_seed(seed, batch))
            images = draw(indices.start, len(indices)).cpu()
            for index, image in zip(indices, images):
                if index in missing:
                    save_png_atomically(image, sample_file(folder, index))
                    written += 1
                    bar.update()
    wait_for_all(processes)
    return written
