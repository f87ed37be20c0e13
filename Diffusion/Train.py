"""Training DDPM: Algorithm 1 over a dataset, with the original's recipe (AdamW, a linear warm-up
then cosine annealing of the learning rate, gradient clipping) and an exponential moving average
of the weights, which the samples are drawn from (EMA.py).

`fit` is the recipe of both models. A model brings its pieces (`ModelPieces`): the unconditional
ones are below, the class-conditional ones in DiffusionFreeGuidence/TrainCondition.py.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from Diffusion.Diffusion import GaussianDiffusionTrainer
from Diffusion.EMA import EMA
from Diffusion.Machinery.Checkpoint import diffusion_of
from Diffusion.Machinery.Config import complete
from Diffusion.Machinery.Data import training_dataset, training_loader
from Diffusion.Machinery.Evaluation import Unconditional, evaluate, fid_of, preview_of
from Diffusion.Machinery.Interrupt import StopRequests
from Diffusion.Machinery.Keys import KEYS, UNET_KEYS
from Diffusion.Machinery.Processes import EpochSampler, for_training, torchrun_processes
from Diffusion.Machinery.Randomness import GlobalBatchRandomness, flip_left_right_at_random
from Diffusion.Machinery.ScheduleCheck import warn_if_x_T_keeps_the_image
from Diffusion.Machinery.Speed import autocast, compiled, memory_format
from Diffusion.Machinery.TrainingRun import TrainingRun
from Diffusion.Machinery.TrainingState import TrainingState
from Diffusion.Model import UNet
from Scheduler import GradualWarmupScheduler


@dataclass(frozen=True)
class ModelPieces:
    """What a model brings to the shared training and sampling.

    keys: its config keys and their defaults; absent: {key: why} for keys it lacks on purpose;
    folder_key: the key of its checkpoint folder; labelled: it trains on the dataset's labels.
    unet(config, num_labels) -> its UNet; loss(config) -> loss(trainer, x_0, labels, randomness),
    the global batch's loss; guide(model, w) -> the network a sampler calls for guidance weight w;
    layout: how eval conditions its samples and lays out their grids (Evaluation.Unconditional).
    """
    keys: dict
    folder_key: str
    labelled: bool
    unet: Callable
    loss: Callable
    guide: Callable
    layout: Callable
    absent: dict


def optimizer_step(loss, model, optimizer, scaler, grad_clip):
    """Backpropagate `loss`, clip the gradient norm to grad_clip and take the AdamW step; a step
    whose gradients are not finite (fp16 overflow, a diverging run) is skipped. Returns whether
    it was taken."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    taken = bool(grad_norm.isfinite())  # the one device sync of a step
    if taken:
        scaler.step(optimizer)
    scaler.update()
    return taken


def fit(config, pieces):
    """The training recipe of both models, on config["dataset"] (under torchrun, one process per
    GPU, each with batch_size images of the global batch); the run continues where it stopped
    with training_load_weight "last"."""
    warn_if_x_T_keeps_the_image(config["beta_1"], config["beta_T"], config["T"], config["beta_schedule"])
    folder = config[pieces.folder_key]
    continuing = (f": the training state saved last is intact in {folder}; continue with the same "
                  f"torchrun command and --training_load_weight last")
    with torchrun_processes(config["device"], if_lost=continuing) as processes, StopRequests() as stop:
        device, layout = processes.device, memory_format(config["channels_last"])
        dataset = training_dataset(config["dataset"], config["data_root"], config["img_size"],
                                   config["img_channels"], config["max_images"], config["batch_size"],
                                   pieces.labelled)
        if config["seed"] is not None:
            torch.manual_seed(config["seed"])  # the initial weights
        num_labels = len(dataset.classes)
        model = pieces.unet(config, num_labels).to(device, memory_format=layout)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4,
                                      fused=device.type in ("cuda", "cpu"))
        # Warm-up over the first tenth of the epochs, then cosine annealing to 0.
        scheduler = GradualWarmupScheduler(optimizer, config["multiplier"], warm_epoch=config["epoch"] // 10,
                                           after_scheduler=CosineAnnealingLR(optimizer, T_max=config["epoch"]))
        ema = EMA(model, config["ema_decay"]) if config["ema_decay"] > 0 else None
        scaler = torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16")
        state = TrainingState(model, ema, optimizer, scheduler, scaler, processes, config["batch_size"])
        run = TrainingRun(state, folder, pieces.folder_key, stop, epochs=config["epoch"],
                          save_every=config["save_every"], keep_last=config["keep_last"],
                          save_state_minutes=config["save_state_minutes"], log_every=config["log_every"],
                          sample_every=config["sample_every"], fid_every=config["fid_every"])
        run.start(config["training_load_weight"], config["seed"], config["overwrite"], diffusion_of(config),
                  dataset.classes, preview=preview_of(config, pieces, num_labels),
                  fid=fid_of(config, pieces, num_labels) if config["fid_every"] else None)
        trainer = GaussianDiffusionTrainer(
            compiled(for_training(model, processes), config["compile"]), config["beta_1"], config["beta_T"],
            config["T"], config["beta_schedule"], config["prediction"], config["loss_weight"],
            config["snr_gamma"]).to(device)
        randomness = GlobalBatchRandomness(state.generator, processes.rank, processes.world_size)
        loss_of_batch = pieces.loss(config)
        sampler = EpochSampler(dataset, processes, state.seed)
        loader = training_loader(dataset, config["batch_size"], config["num_workers"], sampler, device)
        for epoch in range(state.epoch, config["epoch"]):
            sampler.start_epoch(epoch, skip=state.step_in_epoch * config["batch_size"])
            model.train()
            for images, labels in run.batches(loader):
                x_0 = flip_left_right_at_random(images.to(device, non_blocking=True), randomness)
                with autocast(device, config["amp"]):
                    loss = loss_of_batch(trainer, x_0.contiguous(memory_format=layout),
                                         labels.to(device, non_blocking=True), randomness)
                # DistributedDataParallel averages the processes' gradients; the loss is the global batch's.
                taken = optimizer_step(loss * processes.world_size, model, optimizer, scaler,
                                       config["grad_clip"])
                if taken and ema:
                    ema.update(model)
                run.after_step(loss.detach(), taken)
            scheduler.step()
            run.end_epoch()
        run.finish()


def unet_of(config, num_labels=None):
    """The UNet that config describes (the unconditional model takes no labels)."""
    return UNet(T=config["T"], ch=config["channel"], ch_mult=config["channel_mult"],
                attn=config["attn"], num_res_blocks=config["num_res_blocks"],
                dropout=config["dropout"], group_norm_eps=config["group_norm_eps"],
                downsample_padding=config["downsample_padding"], img_channels=config["img_channels"])


def original_loss(trainer, x_0, labels, randomness):
    """Algorithm 1's loss, reduced as the original: the sum over the batch / 1000."""
    return trainer(x_0, randomness=randomness).sum() / 1000.


UNCONDITIONAL = ModelPieces(keys={**KEYS, **UNET_KEYS}, folder_key="save_weight_dir", labelled=False,
                            unet=unet_of, loss=lambda config: original_loss, guide=lambda model, w: model,
                            layout=Unconditional, absent={})


def train(modelConfig):
    """Train the unconditional model of `modelConfig` (keys it leaves out take their defaults)."""
    fit(complete(modelConfig, UNCONDITIONAL.keys), UNCONDITIONAL)


def eval(modelConfig):
    """Sample grids, the denoising process and num_samples exported images from
    test_load_weight (keys it leaves out take their defaults)."""
    evaluate(complete(modelConfig, UNCONDITIONAL.keys), UNCONDITIONAL)
