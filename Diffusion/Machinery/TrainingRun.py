"""A training run's bookkeeping around the recipe's steps (Train.fit): where the run starts, the
progress bar and the run log, the training state saved every save_state_minutes and when a stop
is asked for (SIGTERM, Ctrl-C), a run that diverged given up, and at the end of each epoch the
weight snapshot, the training state, a log line and now and then a grid of samples and an FID.
"""
import signal
import time

import torch
from tqdm import tqdm

from Diffusion.Machinery.Checkpoint import check_trained_as_configured, write_run_info
from Diffusion.Machinery.Errors import TrainingDiverged
from Diffusion.Machinery.Interrupt import TrainingStopped
from Diffusion.Machinery.Processes import any_process, assert_identical_weights
from Diffusion.Machinery.RunFolder import disk_plan, is_snapshot_epoch, megabytes, save_snapshot
from Diffusion.Machinery.RunLog import Progress, RunLog
from Diffusion.Machinery.TrainingState import start

MAX_NON_FINITE_IN_A_ROW = 50  # skipped steps in a row after which training is given up


class TrainingRun:
    """The bookkeeping of `state` (a TrainingState) in the checkpoint folder `folder`, whose
    config key is `folder_key`; `stop` holds the stop requests (Interrupt.StopRequests). A run
    of `epochs` epochs writes a snapshot every `save_every` epochs (the newest `keep_last` kept),
    the training state every `save_state_minutes`, a log line every `log_every` steps and a grid
    of samples every `sample_every` epochs and an FID of the EMA weights every `fid_every`."""

    def __init__(self, state, folder, folder_key, stop, epochs, save_every, keep_last,
                 save_state_minutes, log_every, sample_every, fid_every):
        self.state, self.folder, self.folder_key, self.stop = state, folder, folder_key, stop
        self.epochs, self.save_every, self.keep_last = epochs, save_every, keep_last
        self.save_state_seconds = 60 * save_state_minutes
        self.log_every, self.sample_every, self.fid_every = log_every, sample_every, fid_every
        self.processes = state.processes
        self.log = self.progress = self.preview = self.fid = self.bar = None
        self.last_save = time.monotonic()

    def start(self, training_load_weight, seed, overwrite, diffusion, classes, preview, fid):
        """Begin or continue the run (TrainingState.start; a continued run keeps the
        beta_schedule and prediction it was trained with), record them, the class names and the
        weights the snapshots hold in run.json, and say what the run will write. diffusion:
        {beta_schedule, prediction}; preview(model) -> (images [N, C, H, W], images per row):
        the samples drawn every sample_every epochs; fid(model) -> the FID every fid_every."""
        state = self.state
        if training_load_weight is not None:
            check_trained_as_configured(self.folder, diffusion)
        start(state, self.folder, self.folder_key, training_load_weight, seed, overwrite)
        if self.processes.is_main:
            write_run_info(self.folder, snapshot_weights="ema" if state.ema else "raw", **diffusion,
                           **({"classes": list(classes)} if classes else {}))
            weights_mb = megabytes(state.model.state_dict())  # the state: weights, EMA, AdamW's 2 moments
            tqdm.write(disk_plan(self.folder, state.epoch, self.epochs, self.save_every, self.keep_last,
                                 self.save_state_seconds / 60, weights_mb, weights_mb * (3 + bool(state.ema))))
        self.log = RunLog(self.folder, self.processes)
        self.preview, self.fid = preview, fid

    def batches(self, loader):
        """The loader's batches of the rest of the epoch, under its progress bar."""
        if self.progress is None:
            self.progress = Progress(self.state, self.epochs, loader.sampler.num_samples // loader.batch_size)
        with self.progress.bar(len(loader), self.state.epoch) as self.bar:
            yield from loader

    def after_step(self, loss, taken):
        """Count the step (loss: a device scalar; taken: False for a skipped step), log it, give
        up on a diverged run, and save the training state when it is due or a stop is asked for
        (then TrainingStopped is raised)."""
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
        save_due = time.monotonic() - self.last_save >= self.save_state_seconds
        stop_now, save_now = any_process([self.stop.signal is not None, save_due], self.processes)
        if save_now or stop_now:
            state.save(self.folder)
            self.last_save = time.monotonic()
        if stop_now:
            self.bar.close()
            raise TrainingStopped(self.stopped_message(), self.stop.signal or signal.SIGTERM)

    def stopped_message(self):
        by = self.stop.name if self.stop.signal else "another process's signal"
        return (f"stopped by {by} at epoch {self.state.epoch}, step {self.state.step_in_epoch}; the "
                f"training state is saved. Continue with the same command and "
                f"--training_load_weight last (checkpoint folder {self.folder}).")

    def end_epoch(self):
        """After the epoch's LR step: the snapshot, the training state, every fid_every epochs
        an FID (in the log line), the log line and, every sample_every epochs, a grid of
        samples (samples/ and TensorBoard)."""
        state, epoch = self.state, self.state.epoch
        record = self.progress.record(state, "epoch")
        state.next_epoch()
        if self.processes.is_main and is_snapshot_epoch(epoch, self.save_every, self.epochs):
            weights = state.ema.module if state.ema else state.model
            save_snapshot(weights.state_dict(), self.folder, epoch, self.keep_last)
        state.save(self.folder)
        if self.fid_every and (epoch + 1) % self.fid_every == 0 and self.processes.is_main:
            record["fid"] = self.with_ema_weights(self.fid)
            tqdm.write(f"epoch {epoch}: FID {record['fid']:.2f} of the EMA weights")
        self.log.write("epoch", **record)
        if self.sample_every and (epoch + 1) % self.sample_every == 0 and self.processes.is_main:
            images, per_row = self.with_ema_weights(self.preview)
            self.log.samples(images, epoch, state.step, per_row)

    def with_ema_weights(self, function):
        """function(model) with the EMA weights in eval mode, from the same noise every time (the
        seed's), without touching the training's random generators."""
        model = self.state.ema.module if self.state.ema else self.state.model
        device = self.processes.device
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
        assert_identical_weights(self.state.model, self.processes)
        self.log.close()
