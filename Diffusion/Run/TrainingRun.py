"""A training run's bookkeeping around Train.fit's steps: where it starts, the progress bar, the run log,
stop requests (SIGTERM, Ctrl-C), giving up a diverged run, each epoch's log line, sample grids and FIDs.

The run log, training_log.jsonl in the checkpoint folder, gets a JSON line every epoch and log_every steps:
    {"kind": "epoch", "epoch": 3, "step": 2500, "loss": 0.0312, "lr": 0.0002,
     "images_per_second": 412.0, "seconds": 1830.5, "ema_decay": 0.9999}
`loss`: the mean over all processes of the epoch or of the steps since the previous "step" line; `seconds`:
since this process started. With `tensorboard` installed, the same scalars and the sample grids (every
sample_every epochs, also PNGs in samples/) go to tensorboard/ (tensorboard --logdir CheckPoints/tensorboard).
"""
import json
import os
import signal
import time

import torch
from torchvision.utils import make_grid
from tqdm import tqdm

from Diffusion.Run.Checkpoints import (LOG, PREVIEWS, TENSORBOARD, TRAINING_STATE,
                                       check_trained_as_configured, is_snapshot_epoch, write_run_info)
from Diffusion.Run.Config import RunError
from Diffusion.Run.Memory import whole_steps
from Diffusion.Run.Processes import any_process, assert_identical_weights, sum_over_processes
from Diffusion.Run.Sampling import save_picture, to_unit_range
from Diffusion.Run.TrainingState import begin_or_continue

MAX_NON_FINITE_IN_A_ROW = 50  # skipped steps in a row after which training is given up
BAR_UPDATE_EVERY = 10  # steps between progress-bar updates (each one waits for the device)


class TrainingDiverged(RunError):
    """The loss stopped being finite, step after step."""


class TrainingStopped(Exception):
    """Stopped on request, the state saved (the message says how to continue); exit_status: 128 + signal."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.exit_status = 128 + signal_number


class StopRequests:
    """While entered, SIGTERM (a scheduler's pre-emption, `kill`) and SIGINT (Ctrl-C) set `.signal` (the first
    received) instead of killing the process; the training loop looks at it between steps. A second Ctrl-C
    stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal, self._previous = None, {}

    def _request(self, signal_number, frame):
        if self.signal == signal.SIGINT and signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.signal = self.signal or signal_number

    def __enter__(self):
        self._previous = {number: signal.signal(number, self._request) for number in self.SIGNALS}
        return self

    def __exit__(self, *exception):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class TrainingRun:
    """The bookkeeping of `state` (a TrainingState) in checkpoint folder `folder`, with stop requests `stop`
    (StopRequests), for `epochs` epochs: the state is due every save_state_minutes, a log line every log_every
    steps, a grid of samples every sample_every epochs and an FID of the EMA weights every fid_every.
    preview(model) -> (images [N, C, H, W], images per row) and fid(model) -> a number draw those."""

    def __init__(self, state, folder, stop, epochs, save_state_minutes, log_every, sample_every,
                 fid_every, preview, fid):
        self.state, self.process, self.folder, self.stop = state, state.process, folder, stop
        self.epochs, self.save_state_seconds = epochs, 60 * save_state_minutes
        self.log_every, self.sample_every, self.fid_every = log_every, sample_every, fid_every
        self.preview, self.fid = preview, fid
        self.last_save, self.stop_asked = time.monotonic(), False
        self.log = self.progress = self.bar = None

    def start(self, training_load_weight, seed, overwrite, checkpoints_key, diffusion, classes, save_every,
              keep_last):
        """Begin a new run or continue the one training_load_weight names (keeping the beta_schedule,
        prediction, variance and loss it was trained with); record them, the class names and the snapshots' weights in run.json;
        say what the run will write. diffusion: {beta_schedule, prediction, variance, loss}; checkpoints_key:
        `folder`'s key."""
        if training_load_weight is not None:
            check_trained_as_configured(self.folder, diffusion, continuing=True)
        begin_or_continue(self.state, self.folder, checkpoints_key, training_load_weight, seed, overwrite)
        if self.process.is_main:
            write_run_info(self.folder, snapshot_weights="ema" if self.state.ema else "raw", **diffusion,
                           **({"classes": list(classes)} if classes else {}))
            tqdm.write(disk_plan(self.state, self.folder, self.epochs, save_every, keep_last,
                                 self.save_state_seconds / 60))
        self.log = RunLog(self.folder, self.process)

    def batches(self, loader, accumulate=1):
        """The loader's batches of the rest of the epoch in lists of `accumulate`, one list per optimizer
        step (Memory.whole_steps), under its progress bar."""
        if self.progress is None:
            self.progress = Progress(self.state, self.epochs, loader.sampler.num_samples // loader.batch_size // accumulate)
        with self.progress.bar(len(loader) // accumulate, self.state.epoch) as self.bar:
            yield from whole_steps(loader, accumulate)

    def after_step(self, loss, taken):
        """Count the step (loss: a device scalar; taken: False if skipped), log it, give up a diverged run."""
        state = self.state
        state.step_in_epoch += 1
        state.step += 1
        state.non_finite_in_a_row = 0 if taken else state.non_finite_in_a_row + 1
        state.skipped_steps += not taken
        self.progress.add(loss, self.bar, state.optimizer.param_groups[0]["lr"])
        if self.log_every and state.step % self.log_every == 0:
            self.log.write("step", **self.progress.record(state, "step"))
        if state.non_finite_in_a_row >= MAX_NON_FINITE_IN_A_ROW:
            self.bar.close()
            raise TrainingDiverged(
                f"the loss was not finite for {state.non_finite_in_a_row} steps in a row (epoch "
                f"{state.epoch}, step {state.step_in_epoch}): training diverged. Lower lr, or train "
                f"with amp none or bf16 (fp16's range is small); the weights of the last saved "
                f"state are untouched by the skipped steps.")

    def save_due(self):
        """Whether the training state is to be saved now: save_state_minutes have passed, or a stop was
        asked for (in any process). Every process must call this."""
        overdue = time.monotonic() - self.last_save >= self.save_state_seconds
        self.stop_asked, overdue = any_process([self.stop.signal is not None, overdue], self.process)
        if self.stop_asked or overdue:
            self.last_save = time.monotonic()
        return self.stop_asked or overdue

    def stop_if_asked(self):
        """After the state is saved, end the run with TrainingStopped (saying how to continue) if asked to."""
        if self.stop_asked:
            self.bar.close()
            by = signal.Signals(self.stop.signal).name if self.stop.signal else "another process's signal"
            raise TrainingStopped(f"stopped by {by} at epoch {self.state.epoch}, step "
                                  f"{self.state.step_in_epoch}; the training state is saved. Continue with "
                                  f"the same command and --training_load_weight last (checkpoint folder "
                                  f"{self.folder}).", self.stop.signal or signal.SIGTERM)

    def end_epoch(self, epoch):
        """After `epoch` is saved: its log line, with an FID of the EMA weights every fid_every
        epochs, and every sample_every epochs a grid of samples (samples/ and TensorBoard)."""
        record = {**self.progress.record(self.state, "epoch"), "epoch": epoch}
        if self.fid_every and (epoch + 1) % self.fid_every == 0 and self.process.is_main:
            record["fid"] = self.with_ema_weights(self.fid)
            tqdm.write(f"epoch {epoch}: FID {record['fid']:.2f} of the EMA weights")
        self.log.write("epoch", **record)
        if self.sample_every and (epoch + 1) % self.sample_every == 0 and self.process.is_main:
            images, per_row = self.with_ema_weights(self.preview)
            self.log.samples(images, epoch, self.state.step, per_row)

    def with_ema_weights(self, function):
        """function(model) with the EMA weights in eval mode, from the same noise every time (the seed's),
        without touching the training's random generators."""
        model = self.state.ema.module if self.state.ema else self.state.model
        device = self.process.device
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.state.seed)
            result = function(model)
        self.state.model.train()
        return result

    def finish(self):
        """Say so when there was nothing to train; check that the processes agree."""
        if self.state.epoch >= self.epochs and self.progress is None:
            tqdm.write(f"nothing to train: the run already has all {self.epochs} epochs; raise "
                       f"epoch to train longer (the cosine schedule then stretches to the new length)")
        assert_identical_weights(self.state.model, self.process)
        self.log.close()


def _amount(mb):
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def disk_plan(state, folder, epochs, save_every, keep_last, minutes):
    """One line: what the run of `state` writes into `folder` from its epoch to `epochs` (snapshots every
    save_every epochs, the newest keep_last kept; the state every `minutes`) and about the disk it takes."""
    weights_mb = sum(t.numel() * t.element_size() for t in state.model.state_dict().values()) / 2 ** 20
    state_mb = weights_mb * (3 + bool(state.ema))  # the weights, the EMA's, AdamW's 2 moments
    snapshots = [e for e in range(state.epoch, epochs) if is_snapshot_epoch(e, save_every, epochs)]
    kept = len(snapshots) if keep_last is None else min(len(snapshots), keep_last)
    shown = ", ".join(map(str, snapshots[:3])) + (f", ..., {snapshots[-1]}" if len(snapshots) > 3 else "")
    keeping = "all kept" if keep_last is None else f"the newest {keep_last} kept"
    return (f"this run writes into {folder}: ckpt_{{epoch}}_.pt after epoch {shown or 'none'} "
            f"({len(snapshots)} snapshot{'' if len(snapshots) == 1 else 's'} of {_amount(weights_mb)}, "
            f"{keeping}) and {TRAINING_STATE} ({_amount(state_mb)}) after every epoch and every "
            f"{minutes:g} minutes: about {_amount(kept * weights_mb + state_mb)} in all")


class RunLog:
    """training_log.jsonl and TensorBoard, written by the main process only (others' calls do nothing)."""

    def __init__(self, folder, process):
        self.folder, self.enabled, self.started = folder, process.is_main, time.monotonic()
        self.tensorboard = tensorboard_writer(folder) if self.enabled else None

    def write(self, kind, **record):
        """Append {"kind": kind, **record, "seconds": ...} and send its numbers to TensorBoard."""
        if not self.enabled:
            return
        record = {"kind": kind, **record, "seconds": round(time.monotonic() - self.started, 3)}
        with open(os.path.join(self.folder, LOG), "a") as log:
            log.write(json.dumps(record) + "\n")
        if self.tensorboard and "step" in record:
            for name, value in record.items():
                if isinstance(value, float) and name != "seconds":
                    self.tensorboard.add_scalar(f"{kind}/{name}", value, record["step"])

    def samples(self, images, epoch, step, nrow):
        """A grid of images [N, C, H, W] in [-1, 1]: samples/epoch_{epoch}.png, and TensorBoard."""
        if not self.enabled:
            return
        save_picture(images, os.path.join(self.folder, PREVIEWS, f"epoch_{epoch}.png"), nrow)
        if self.tensorboard:
            self.tensorboard.add_image("samples", make_grid(to_unit_range(images), nrow=nrow), step)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()


def tensorboard_writer(folder):
    """A SummaryWriter into folder/tensorboard, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(folder, TENSORBOARD))


class Progress:
    """Each epoch's progress bar (main process; with the whole run's ETA) and the numbers of the log's lines:
    the mean loss since the previous line and over the epoch, images per second."""

    def __init__(self, state, epochs, steps_per_epoch):
        self.process, self.steps_per_epoch, self.epochs = state.process, steps_per_epoch, epochs
        self.images_per_step = state.batch_size * state.process.world_size
        self.steps_left = (epochs - state.epoch) * steps_per_epoch - state.step_in_epoch
        self.started, self.steps_done = time.monotonic(), 0
        self.since_record, self.in_epoch = self._sums(), self._sums()

    def _sums(self):
        return {"loss": torch.zeros((), device=self.process.device), "steps": 0, "time": time.monotonic()}

    def bar(self, steps_left_in_epoch, epoch):
        self.in_epoch = self._sums()
        return tqdm(total=self.steps_per_epoch, initial=self.steps_per_epoch - steps_left_in_epoch,
                    desc=f"epoch {epoch}/{self.epochs - 1}", dynamic_ncols=True, disable=not self.process.is_main)

    def add(self, loss, bar, lr):
        """Count a step of loss `loss` (a device scalar); update the bar now and then."""
        self.steps_done += 1
        self.steps_left -= 1
        for sums in (self.since_record, self.in_epoch):
            sums["loss"] += loss
            sums["steps"] += 1
        bar.update()
        if self.steps_done % BAR_UPDATE_EVERY == 0 or bar.n == bar.total:
            seconds_per_step = (time.monotonic() - self.started) / self.steps_done
            bar.set_postfix(mean_loss=f"{self.in_epoch['loss'].item() / self.in_epoch['steps']:.4f}",
                            lr=f"{lr:.3g}", img_s=f"{self.images_per_step / seconds_per_step:.1f}",
                            eta=_duration(self.steps_left * seconds_per_step))

    def record(self, state, kind):
        """The numbers of a log line: over the steps since the last "step" line, or over the
        epoch for "epoch". Every process must call this (it sums the loss over them)."""
        sums = self.since_record if kind == "step" else self.in_epoch
        loss = sum_over_processes(sums["loss"], self.process).item() / max(sums["steps"], 1)
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
