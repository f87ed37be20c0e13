"""Several processes, started by torchrun (one per GPU with NCCL, or several on CPU with gloo), their
random numbers, and how each runs the network (the speed options); on one process (plain `python
Main.py`) every helper here is the identity. Training uses DistributedDataParallel, `batch_size` per
process and the loss of the global batch: N processes train as one with an N times larger batch.

The random numbers of training let a stopped run continue to the same result and N processes train
like one: those per image (the flip, the timestep t, the noise eps, the dropped label) come from
`GlobalBatchRandomness`, those inside the network (dropout) from each process's own generators, seeded
with seed + rank; `rng_states` and `restore_rng_states` capture and restore them all.

The speed options change no checkpoint (a model trained with any loads and samples with none): `amp`
autocasts the network to bfloat16 or float16 (the weights, the optimizer and the diffusion arithmetic
stay float32; float16 scales the loss with a GradScaler so that small gradients do not underflow),
`compile` torch.compiles it, `channels_last` gives it the NHWC memory format, which GPUs prefer.
"""
import os
import random
import signal
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from Diffusion.Run.Config import RunError


class ProcessLost(RunError):
    """Another process of a torchrun run stopped; this one stops too."""


@dataclass(frozen=True)
class Process:
    """This process: its device, its rank among the processes and their number."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        """Rank 0 alone writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1 or dist.is_initialized()

    def say(self, message):
        """Write `message` (a line of the run's progress) from the main process only."""
        if self.is_main:
            tqdm.write(message)


@contextmanager
def torchrun_group(device, if_lost=""):
    """Join torchrun's process group (NCCL on CUDA, with the GPU of LOCAL_RANK; gloo on CPU) for the
    duration; a plain run is one process on `device` (a torch device or its name). When another
    process stops (killed, out of memory, its machine lost), this one's next collective fails: the run
    ends with ProcessLost, naming the lost process and adding `if_lost` (where the work is kept)."""
    device = torch.device(device)
    if not all(variable in os.environ for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):  # no torchrun
        yield Process(device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    process = Process(device, dist.get_rank(), dist.get_world_size())
    identities = gather((socket.gethostname(), os.getpid()), process)
    previous_handler = outlive_the_closing_signal(identities, process)
    lost = False
    try:
        yield process
    except RuntimeError as error:  # torch.distributed's errors (DistBackendError, ...) included
        if not is_a_lost_peer(error):
            raise
        lost = True
        raise ProcessLost(f"{lost_processes(identities, process)} stopped, so process "
                          f"{process.rank} stops too{if_lost}.") from None
    finally:
        if not lost:  # a lost process's SIGTERM stays ignored: the sentence above must get out
            signal.signal(signal.SIGTERM, previous_handler)
        dist.destroy_process_group()


def outlive_the_closing_signal(identities, process):
    """torchrun's agent SIGTERMs the other processes when one stops, which would end this one before its
    next collective fails and names the lost one: from now on SIGTERM is ignored while a process of
    this machine is gone (SIGKILL follows 30 s later); any other does as before. Returns the old handler."""
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(number, frame):
        if not gone_here(identities, process):
            signal.signal(signal.SIGTERM, previous_handler)
            signal.raise_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_sigterm)
    return previous_handler


def is_a_lost_peer(error):
    """Whether a collective failed because another process is gone (gloo: the connection was
    reset or closed; NCCL: the communicator was aborted or timed out)."""
    return isinstance(error, dist.DistError) or any(
        sign in str(error) for sign in ("Connection reset", "Connection closed", "NCCL", "gloo"))


def gone_here(identities, process):
    """The other processes of this machine no longer running (by their pids), as (rank, pid) pairs."""
    return [(rank, pid) for rank, (host, pid) in enumerate(identities)
            if rank != process.rank and host == socket.gethostname() and not is_running(pid)]


def lost_processes(identities, process, wait_seconds=2.):
    """The processes of this machine no longer running, as words: "process 1 of 2 (pid 1234)";
    "another of the N processes" when none is (it ran on another machine). A killed process closes
    its connections a moment before it ends: it is waited for up to `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    while not (gone := gone_here(identities, process)) and time.monotonic() < deadline:
        time.sleep(0.05)
    lost = [f"process {rank} of {process.world_size} (pid {pid})" for rank, pid in gone]
    return ", ".join(lost) or f"another of the {process.world_size} processes"


def is_running(pid):
    """Whether process `pid` runs (on Linux a zombie does not; elsewhere: whether it can be signalled)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def data_parallel(model, process):
    """`model` in DistributedDataParallel under torchrun (gradients averaged, from rank 0's weights)."""
    device_ids = [process.device] if process.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids) if process.distributed else model


def common_seed(seed, process):
    """`seed`, or when it is None a random one drawn by rank 0, the same in every process."""
    chosen = [seed if seed is not None else random.SystemRandom().randrange(2 ** 31)]
    if process.distributed:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def gather(value, process):
    """[value of rank 0, value of rank 1, ...] in every process."""
    if not process.distributed:
        return [value]
    values = [None] * process.world_size
    dist.all_gather_object(values, value)
    return values


def in_global_order(values, process):
    """Each process's values of its images [local_size], all processes' in the global batch's order
    [global_size] (image i of rank r at i * world_size + r, as GlobalBatchRandomness deals them)."""
    if not process.distributed:
        return values
    parts = [torch.empty_like(values) for _ in range(process.world_size)]
    dist.all_gather(parts, values.contiguous())
    return torch.stack(parts, 1).flatten()


def record_terms(timesteps, terms, process):
    """Give the sampler of t (Likelihood.py) the terms of a step, [(t [local_size], each image's term
    [local_size])] per micro-batch, every process's in the global batch's order, when it learns from them."""
    if timesteps.learns_from_terms:
        for t, term in terms:
            timesteps.record(in_global_order(t, process), in_global_order(term, process))


def wait_for_all(process):
    """A barrier: return when every process has come here."""
    if process.distributed:
        dist.barrier()


def sum_over_processes(tensor, process):
    """The sum of `tensor` over the processes (a new tensor)."""
    total = tensor.detach().clone()
    if process.distributed:
        dist.all_reduce(total)
    return total


def any_process(flags, process):
    """Flags [N] of booleans: each True if it is True in any process."""
    if process.distributed:
        flags = torch.tensor(flags, dtype=torch.int32, device=process.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.tolist()
    return [bool(flag) for flag in flags]


def assert_identical_weights(model, process):
    """Raise if any process's weights differ from rank 0's (a desynchronised run)."""
    if not process.distributed:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().flatten().float() for p in model.state_dict().values()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        differs = any_process([bool((flat != reference).any())], process)[0]
    if differs:
        raise RuntimeError("the training processes ended with different weights")
    process.say(f"the {process.world_size} training processes end with identical weights")


# --- the speed options -----------------------------------------------------------------------

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, amp):
    """The autocast context of amp ("bf16", "fp16") on `device`; nothing for "none"."""
    return nullcontext() if AMP_DTYPES[amp] is None else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def compiled(network, compile, announce=True):
    """torch.compile(network) if `compile`, else `network` itself."""
    if compile and announce:
        tqdm.write("compile: the first steps are slow while torch.compile builds the kernels")
    return torch.compile(network) if compile else network


# --- the random numbers ----------------------------------------------------------------------


class GlobalBatchRandomness:
    """The random numbers of the images of a global batch, that of all `world_size` processes together.
    This process holds images rank, rank + world_size, ... (as DistributedSampler deals them out); every
    draw is made for the whole global batch from `generator` (default: torch's global one), seeded alike
    in every process, and this process keeps its positions: image i of a global batch gets the same
    numbers whatever the number of processes."""

    def __init__(self, generator=None, rank=0, world_size=1):
        self.generator, self.rank, self.world_size = generator, rank, world_size

    def size(self, local_size):
        """The number of images in the global batch, given this process's `local_size`."""
        return local_size * self.world_size

    def _share(self, draw, *arguments, **options):
        """This process's positions of draw(*arguments, **options) from `generator` for the global batch."""
        return draw(*arguments, generator=self.generator, **options)[self.rank::self.world_size]

    def rand(self, local_size, device):
        """u ~ Uniform[0, 1) for each of this process's images: [local_size]."""
        return self._share(torch.rand, self.size(local_size), device=device)

    def randint(self, high, local_size, device):
        """t ~ Uniform{0, ..., high - 1} for each of this process's images: [local_size]."""
        return self._share(torch.randint, high, (self.size(local_size),), device=device)

    def randn_like(self, x):
        """eps ~ N(0, I) shaped like x [local_size, ...]."""
        return self._share(torch.randn, (self.size(x.shape[0]), *x.shape[1:]), device=x.device, dtype=x.dtype)

    def multinomial(self, probabilities, local_size, device):
        """t ~ `probabilities` [T] (with replacement) for each of this process's images: [local_size]."""
        on_generator = probabilities.to(self.generator.device if self.generator is not None else "cpu")
        return self._share(torch.multinomial, on_generator, self.size(local_size), replacement=True).to(device)

    def rand_one(self, device):
        """One u ~ Uniform[0, 1) shared by the whole global batch: a scalar tensor."""
        return torch.rand((), generator=self.generator, device=device)


SINGLE_PROCESS = GlobalBatchRandomness()  # draws from torch's global generator


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
              "python": random.getstate(), "batch": generator.get_state()}
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
