"""Several processes, started by torchrun: one process per GPU (NCCL), or several CPU processes
(gloo). Training uses DistributedDataParallel: `batch_size` is per process; the loss is that of
the global batch, so N processes train as one process with an N times larger batch. Exporting
samples gives each process its share of the batches (Export.py).

On one process (plain `python Main.py`) every helper here is the identity, so the recipe reads
the same either way.
"""
import itertools
import os
import random
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from Diffusion.Machinery.Errors import ProcessLost


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes, and its device."""
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

    def on_its_device(self, config):
        """config with this process's device (cuda:LOCAL_RANK under torchrun on GPUs)."""
        return {**config, "device": str(self.device)}


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


@contextmanager
def torchrun_processes(device, if_lost=""):
    """Join torchrun's process group (NCCL on CUDA, with the GPU of LOCAL_RANK; gloo on CPU)
    for the duration; a plain run is one process on `device` (a torch device or its name).
    When another process stops (killed, out of memory, its machine lost), this one's next
    collective fails: that ends the run with ProcessLost, which names the lost process and
    adds `if_lost` (where the work is kept and how to continue)."""
    device = torch.device(device)
    if not launched_by_torchrun():
        yield Processes(device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    processes = Processes(device, dist.get_rank(), dist.get_world_size())
    identities = gather((socket.gethostname(), os.getpid()), processes)
    previous_handler = outlive_the_closing_signal(identities, processes)
    lost = False
    try:
        yield processes
    except RuntimeError as error:  # torch.distributed's errors (DistBackendError, ...) included
        if not is_a_lost_peer(error):
            raise
        lost = True
        raise ProcessLost(f"{lost_processes(identities, processes)} stopped, so process "
                          f"{processes.rank} stops too{if_lost}.") from None
    finally:
        if not lost:  # a lost process's SIGTERM stays ignored: the sentence above must get out
            signal.signal(signal.SIGTERM, previous_handler)
        dist.destroy_process_group()


def outlive_the_closing_signal(identities, processes):
    """When one process stops, torchrun's agent sends SIGTERM to the others, which would end
    this one before its next collective fails and says which process was lost: from now on that
    SIGTERM is ignored while a process of this machine is gone (the agent's SIGKILL follows
    30 s later). Any other SIGTERM does what it did before. Returns the handler replaced."""
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(number, frame):
        if not gone_here(identities, processes):
            signal.signal(signal.SIGTERM, previous_handler)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    return previous_handler


def is_a_lost_peer(error):
    """Whether a collective failed because another process is gone (gloo: the connection was
    reset or closed; NCCL: the communicator was aborted or timed out)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        sign in text for sign in ("Connection reset", "Connection closed", "NCCL", "gloo"))


def gone_here(identities, processes):
    """The other processes of this machine that are no longer running (by their pids), as
    (rank, pid) pairs."""
    here = socket.gethostname()
    return [(rank, pid) for rank, (host, pid) in enumerate(identities)
            if rank != processes.rank and host == here and not is_running(pid)]


def lost_processes(identities, processes, wait_seconds=2.):
    """The processes of this machine that are no longer running, as words: "process 1 of 2
    (pid 1234)"; "another of the N processes" when none of them is (it ran on another machine).
    A killed process closes its connections a moment before it ends: it is waited for up to
    `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    while not (gone := gone_here(identities, processes)) and time.monotonic() < deadline:
        time.sleep(0.05)
    lost = [f"process {rank} of {processes.world_size} (pid {pid})" for rank, pid in gone]
    return ", ".join(lost) or f"another of the {processes.world_size} processes"


def is_running(pid):
    """Whether process `pid` runs: on Linux, a process that has ended but is not yet reaped (a
    zombie) does not; elsewhere, whether it can be signalled."""
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


def for_training(model, processes):
    """`model` wrapped in DistributedDataParallel, which averages the gradients of the
    processes in backward (and starts them all from rank 0's weights)."""
    if not processes.distributed:
        return model
    device_ids = [processes.device] if processes.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def common_seed(seed, processes):
    """`seed`, or when it is None a random one drawn by rank 0, the same in every process."""
    chosen = [seed if seed is not None else random.SystemRandom().randrange(2 ** 31)]
    if processes.distributed:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def gather(value, processes):
    """[value of rank 0, value of rank 1, ...] in every process."""
    if not processes.distributed:
        return [value]
    values = [None] * processes.world_size
    dist.all_gather_object(values, value)
    return values


def wait_for_all(processes):
    """A barrier: return when every process has come here."""
    if processes.distributed:
        dist.barrier()


def sum_over_processes(tensor, processes):
    """The sum of `tensor` over the processes (a new tensor)."""
    total = tensor.detach().clone()
    if processes.distributed:
        dist.all_reduce(total)
    return total


def any_process(flags, processes):
    """Flags [N] of booleans: each True if it is True in any process."""
    if not processes.distributed:
        return [bool(flag) for flag in flags]
    flags = torch.tensor(flags, dtype=torch.int32, device=processes.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(flag) for flag in flags.tolist()]


def assert_identical_weights(model, processes):
    """Raise if any process's weights differ from rank 0's (a desynchronised run)."""
    if not processes.distributed:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().flatten().float() for p in model.state_dict().values()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        differs = any_process([bool((flat != reference).any())], processes)[0]
    if differs:
        raise RuntimeError("the training processes ended with different weights")
    if processes.is_main:
        tqdm.write(f"the {processes.world_size} training processes end with identical weights")


class EpochSampler(DistributedSampler):
    """The data order: epoch e is a random permutation seeded by seed + e, of which this process
    takes every world_size-th image (DistributedSampler); `start_epoch` can begin `skip` images
    into it, where a stopped run left off."""

    def __init__(self, dataset, processes, seed):
        super().__init__(dataset, num_replicas=processes.world_size, rank=processes.rank,
                         shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def start_epoch(self, epoch, skip=0):
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip
