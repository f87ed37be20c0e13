"""The run log: one JSON object per line, appended to training_log.jsonl in the checkpoint
folder, at the end of every epoch and every log_every steps:

    {"kind": "epoch", "epoch": 3, "step": 2500, "loss": 0.0312, "lr": 0.0002,
     "images_per_second": 412.0, "seconds": 1830.5, "ema_decay": 0.9999}

`loss` is the mean loss (over all processes) of the epoch, or of the log_every steps since the
previous "step" line (fewer in the first line after a run continues); `seconds` counts from the
start of this process. When `tensorboard` is installed (pip install tensorboard), the same
scalars go to TensorBoard event files in tensorboard/, with the sample grids drawn every
sample_every epochs (also written as PNGs into samples/):

    tensorboard --logdir CheckPoints/tensorboard
"""
import json
import os
import time

import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from Diffusion.Machinery.Processes import sum_over_processes
from Diffusion.Machinery.RunFolder import LOG, PREVIEWS, TENSORBOARD


def tensorboard_writer(folder):
    """A SummaryWriter into folder/tensorboard, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(folder, TENSORBOARD))


class RunLog:
    """Writes only in the main process; the others' calls do nothing."""

    def __init__(self, folder, processes):
        self.folder = folder
        self.enabled = processes.is_main
        self.started = time.monotonic()
        self.tensorboard = tensorboard_writer(folder) if self.enabled else None

    def seconds(self):
        return time.monotonic() - self.started

    def write(self, kind, **record):
        """Append {"kind": kind, **record, "seconds": ...} and send its numbers to TensorBoard."""
        if not self.enabled:
            return
        record = {"kind": kind, **record, "seconds": round(self.seconds(), 3)}
        with open(os.path.join(self.folder, LOG), "a") as log:
            log.write(json.dumps(record) + "\n")
        if self.tensorboard and "step" in record:
            for name, value in record.items():
                if isinstance(value, float) and name != "seconds":
                    self.tensorboard.add_scalar(f"{kind}/{name}", value, record["step"])

    def samples(self, images, epoch, step, nrow):
        """A grid of images [N, 3, H, W] in [-1, 1]: samples/epoch_{epoch}.png, and TensorBoard."""
        if not self.enabled:
            return
        grid = make_grid((images * 0.5 + 0.5).clamp(0., 1.), nrow=nrow)
        os.makedirs(os.path.join(self.folder, PREVIEWS), exist_ok=True)
        save_image(grid, os.path.join(self.folder, PREVIEWS, f"epoch_{epoch}.png"))
        if self.tensorboard:
            self.tensorboard.add_image("samples", grid, step)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()


class Progress:
    """The progress bar of each epoch (main process) and the numbers of the log's lines: the
    mean loss since the previous line and over the epoch, images per second, and the ETA of the
    whole run in the bar."""

    UPDATE_EVERY = 10  # steps between bar updates (each one waits for the device)

    def __init__(self, state, epochs, steps_per_epoch):
        self.processes = state.processes
        self.images_per_step = state.batch_size * state.processes.world_size
        self.steps_left = (epochs - state.epoch) * steps_per_epoch - state.step_in_epoch
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.started = time.monotonic()
        self.steps_done = 0
        self.since_record = self._sums()
        self.in_epoch = self._sums()

    def _sums(self):
        return {"loss": torch.zeros((), device=self.processes.device), "steps": 0, "time": time.monotonic()}

    def bar(self, steps_left_in_epoch, epoch):
        done = self.steps_per_epoch - steps_left_in_epoch
        self.in_epoch = self._sums()
        return tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch}/{self.epochs - 1}",
                    dynamic_ncols=True, disable=not self.processes.is_main)

    def add(self, loss, bar, lr):
        """Count a step of loss `loss` (a device scalar); update the bar now and then."""
        self.steps_done += 1
        self.steps_left -= 1
        for sums in (self.since_record, self.in_epoch):
            sums["loss"] += loss
            sums["steps"] += 1
        bar.update()
        if self.steps_done % self.UPDATE_EVERY == 0 or bar.n == bar.total:
            seconds_per_step = (time.monotonic() - self.started) / self.steps_done
            bar.set_postfix(mean_loss=f"{self.in_epoch['loss'].item() / self.in_epoch['steps']:.4f}",
                            lr=f"{lr:.3g}", img_s=f"{self.images_per_step / seconds_per_step:.1f}",
                            eta=_duration(self.steps_left * seconds_per_step))

    def record(self, state, kind):
        """The numbers of a log line: over the steps since the last "step" line, or over the
        epoch for "epoch". Every process must call this (it sums the loss over them)."""
        sums = self.since_record if kind == "step" else self.in_epoch
        steps = max(sums["steps"], 1)
        loss = sum_over_processes(sums["loss"], self.processes).item() / steps
        seconds = time.monotonic() - sums["time"]
        if kind == "step":
            self.since_record = self._sums()
        return {"epoch": state.epoch, "step": state.step, "loss": loss,
                "lr": state.optimizer.param_groups[0]["lr"],
                "images_per_second": round(sums["steps"] * self.images_per_step / max(seconds, 1e-9), 2),
                "ema_decay": state.ema.decay if state.ema else 0., "skipped_steps": state.skipped_steps}


def _duration(seconds):
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
