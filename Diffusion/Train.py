"""Training (Algorithm 1 over a dataset, with the original's optimizer and schedule), eval (the
configured sampler from a checkpoint: image grids, the denoising process, exported samples) and
fid (FID and IS of samples) of the unconditional DDPM.

`fit` is the recipe step the class-conditional model (DiffusionFreeGuidence/TrainCondition.py)
shares; the sampling steps are shared through Sampling.py, Process.py, Export.py and Metrics.py.
"""
import os
import warnings

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR
from tqdm import tqdm

from Diffusion.Checkpoint import (
    TRAINING_STATE,
    checkpoint_name,
    epoch_of,
    list_checkpoints,
    load_weights,
    save_atomically,
)
from Diffusion.Config import ConfigError
from Diffusion.Data import training_dataset, training_loader
from Diffusion.Diffusion import GaussianDiffusionTrainer
from Diffusion.Export import export_samples
from Diffusion.Images import save_grid, starting_noise
from Diffusion.Metrics import report_scores
from Diffusion.Model import UNet
from Diffusion.Process import ProcessRecorder, frames_of, save_process_gif, save_process_picture
from Diffusion.Sampling import sampler_of, steps_of
from Scheduler import GradualWarmupScheduler

PROGRESS_EVERY = 10  # batches between progress-bar updates (each one waits for the device)
PROCESS_ROWS = 8  # samples shown in the picture of the denoising process


def unet_of(config):
    """The UNet that config describes."""
    return UNet(T=config["T"], ch=config["channel"], ch_mult=config["channel_mult"],
                attn=config["attn"], num_res_blocks=config["num_res_blocks"],
                dropout=config["dropout"], group_norm_eps=config["group_norm_eps"],
                downsample_padding=config["downsample_padding"])


def seed_everything(seed):
    if seed is not None:
        torch.manual_seed(seed)


def original_loss(trainer, x_0, labels):
    """Algorithm 1's loss, reduced as the original: the sum over the batch / 1000."""
    return trainer(x_0).sum() / 1000.


def train(modelConfig):
    seed_everything(modelConfig["seed"])
    model = unet_of(modelConfig)
    fit(modelConfig, model, training_dataset(modelConfig), modelConfig["save_weight_dir"],
        original_loss)


def fit(config, model, dataset, checkpoint_dir, loss_of_batch):
    """The training recipe: AdamW, warm-up then cosine annealing, gradient clipping; a
    checkpoint after every epoch. loss_of_batch(trainer, images, labels) -> scalar loss."""
    device = torch.device(config["device"])
    model.to(device)
    trainer = GaussianDiffusionTrainer(model, config["beta_1"], config["beta_T"], config["T"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    scheduler = GradualWarmupScheduler(
        optimizer, multiplier=config["multiplier"], warm_epoch=config["epoch"] // 10,
        after_scheduler=CosineAnnealingLR(optimizer, T_max=config["epoch"], eta_min=0))
    first_epoch = resume(config, model, optimizer, scheduler, checkpoint_dir, device)
    if first_epoch >= config["epoch"]:
        tqdm.write(f"nothing to train: the run already has all {config['epoch']} epochs; raise "
                   f"epoch to train longer (the cosine schedule then stretches to the new length)")
    loader = training_loader(dataset, config, device)
    for epoch in range(first_epoch, config["epoch"]):
        model.train()
        train_one_epoch(trainer, loader, optimizer, loss_of_batch, config, epoch)
        scheduler.step()
        save_checkpoint(model, optimizer, checkpoint_dir, epoch)


def train_one_epoch(trainer, loader, optimizer, loss_of_batch, config, epoch):
    """One pass over `loader`; the bar shows the epoch's running mean loss and the LR."""
    device = trainer.betas.device
    loss_sum = torch.zeros((), device=device)
    lr = optimizer.param_groups[0]["lr"]
    with tqdm(loader, desc=f"epoch {epoch}/{config['epoch'] - 1}", dynamic_ncols=True) as bar:
        for batch, (images, labels) in enumerate(bar, start=1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of_batch(trainer, images.to(device, non_blocking=True),
                                 labels.to(device, non_blocking=True))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), config["grad_clip"])
            optimizer.step()
            loss_sum += loss.detach()
            if batch % PROGRESS_EVERY == 0 or batch == len(loader):
                bar.set_postfix(mean_loss=f"{loss_sum.item() / batch:.4f}", lr=f"{lr:.3g}")


def save_checkpoint(model, optimizer, folder, epoch):
    """ckpt_{epoch}_.pt (the weights) and training_state.pt (what resuming needs besides)."""
    name = checkpoint_name(epoch)
    save_atomically(model.state_dict(), os.path.join(folder, name))
    save_atomically({"checkpoint": name, "optimizer": optimizer.state_dict()},
                    os.path.join(folder, TRAINING_STATE))


def resume(config, model, optimizer, scheduler, folder, device):
    """Continue from config["training_load_weight"] ("last": the newest checkpoint): load its
    weights, the optimizer state saved with it if there is one, and move the LR schedule to the
    epoch after the checkpoint's. Returns the first epoch to train."""
    name = config["training_load_weight"]
    if name is None:
        return 0
    if name == "last":
        present = list_checkpoints(folder)
        if not present:
            raise ConfigError(f"training_load_weight is 'last' but {folder!r} holds no "
                              f"checkpoints: set it to None to start a new run.")
        name = present[-1]
    load_weights(model, folder, name, config, device)
    state_path = os.path.join(folder, TRAINING_STATE)
    state = torch.load(state_path, map_location=device, weights_only=True) \
        if os.path.isfile(state_path) else {}
    optimizer_saved_with_it = state.get("checkpoint") == name
    if optimizer_saved_with_it:
        optimizer.load_state_dict(state["optimizer"])
    epoch = epoch_of(name)
    first_epoch = 0 if epoch is None else epoch + 1
    with warnings.catch_warnings():  # the schedule is replayed before any optimizer step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for _ in range(first_epoch):
            scheduler.step()
    optimizer_note = "with" if optimizer_saved_with_it else "without (none saved with it)"
    tqdm.write(f"continuing from {name} at epoch {first_epoch}, {optimizer_note} its optimizer state")
    return first_epoch


def trained_model(config, device):
    """The UNet of config with the weights of test_load_weight, on `device`, in eval mode."""
    model = unet_of(config)
    load_weights(model, config["save_weight_dir"], config["test_load_weight"], config, device)
    return model.to(device).eval()


def eval(modelConfig):
    """Sample batch_size images from test_load_weight; save the noise, the samples and the
    denoising process; export num_samples single images."""
    config = modelConfig
    device = torch.device(config["device"])
    seed_everything(config["seed"])
    sampler = sampler_of(config, trained_model(config, device))
    x_T = starting_noise(config["batch_size"], config["img_size"], device)
    save_grid(x_T, config["sampled_dir"], config["sampledNoisyImgName"], config["nrow"])
    process = ProcessRecorder(steps_of(config), frames_of(config))
    x_0 = sampler(x_T, on_step=process if config["process_frames"] else None)
    save_grid(x_0, config["sampled_dir"], config["sampledImgName"], config["nrow"])
    if config["process_frames"]:
        process.finish(x_0)
        save_process_picture(process.x_t[:, :PROCESS_ROWS], process.x_0[:, :PROCESS_ROWS],
                             config["sampled_dir"], config["sampledProcessImgName"])
        save_process_gif(process.x_t, config["nrow"], config["sampled_dir"], config["sampledProcessGifName"])
    if config["num_samples"]:
        export(config, sampler)


def export(config, sampler):
    """num_samples samples of `sampler` as PNG files in export_dir."""
    device = torch.device(config["device"])
    export_samples(lambda first, count: sampler(starting_noise(count, config["img_size"], device)),
                   config["export_dir"], config["num_samples"], config["batch_size"], config["seed"])


def fid(modelConfig):
    """FID and IS against the training set of fid_images or, when that is None, of num_samples
    samples of test_load_weight, exported into export_dir first (continuing an earlier export)."""
    config = modelConfig
    folder = config["fid_images"]
    if folder is None:
        device = torch.device(config["device"])
        export(config, sampler_of(config, trained_model(config, device)))
        folder = config["export_dir"]
    report_scores(config, {"samples": folder})
