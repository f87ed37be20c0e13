"""The random numbers of training, arranged so that a run can be stopped and continued to the
same result, and so that N processes train like one process with an N times larger batch.

Two kinds of randomness:
- Per image (the flip, the timestep t, the noise eps, the dropped label): drawn by
  `GlobalBatchRandomness` from one generator seeded alike in every process, for the images of
  all processes together; each process keeps its share. Image i of a global batch gets the same numbers whatever the
  number of processes.
- Inside the network (dropout): each process's own torch generators, seeded with seed + rank.

`rng_states` / `restore_rng_states` capture and restore every generator (torch, CUDA, numpy,
python and the batch generator) for the training state.
"""
import random

import numpy as np
import torch


class GlobalBatchRandomness:
    """The random numbers of the images of a global batch, the batch of all `world_size`
    processes together. This process holds its images rank, rank + world_size, ... (as
    DistributedSampler deals them out); every draw is made for the whole global batch from
    `generator` and this process keeps its positions.

    With the defaults (no generator, one process) the draws come from torch's global generator.
    """

    def __init__(self, generator=None, rank=0, world_size=1):
        self.generator = generator
        self.rank = rank
        self.world_size = world_size

    def size(self, local_size):
        """The number of images in the global batch, given this process's `local_size`."""
        return local_size * self.world_size

    def _share(self, values):
        return values[self.rank::self.world_size]

    def rand(self, local_size, device):
        """u ~ Uniform[0, 1) for each of this process's images: [local_size]."""
        return self._share(torch.rand(self.size(local_size), generator=self.generator, device=device))

    def randint(self, high, local_size, device):
        """t ~ Uniform{0, ..., high - 1} for each of this process's images: [local_size]."""
        return self._share(torch.randint(high, (self.size(local_size),), generator=self.generator,
                                         device=device))

    def randn_like(self, x):
        """eps ~ N(0, I) shaped like x [local_size, ...]."""
        shape = (self.size(x.shape[0]), *x.shape[1:])
        return self._share(torch.randn(shape, generator=self.generator, device=x.device, dtype=x.dtype))

    def rand_one(self, device):
        """One u ~ Uniform[0, 1) shared by the whole global batch: a scalar tensor."""
        return torch.rand((), generator=self.generator, device=device)


def flip_left_right_at_random(images, randomness):
    """Each image [B, C, H, W] mirrored left-right with probability 1/2 (the original's
    RandomHorizontalFlip, drawn here so that a continued run sees the same flips)."""
    flip = randomness.rand(images.shape[0], images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def seed_process(seed, rank):
    """Seed this process's own generators (torch on every device, numpy, python): seed + rank."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    random.seed(seed + rank)


def batch_generator(seed, device):
    """The generator of GlobalBatchRandomness on `device`, the same in every process."""
    return torch.Generator(device).manual_seed(seed)


def rng_states(device, generator):
    """Every generator's state, as tensors and numbers (torch.load(weights_only=True) reads it)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
              "python": random.getstate(),
              "batch": generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states, device, generator):
    """Put back what rng_states captured."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    random.setstate(states["python"])
    generator.set_state(states["batch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
