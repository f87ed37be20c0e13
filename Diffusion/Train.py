"""Training DDPM: Algorithm 1 over a dataset, with the original's recipe (AdamW, a linear warm-up
then cosine annealing of the learning rate, gradient clipping) and an exponential moving average
of the weights, which the samples are drawn from (EMA.py).

`fit` is the recipe of both models. A model brings what differs (`Variant`): the unconditional
model's is below, the class-conditional one's in DiffusionFreeGuidence/TrainCondition.py.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from Diffusion.Diffusion import LEARNED_VARIANCES, GaussianDiffusionTrainer
from Diffusion.EMA import EMA
from Diffusion.Model import UNet
from Diffusion.Likelihood import timestep_sampler
from Diffusion.Run.Checkpoints import diffusion_of, is_snapshot_epoch, load_initial_weights, save_snapshot
from Diffusion.Run.Config import complete
from Diffusion.Run.Data import EpochSampler, flip_left_right_at_random, training_dataset, training_loader
from Diffusion.Run.Evaluation import PlainGrid, evaluate, fid_of, preview_of
from Diffusion.Run.Keys import KEYS, UNET_KEYS
from Diffusion.Run.Memory import AccumulatedDraws, check_images_for_a_step, checkpoint_blocks, gradient_sync
from Diffusion.Run.Processes import (
    autocast,
    compiled,
    data_parallel,
    memory_format,
    record_terms,
    torchrun_group,
)
from Diffusion.Run.Sampling import warn_if_x_T_keeps_the_image
from Diffusion.Run.TrainingRun import StopRequests, TrainingRun
from Diffusion.Run.TrainingState import TrainingState
from Scheduler import GradualWarmupScheduler


@dataclass(frozen=True)
class Variant:
    """What one of the two models brings to the shared training and sampling.

    keys: its config keys and their defaults; absent: {key: why} for keys it lacks on purpose;
    checkpoints_key: the key of its checkpoint folder; labelled: it trains on the dataset's labels.
    unet(config, num_labels) -> its UNet; condition(config) -> condition(labels, draws), the model
    inputs besides x_t and t of a training batch; loss(error, global_batch): the batch's loss
    from the squared errors [B, C, H, W]; guide(model, w) -> the network a sampler calls for
    guidance weight w; grid: how eval conditions its samples and lays out their grids.
    """
    keys: dict
    absent: dict
    checkpoints_key: str
    labelled: bool
    unet: Callable
    condition: Callable
    loss: Callable
    guide: Callable
    grid: type


def backward(loss, scaler):
    """Add the gradients of `loss` (scaled for fp16) to the parameters' .grad."""
    scaler.scale(loss).backward()


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Clip the norm of the gradients backward() summed to grad_clip and take the AdamW step; a step
    whose gradients are not finite (fp16 overflow, a diverging run) is skipped. Returns whether it
    was taken; the gradients are cleared."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    taken = bool(grad_norm.isfinite())  # the one device sync of a step
    if taken:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return taken


def fit(config, variant):
    """The training recipe of both models, on config["dataset"] (under torchrun, one process per
    GPU, each with batch_size images of the global batch); the run continues where it stopped
    with training_load_weight "last"."""
    warn_if_x_T_keeps_the_image(config["beta_1"], config["beta_T"], config["T"], config["beta_schedule"])
    folder = config[variant.checkpoints_key]
    continuing = (f": the training state saved last is intact in {folder}; continue with the same "
                  f"torchrun command and --training_load_weight last")
    with torchrun_group(config["device"], if_lost=continuing) as process, StopRequests() as stop:
        device, memory_layout = process.device, memory_format(config["channels_last"])
        dataset = training_dataset(config["dataset"], config["data_root"], config["img_size"],
                                   config["img_channels"], config["max_images"], config["batch_size"],
                                   variant.labelled)
        if config["seed"] is not None:
            torch.manual_seed(config["seed"])  # the initial weights
        num_labels = len(dataset.classes)
        model = variant.unet(config, num_labels).to(device, memory_format=memory_layout)
        if config["init_weights"] and config["training_load_weight"] is None:  # fine-tuning: a new run
            load_initial_weights(model, config["init_weights"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4,
                                      fused=device.type in ("cuda", "cpu"))
        # Warm-up over the first tenth of the epochs, then cosine annealing to 0.
        scheduler = GradualWarmupScheduler(optimizer, config["multiplier"], warm_epoch=config["epoch"] // 10,
                                           after_scheduler=CosineAnnealingLR(optimizer, T_max=config["epoch"]))
        ema = EMA(model, config["ema_decay"]) if config["ema_decay"] > 0 else None
        scaler = torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16")
        if config["grad_checkpoint"]:  # after the EMA's copy of the model
            checkpoint_blocks(model)
        accumulate = config["accumulate"]
        check_images_for_a_step(len(dataset), config["batch_size"], accumulate, process.world_size, config["dataset"])
        timesteps = timestep_sampler(config["t_sampling"], config["T"])  # t ~ Uniform, or by importance
        state = TrainingState(model, ema, optimizer, scheduler, scaler, process, config["batch_size"] * accumulate,
                              timesteps)
        run = TrainingRun(state, folder, stop, config["epoch"], config["save_state_minutes"], config["log_every"],
                          config["sample_every"], config["fid_every"], preview_of(config, variant, num_labels),
                          fid_of(config, variant, num_labels) if config["fid_every"] else None)
        run.start(config["training_load_weight"], config["seed"], config["overwrite"], variant.checkpoints_key,
                  diffusion_of(config), dataset.classes, config["save_every"], config["keep_last"])
        network = data_parallel(model, process)
        trainer = GaussianDiffusionTrainer(
            compiled(network, config["compile"]), config["beta_1"], config["beta_T"],
            config["T"], config["beta_schedule"], config["prediction"], config["loss_weight"],
            config["snr_gamma"], config["loss"], config["variance"], config["vlb_weight"]).to(device)
        # The draws of each image (its flip, label dropout, t and eps) are the same whatever the
        # number of processes and micro-batches (Processes.py, Memory.py).
        draws = AccumulatedDraws(state.generator, process.rank, process.world_size, accumulate)
        condition_of = variant.condition(config)
        sampler = EpochSampler(dataset, process, state.seed)
        loader = training_loader(dataset, config["batch_size"], config["num_workers"], sampler, device)
        for epoch in range(state.epoch, config["epoch"]):
            sampler.start_epoch(epoch, skip=state.step_in_epoch * config["batch_size"] * accumulate)
            model.train()
            for step in run.batches(loader, accumulate):  # accumulate micro-batches per step
                loss, terms = 0., []
                for (images, labels), last in draws.micro_batches(step):
                    x_0 = flip_left_right_at_random(images.to(device, non_blocking=True), draws)
                    condition = condition_of(labels.to(device, non_blocking=True), draws)
                    t, weights = timesteps.draw(draws, len(x_0), device)
                    noise = draws.randn_like(x_0)
                    with gradient_sync(network, last):
                        with autocast(device, config["amp"]):
                            error = trainer(x_0.contiguous(memory_format=memory_layout), *condition, t=t, noise=noise)
                            micro_loss = variant.loss(error * weights.view(-1, 1, 1, 1), draws.size(len(x_0)))
                        # DistributedDataParallel averages the processes' gradients; the loss is the
                        # global batch's, whose micro-batches' gradients add up.
                        backward(micro_loss * process.world_size, scaler)
                    loss = loss + micro_loss.detach()
                    terms.append((t, error.detach().flatten(1).mean(1)))
                record_terms(timesteps, terms, process)  # importance sampling learns from the step's terms
                taken = optimizer_step(model, optimizer, scaler, config["grad_clip"])
                if taken and ema:
                    ema.update(model)
                run.after_step(loss, taken)
                if run.save_due():  # every save_state_minutes, and at once on SIGTERM or Ctrl-C
                    state.save(folder)  # training_state.pt
                    run.stop_if_asked()
            scheduler.step()
            state.next_epoch()
            if is_snapshot_epoch(epoch, config["save_every"], config["epoch"]) and process.is_main:
                # ckpt_{epoch}_.pt: the weights one samples from, the newest keep_last kept
                save_snapshot((ema.module if ema else model).state_dict(), folder, epoch, config["keep_last"])
            state.save(folder)
            run.end_epoch(epoch)
        run.finish()


def output_channels(config):
    """The network's output channels: img_channels, twice as many with a learned variance (a config
    without `variance`, such as an imported model's, has a fixed one)."""
    return config["img_channels"] * (2 if config.get("variance") in LEARNED_VARIANCES else 1)


def unet_of(config, num_labels=None):
    """The UNet that config describes (the unconditional model takes no labels)."""
    return UNet(T=config["T"], ch=config["channel"], ch_mult=config["channel_mult"],
                attn=config["attn"], num_res_blocks=config["num_res_blocks"],
                dropout=config["dropout"], group_norm_eps=config["group_norm_eps"],
                downsample_padding=config["downsample_padding"], img_channels=config["img_channels"],
                out_channels=output_channels(config))


def no_condition(labels, draws):
    """The unconditional model takes nothing besides x_t and t."""
    return ()


def original_loss(error, global_batch):
    """Algorithm 1's loss, reduced as the original: the sum over the batch / 1000."""
    return error.sum() / 1000.


UNCONDITIONAL = Variant(keys={**KEYS, **UNET_KEYS}, absent={}, checkpoints_key="save_weight_dir",
                        labelled=False, unet=unet_of, condition=lambda config: no_condition,
                        loss=original_loss, guide=lambda model, w: model, grid=PlainGrid)


def train(modelConfig):
    """Train the unconditional model of `modelConfig` (keys it leaves out take their defaults)."""
    fit(complete(modelConfig, UNCONDITIONAL.keys), UNCONDITIONAL)


def eval(modelConfig):
    """Sample grids, the denoising process and num_samples exported images from
    test_load_weight (keys it leaves out take their defaults)."""
    evaluate(complete(modelConfig, UNCONDITIONAL.keys), UNCONDITIONAL)
