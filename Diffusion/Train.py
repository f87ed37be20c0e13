"""Training (Algorithm 1 over a dataset, with the original's optimizer and schedule), eval (the
configured sampler from a checkpoint: image grids, the denoising process, exported samples) and
fid (FID and IS of samples) of the unconditional DDPM.

`fit` is the recipe step the class-conditional model (DiffusionFreeGuidence/TrainCondition.py)
shares; the sampling steps are shared through Sampling.py, Process.py, Export.py and Metrics.py.
What the training recipe calls lives in modules of its own: the training state and continuing a
run (TrainingState.py), the EMA (EMA.py), the files of a run (RunFolder.py), the run log
(RunLog.py), several processes (Distributed.py), the speed options (Speed.py) and the random
numbers (Randomness.py).
"""
import os
import signal
import time

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR
from tqdm import tqdm

from Diffusion.Checkpoint import load_into, write_run_info
from Diffusion.Config import ConfigError
from Diffusion.Data import training_dataset, training_loader
from Diffusion.Diffusion import GaussianDiffusionTrainer
from Diffusion.Distributed import (
    EpochSampler,
    any_process,
    assert_identical_weights,
    for_training,
    torchrun_processes,
)
from Diffusion.EMA import EMA
from Diffusion.Export import export_samples
from Diffusion.Images import save_grid, starting_noise
from Diffusion.Interrupt import StopRequests, TrainingStopped
from Diffusion.Metrics import report_scores
from Diffusion.Model import UNet
from Diffusion.Process import ProcessRecorder, frames_of, save_process_gif, save_process_picture
from Diffusion.Randomness import GlobalBatch, flip_left_right_at_random
from Diffusion.RunFolder import disk_plan, is_snapshot_epoch, megabytes, save_snapshot
from Diffusion.RunLog import Progress, RunLog
from Diffusion.Sampling import sampler_of, steps_of
from Diffusion.ScheduleCheck import warn_if_x_T_keeps_the_image
from Diffusion.Speed import adamw, autocast, compiled, grad_scaler, memory_format_of, place
from Diffusion.TrainingState import TrainingState, checkpoint_dir_key, start, weights_to_sample
from Scheduler import GradualWarmupScheduler

MAX_NON_FINITE_IN_A_ROW = 50  # skipped steps in a row after which training is given up
PROCESS_ROWS = 8  # samples shown in the picture of the denoising process


def unet_of(config):
    """The UNet that config describes."""
    return UNet(T=config["T"], ch=config["channel"], ch_mult=config["channel_mult"],
                attn=config["attn"], num_res_blocks=config["num_res_blocks"],
                dropout=config["dropout"], group_norm_eps=config["group_norm_eps"],
                downsample_padding=config["downsample_padding"], img_channels=config["img_channels"])


def seed_everything(seed):
    if seed is not None:
        torch.manual_seed(seed)


def original_loss(trainer, x_0, labels, batch):
    """Algorithm 1's loss, reduced as the original: the sum over the batch / 1000."""
    return trainer(x_0, batch=batch).sum() / 1000.


def train(modelConfig):
    warn_if_x_T_keeps_the_image(modelConfig)
    seed_everything(modelConfig["seed"])  # the initial weights
    model = unet_of(modelConfig)
    fit(modelConfig, model, training_dataset(modelConfig), modelConfig["save_weight_dir"],
        original_loss, preview=unconditional_preview(modelConfig))


def warmup_cosine(optimizer, config):
    """The original's LR schedule, stepped once per epoch: linear warm-up from lr to
    lr * multiplier over epoch // 10 epochs, then cosine annealing to 0."""
    return GradualWarmupScheduler(
        optimizer, multiplier=config["multiplier"], warm_epoch=config["epoch"] // 10,
        after_scheduler=CosineAnnealingLR(optimizer, T_max=config["epoch"], eta_min=0))


def fit(config, model, dataset, checkpoint_dir, loss_of_batch, preview=None, run_info=None):
    """The training recipe: AdamW, warm-up then cosine annealing, gradient clipping and an EMA
    of the weights; the training state saved as it goes, weight snapshots, a run log.
    loss_of_batch(trainer, x_0, labels, batch) -> the global batch's loss; preview(model) ->
    (images [N, 3, H, W], images per row), drawn every sample_every epochs; run_info: entries
    for run.json (the class names)."""
    with torchrun_processes(config) as processes, StopRequests() as stop:
        device = processes.device
        model = place(model, config, device)
        optimizer = adamw(model.parameters(), config["lr"], device)
        ema = EMA(model, config["ema_decay"]) if config["ema_decay"] > 0 else None
        state = TrainingState(model, ema, optimizer, warmup_cosine(optimizer, config),
                              grad_scaler(config, device), processes, config)
        start(state, config, checkpoint_dir)
        if processes.is_main:
            write_run_info(checkpoint_dir, snapshot_weights="ema" if ema else "raw", **(run_info or {}))
            weights_mb = megabytes(model.state_dict())  # the state: weights, EMA, AdamW's 2 moments
            tqdm.write(disk_plan(config, checkpoint_dir, state.epoch, weights_mb, weights_mb * (3 + bool(ema))))
        network = compiled(for_training(model, processes), config)
        trainer = GaussianDiffusionTrainer(network, config["beta_1"], config["beta_T"], config["T"]).to(device)
        batch = GlobalBatch(state.generator, processes.rank, processes.world_size)
        sampler = EpochSampler(dataset, processes, state.seed)
        loader = training_loader(dataset, config, sampler, device)
        log = RunLog(checkpoint_dir, processes)
        progress = Progress(config, state, len(sampler) // config["batch_size"], processes)
        for epoch in range(state.epoch, config["epoch"]):
            sampler.start_epoch(epoch, skip=state.step_in_epoch * config["batch_size"])
            model.train()
            train_one_epoch(state, trainer, loader, loss_of_batch, batch, config, log, progress,
                            stop, checkpoint_dir)
            end_epoch(state, config, checkpoint_dir, log, progress, preview)
        if state.epoch >= config["epoch"] and not progress.steps_done:
            tqdm.write(f"nothing to train: the run already has all {config['epoch']} epochs; raise "
                       f"epoch to train longer (the cosine schedule then stretches to the new length)")
        assert_identical_weights(model, processes)
        log.close()


def training_step(state, trainer, images, labels, loss_of_batch, batch, config):
    """One optimizer step on a batch; returns its loss and whether the step was taken (a step
    whose gradients are not finite is skipped)."""
    device = state.processes.device
    x_0 = flip_left_right_at_random(images.to(device, non_blocking=True), batch)
    x_0 = x_0.contiguous(memory_format=memory_format_of(config))
    state.optimizer.zero_grad(set_to_none=True)
    with autocast(config, device):
        loss = loss_of_batch(trainer, x_0, labels.to(device, non_blocking=True), batch)
    # DistributedDataParallel averages the processes' gradients; the loss is the global batch's.
    state.scaler.scale(loss * batch.world_size).backward()
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), config["grad_clip"])
    finite = bool(grad_norm.isfinite())  # the one device sync of a step
    if finite:
        state.scaler.step(state.optimizer)
        if state.ema:
            state.ema.update(state.model)
    state.scaler.update()
    return loss.detach(), finite


def train_one_epoch(state, trainer, loader, loss_of_batch, batch, config, log, progress, stop, folder):
    """The rest of epoch state.epoch; the training state is saved every save_state_minutes, and
    when a stop is requested (then TrainingStopped is raised)."""
    last_save = time.monotonic()
    with progress.bar(len(loader), state.epoch) as bar:
        for images, labels in loader:
            loss, finite = training_step(state, trainer, images, labels, loss_of_batch, batch, config)
            state.step_in_epoch += 1
            state.step += 1
            state.non_finite_in_a_row = 0 if finite else state.non_finite_in_a_row + 1
            state.skipped_steps += not finite
            progress.add(loss, bar, state.optimizer.param_groups[0]["lr"])
            if config["log_every"] and state.step % config["log_every"] == 0:
                log.write("step", **progress.record(state, "step"))
            give_up_if_diverged(state)
            save_due = time.monotonic() - last_save >= 60 * config["save_state_minutes"]
            stop_now, save_now = any_process([stop.signal is not None, save_due], state.processes)
            if save_now or stop_now:
                state.save(folder)
                last_save = time.monotonic()
            if stop_now:
                raise TrainingStopped(stopped_message(state, stop, config), stop.signal or signal.SIGTERM)


def give_up_if_diverged(state):
    if state.non_finite_in_a_row >= MAX_NON_FINITE_IN_A_ROW:
        raise ConfigError(
            f"the loss was not finite for {state.non_finite_in_a_row} steps in a row (epoch "
            f"{state.epoch}, step {state.step_in_epoch}): training diverged. Lower lr, or train "
            f"with amp none or bf16 (fp16's range is small); the weights of the last saved "
            f"state are untouched by the skipped steps.")


def stopped_message(state, stop, config):
    key = checkpoint_dir_key(config)
    by = stop.name if stop.signal else "another process's signal"
    return (f"stopped by {by} at epoch {state.epoch}, step {state.step_in_epoch}; the "
            f"training state is saved. Continue with the same command and "
            f"--training_load_weight last (checkpoint folder {config[key]}).")


def end_epoch(state, config, folder, log, progress, preview):
    """The epoch's LR step, snapshot, training state, log line and sample grid."""
    epoch = state.epoch
    record = progress.record(state, "epoch")
    state.scheduler.step()
    state.next_epoch()
    if state.processes.is_main and is_snapshot_epoch(epoch, config):
        weights = state.ema.module if state.ema else state.model
        save_snapshot(weights.state_dict(), folder, epoch, config["keep_last"])
    state.save(folder)
    log.write("epoch", **record)
    if preview and config["sample_every"] and (epoch + 1) % config["sample_every"] == 0:
        if state.processes.is_main:
            images, nrow = draw_preview(preview, state, config)
            log.samples(images, epoch, state.step, nrow)


def draw_preview(preview, state, config):
    """preview(model) with the EMA weights, from the same noise every time (the seed's), without
    touching the training's random generators."""
    model = state.ema.module if state.ema else state.model
    device = state.processes.device
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(state.seed)
        images, nrow = preview(model)
    state.model.train()
    return images, nrow


def unconditional_preview(config):
    """preview(model) for the unconditional model: 16 samples, 4 per row."""
    def preview(model):
        device = next(model.parameters()).device
        sampler = sampler_of({**config, "compile": False}, model)  # not compiled again each time
        return sampler(starting_noise(16, config, device), progress=False), 4
    return preview


def trained_model(config, device):
    """The UNet of config with the weights eval samples from (the EMA's, unless use_ema is
    false; see weights_to_sample), on `device`, in eval mode."""
    model = unet_of(config)
    folder, name = config["save_weight_dir"], config["test_load_weight"]
    load_into(model, weights_to_sample(folder, name, config, device), os.path.join(folder, name), config)
    return place(model, config, device).eval()


def eval(modelConfig):
    """Sample batch_size images from test_load_weight; save the noise, the samples and the
    denoising process; export num_samples single images (under torchrun, each process its
    share)."""
    warn_if_x_T_keeps_the_image(modelConfig)
    with torchrun_processes(modelConfig) as processes:
        config = processes.on_its_device(modelConfig)
        seed_everything(config["seed"])
        sampler = sampler_of(config, trained_model(config, processes.device))
        if processes.is_main:
            save_samples_and_process(config, sampler)
        if config["num_samples"]:
            export(config, sampler, processes)


def save_samples_and_process(config, sampler):
    """The starting noise, the samples of it and the denoising process, as pictures."""
    x_T = starting_noise(config["batch_size"], config, torch.device(config["device"]))
    save_grid(x_T, config["sampled_dir"], config["sampledNoisyImgName"], config["nrow"])
    process = ProcessRecorder(steps_of(config), frames_of(config))
    x_0 = sampler(x_T, on_step=process if config["process_frames"] else None)
    save_grid(x_0, config["sampled_dir"], config["sampledImgName"], config["nrow"])
    if config["process_frames"]:
        process.finish(x_0)
        save_process_picture(process.x_t[:, :PROCESS_ROWS], process.x_0[:, :PROCESS_ROWS],
                             config["sampled_dir"], config["sampledProcessImgName"])
        save_process_gif(process.x_t, config["nrow"], config["sampled_dir"], config["sampledProcessGifName"])


def export(config, sampler, processes):
    """num_samples samples of `sampler` as PNG files in export_dir (each process its share)."""
    device = torch.device(config["device"])
    export_samples(lambda first, count: sampler(starting_noise(count, config, device)),
                   config["export_dir"], config["num_samples"], config["batch_size"], processes, config["seed"])


def fid(modelConfig):
    """FID and IS against the training set of fid_images or, when that is None, of num_samples
    samples of test_load_weight, exported into export_dir first (continuing an earlier export;
    under torchrun, each process exports its share and the first one scores)."""
    with torchrun_processes(modelConfig) as processes:
        config = processes.on_its_device(modelConfig)
        folder = config["fid_images"]
        if folder is None:
            export(config, sampler_of(config, trained_model(config, processes.device)), processes)
            folder = config["export_dir"]
        if processes.is_main:
            report_scores(config, {"samples": folder})
