"""The options that trade time for memory when training a large model (docs/finetune.md):

- grad_checkpoint: activation checkpointing (torch.utils.checkpoint). Each ResBlock, its attention
  included, keeps only its inputs in the forward pass and runs again in the backward pass; the
  gradients are the same (dropout's random numbers are replayed).
- accumulate: gradient accumulation. An optimizer step sums the gradients of `accumulate`
  micro-batches of batch_size images, in every process: the global batch is batch_size x
  accumulate x processes, and the step is the one of that batch taken at once, since the loss
  is reduced over the global batch (the original's sum / 1000, the guided model's sum / B^2)
  and its random numbers are drawn for the whole global batch (AccumulatedDraws). The run is
  saved only between steps, so that it continues exactly.
"""
import contextlib
import itertools
from functools import partial

from torch.utils.checkpoint import checkpoint

from Diffusion.Model import ResBlock
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Processes import GlobalBatchRandomness


def checkpoint_blocks(model):
    """Make every ResBlock of `model` (and of the conditional UNet) recompute its activations in
    the backward pass. Its forward is wrapped on the instance: the module names, hence the
    checkpoint's keys, stay the same. Call it after any copy of the model is made (the EMA's),
    which must not share these wrapped forwards."""
    for block in model.modules():
        if isinstance(block, ResBlock):
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    return model


def check_images_for_a_step(images, batch_size, accumulate, world_size, dataset):
    """Refuse, before training, a dataset of fewer `images` than one optimizer step takes."""
    if images < batch_size * accumulate * world_size:
        raise ConfigError(f"dataset {dataset!r} has {images} images, fewer than one optimizer step "
                          f"takes (batch_size {batch_size} x accumulate {accumulate} x {world_size} "
                          f"process(es)), so an epoch would take no step: lower accumulate or "
                          f"batch_size, or add images.")


def whole_steps(batches, accumulate):
    """The loader's `batches` in lists of `accumulate`, one list per optimizer step; micro-batches
    left over at the end of the epoch (fewer than accumulate) are dropped, as an incomplete batch is."""
    batches = iter(batches)
    while len(step := list(itertools.islice(batches, accumulate))) == accumulate:
        yield step


def gradient_sync(network, last):
    """DistributedDataParallel averages the gradients over the processes after the last micro-batch of
    a step only (no_sync before it); a single process has nothing to synchronise."""
    return contextlib.nullcontext() if last or not hasattr(network, "no_sync") else network.no_sync()


class AccumulatedDraws(GlobalBatchRandomness):
    """GlobalBatchRandomness for a global batch of `accumulate` micro-batches per process: each draw is
    made once per step, for all batch_size x accumulate x world_size images, and every micro-batch takes
    its images' share, so that image i of a step gets the same numbers whatever batch_size, accumulate
    and the number of processes. Process `rank` holds images rank, rank + world_size, ... of the step,
    micro-batch m the m-th accumulate-th of them. With accumulate 1 it draws exactly as its parent."""

    def __init__(self, generator=None, rank=0, world_size=1, accumulate=1):
        super().__init__(generator, rank, world_size)
        self.accumulate, self.micro_batch = accumulate, 0
        self._drawn, self._calls = [], 0

    def micro_batches(self, step):
        """The micro-batches of one optimizer step, each with whether it is the step's last."""
        for index, batch in enumerate(step):
            self.micro_batch, self._calls = index, 0
            if index == 0:
                self._drawn = []
            yield batch, index == len(step) - 1

    def size(self, local_size):
        """The images of the step's global batch, given this micro-batch's `local_size`."""
        return local_size * self.world_size * self.accumulate

    def _step_draw(self, draw):
        """The step's draw number `_calls`: made by draw() in the first micro-batch, kept for the others."""
        if self.micro_batch == 0:
            self._drawn.append(draw())
        drawn = self._drawn[self._calls]
        self._calls += 1
        return drawn

    def _share(self, draw, *arguments, **options):
        mine = self._step_draw(lambda: draw(*arguments, generator=self.generator, **options))[self.rank::self.world_size]
        local = len(mine) // self.accumulate
        return mine[self.micro_batch * local:(self.micro_batch + 1) * local]

    def rand_one(self, device):
        return self._step_draw(lambda: super(AccumulatedDraws, self).rand_one(device))
