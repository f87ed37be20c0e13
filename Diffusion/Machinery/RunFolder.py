"""What a training run keeps in its checkpoint folder, and how much disk that takes:

    ckpt_{epoch}_.pt     weight snapshots, every save_every epochs and after the last epoch, the
                         newest keep_last of them kept: plain state_dicts, the original's format
                         (the EMA weights when EMA is on: those are what one samples from)
    training_state.pt    everything needed to continue the run (TrainingState.py), replaced in place
    run.json             what eval needs to know of the run (which weights the snapshots hold, the
                         class names)
    training_log.jsonl   the run log (RunLog.py); tensorboard/ and samples/ beside it
"""
import os
import shutil

from tqdm import tqdm

from Diffusion.Machinery.Checkpoint import (
    RUN_INFO,
    TRAINING_STATE,
    checkpoint_name,
    list_checkpoints,
    save_atomically,
)
from Diffusion.Machinery.Processes import wait_for_all

LOG = "training_log.jsonl"
TENSORBOARD = "tensorboard"
PREVIEWS = "samples"


def is_snapshot_epoch(epoch, save_every, epochs):
    """Whether a weight snapshot is written after `epoch` (0-based) of a run of `epochs`."""
    return (epoch + 1) % save_every == 0 or epoch == epochs - 1


def save_snapshot(weights, folder, epoch, keep_last):
    """ckpt_{epoch}_.pt, then the oldest snapshots beyond the newest keep_last removed."""
    save_atomically(weights, os.path.join(folder, checkpoint_name(epoch)))
    if keep_last is not None:
        for name in list_checkpoints(folder)[:-keep_last]:
            os.remove(os.path.join(folder, name))


def run_files(folder):
    """The files and folders of a run in `folder` (none: no run there)."""
    if not os.path.isdir(folder):
        return []
    names = list_checkpoints(folder) + [TRAINING_STATE, RUN_INFO, LOG, TENSORBOARD, PREVIEWS]
    return [name for name in names if os.path.exists(os.path.join(folder, name))]


def describe_run(folder):
    """A few words on the run `folder` holds ("" when it holds none)."""
    snapshots = list_checkpoints(folder)
    parts = []
    if snapshots:
        parts.append(snapshots[0] if len(snapshots) == 1 else f"{snapshots[0]} .. {snapshots[-1]}")
    if os.path.isfile(os.path.join(folder, TRAINING_STATE)):
        parts.append(TRAINING_STATE)
    return ", ".join(parts)


def clear_run(folder, processes):
    """Delete the run in `folder` (rank 0), once every process has looked at the folder."""
    wait_for_all(processes)
    if processes.is_main:
        files = run_files(folder)
        for name in files:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        tqdm.write(f"deleted the previous run's files in {folder}: {', '.join(files)}")
    wait_for_all(processes)


def megabytes(state_dict):
    return sum(t.numel() * t.element_size() for t in state_dict.values()) / 2 ** 20


def _amount(mb):
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def disk_plan(folder, first_epoch, epochs, save_every, keep_last, minutes, weights_mb, state_mb):
    """One line: what a run from `first_epoch` to `epochs` will write into `folder` (snapshots
    every save_every epochs, the newest keep_last kept; the training state every `minutes`) and
    about how much disk it takes."""
    snapshots = [e for e in range(first_epoch, epochs) if is_snapshot_epoch(e, save_every, epochs)]
    kept = len(snapshots) if keep_last is None else min(len(snapshots), keep_last)
    shown = ", ".join(map(str, snapshots[:3])) + (f", ..., {snapshots[-1]}" if len(snapshots) > 3 else "")
    keeping = "all kept" if keep_last is None else f"the newest {keep_last} kept"
    return (f"this run writes into {folder}: ckpt_{{epoch}}_.pt after epoch {shown or 'none'} "
            f"({len(snapshots)} snapshot{'' if len(snapshots) == 1 else 's'} of {_amount(weights_mb)}, {keeping}) "
            f"and {TRAINING_STATE} "
            f"({_amount(state_mb)}) after every epoch and every {minutes:g} minutes: about "
            f"{_amount(kept * weights_mb + state_mb)} in all")
