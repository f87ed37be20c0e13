"""The memory options of training (Diffusion/Run/Memory.py) and fine-tuning from released weights:
grad_checkpoint gives the gradients of the plain model; accumulate gives the step of one batch of
batch_size x accumulate images (both models); a run stopped mid-epoch with accumulation continues
to the very weights of one that never stopped; a new run starts from an imported model's weights."""
import contextlib
import signal
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from conftest import (TINY_CONDITIONAL, as_arguments, checked, log_lines, script_config, start_script,
                      wait_until, write_images)
from test_import_weights import small_diffusers_unet

from Conversion.Import import import_weights, write_imported
from Diffusion import Train
from Diffusion.Model import ResBlock, UNet
from Diffusion.Run.Checkpoints import TRAINING_STATE
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Memory import AccumulatedDraws, checkpoint_blocks
from Diffusion.Run.Processes import GlobalBatchRandomness, autocast
from DiffusionFreeGuidence import TrainCondition
from DiffusionFreeGuidence.ModelCondition import UNet as ConditionalUNet

# 16 images of 8x8, two epochs. No dropout: its masks come from each process's generator, drawn
# per micro-batch, so that with dropout accumulation takes the big batch's step in distribution
# only (docs/finetune.md); every other random number is the big batch's.
RUN = {"T": 10, "channel": 32, "channel_mult": [1, 2], "attn": [1], "num_res_blocks": 1, "img_size": 8,
       "epoch": 2, "dropout": 0., "ema_decay": 0.99, "num_workers": 0, "device": "cpu", "seed": 0,
       "save_every": 1, "log_every": 1, "sample_every": 0}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("memory") / "images", 16, size=(8, 8), seed=7)


def trained(images, folder, **changes):
    """A run of Main.py's model in this process; returns its training_state.pt."""
    Train.train({**checked(RUN), "dataset": str(images), "save_weight_dir": str(folder), **changes})
    return torch.load(Path(folder) / TRAINING_STATE, weights_only=True)


@contextlib.contextmanager
def first_gradients():
    """The gradients of the first optimizer step taken inside (every parameter, clipped: AdamW's
    input), read by torch's own global step hook."""
    seen = []

    def record(optimizer, args, kwargs):
        if not seen:
            seen.extend(p.grad.clone() for group in optimizer.param_groups for p in group["params"]
                        if p.grad is not None)
    handle = register_optimizer_step_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def big_batch(images, tmp_path_factory):
    with first_gradients() as gradients:
        state = trained(images, tmp_path_factory.mktemp("big") / "ckpt", batch_size=4)
    return state, gradients


@pytest.fixture(scope="module")
def accumulated(images, tmp_path_factory):
    """Batch 2, accumulate 2, with grad_checkpoint: both options at once."""
    with first_gradients() as gradients:
        state = trained(images, tmp_path_factory.mktemp("accumulated") / "ckpt", batch_size=2, accumulate=2,
                        grad_checkpoint=True)
    return state, gradients


def assert_same_steps(got, expected):
    """The first step's gradients to float rounding (the sum over the batch taken in another
    order: within 1e-5 of each, or 1e-6 of the largest gradient), and the weights after every step within one step of AdamW (lr, 2.5e-4 at most here):
    AdamW moves a weight by about lr whatever the size of its gradient, so the float rounding of a
    gradient that is ~0 (a bias before a GroupNorm) sets the sign of its step."""
    (got_state, got_gradients), (expected_state, expected_gradients) = got, expected
    assert len(got_gradients) == len(expected_gradients) > 0
    largest = max(gradient.abs().max().item() for gradient in expected_gradients)
    for got_gradient, gradient in zip(got_gradients, expected_gradients):
        torch.testing.assert_close(got_gradient, gradient, rtol=1e-5, atol=1e-6 * largest)
    for part in ("model", "ema"):
        for name, tensor in expected_state[part].items():
            torch.testing.assert_close(got_state[part][name], tensor, rtol=0, atol=2.5e-4, msg=f"{part} {name}")


@pytest.mark.parametrize("unet", [lambda: UNet(10, 32, [1, 2], [1], 1, 0.1),
                                  lambda: ConditionalUNet(10, 3, 32, [1, 2], 1, 0.1)],
                         ids=["Main.py's UNet", "MainCondition.py's UNet"])
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_grad_checkpoint_gives_the_same_gradients_recomputing_each_resblock(unet, amp):
    torch.manual_seed(0)
    plain = unet().train()
    checkpointed = checkpoint_blocks(unet().train())
    checkpointed.load_state_dict(plain.state_dict())
    inputs = (torch.randn(2, 3, 8, 8), torch.tensor([1, 7])) + \
        ((torch.tensor([0, 2]),) if isinstance(plain, ConditionalUNet) else ())
    calls = []
    for block in checkpointed.modules():
        if isinstance(block, ResBlock):
            block.block1.register_forward_hook(lambda *_: calls.append(1))
    gradients = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks
        with autocast(torch.device("cpu"), amp):
            loss = model(*inputs).float().square().sum()
        loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    blocks = sum(isinstance(block, ResBlock) for block in checkpointed.modules())
    assert len(calls) == 2 * blocks  # each ResBlock ran again in the backward pass (under autocast)
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-6, atol=1e-8, msg=name)


def test_accumulated_micro_batches_take_the_step_of_one_big_batch(big_batch, accumulated):
    assert (accumulated[0]["step"], accumulated[0]["batch_size"]) == (big_batch[0]["step"], 4) == (8, 4)
    assert_same_steps(accumulated, big_batch)


def test_accumulation_takes_the_guided_models_step_of_one_big_batch(tmp_path, class_folders):
    """The guided loss, sum / B^2 of the global batch, and its label dropout drawn per image."""
    results = []
    for name, changes in (("big", {"batch_size": 4}), ("accumulated", {"batch_size": 2, "accumulate": 2})):
        config = {**checked({**TINY_CONDITIONAL, "img_size": 8, "dropout": 0., "p_uncond": 0.5, "sample_every": 0},
                            "MainCondition"), "dataset": str(class_folders), "save_dir": str(tmp_path / name), **changes}
        with first_gradients() as gradients:
            TrainCondition.train(config)
        results.append((torch.load(tmp_path / name / TRAINING_STATE, weights_only=True), gradients))
    assert results[0][0]["step"] == results[1][0]["step"] == 6
    assert_same_steps(results[1], results[0])


def test_a_stop_mid_epoch_with_accumulation_continues_to_the_same_weights(images, accumulated, tmp_path):
    accumulated = accumulated[0]
    folder = tmp_path / "ckpt"
    config = script_config("Main", {**RUN, "batch_size": 2, "accumulate": 2, "grad_checkpoint": True},
                           dataset=images, save_weight_dir=folder, sampled_dir=tmp_path / "unused")
    process = start_script("Main.py", *as_arguments(config), cwd=tmp_path)
    wait_until(lambda: any(r["kind"] == "step" and r["step"] >= 2 for r in log_lines(folder)), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    stopped = torch.load(folder / TRAINING_STATE, weights_only=True)
    assert stopped["step"] < 8 and stopped["batch_size"] == 4  # whole steps of 2 x 2 images
    continued = trained(images, folder, batch_size=2, accumulate=2, grad_checkpoint=True, training_load_weight="last")
    assert continued["step"] == 8
    for part in ("model", "ema"):
        assert all(torch.equal(continued[part][name], accumulated[part][name]) for name in accumulated[part])


def test_a_new_run_starts_from_an_imported_models_weights(tmp_path, image_folder):
    """Fine-tuning: the imported config, a folder of the user's images, init_weights; the run
    counts its own steps from 0 with a new optimizer, and its weights and their EMA move away
    from the imported ones only by lr's small steps (under 1% of their distance to a new UNet's)."""
    state_dict, config = import_weights(str(small_diffusers_unet(seed=4).save_pretrained(tmp_path / "hub")
                                             or tmp_path / "hub"), T=10)
    write_imported(state_dict, config, str(tmp_path / "official"))
    tuned = trained(image_folder, tmp_path / "tuned", **{**config, "state": "train", "epoch": 1, "batch_size": 8,
                    "img_size": 16, "init_weights": str(tmp_path / "official" / "ckpt_official_.pt"),
                    "save_weight_dir": str(tmp_path / "tuned")})
    assert (tuned["epoch"], tuned["step"]) == (1, 2)
    assert all(state["step"] == 2 for state in tuned["optimizer"]["state"].values())
    fresh = UNet(10, 32, [1, 2], [1], 1, 0.1).state_dict()
    for part in ("model", "ema"):
        weights = tuned[part] if part == "model" else {k[len("module."):]: v for k, v in tuned["ema"].items()
                                                         if k.startswith("module.")}
        moved = sum((weights[k] - state_dict[k]).norm() ** 2 for k in state_dict) ** 0.5
        away = sum((fresh[k] - state_dict[k]).norm() ** 2 for k in state_dict) ** 0.5
        assert moved < 0.01 * away, part


@pytest.mark.parametrize("world_size, accumulate", [(1, 4), (2, 2), (4, 2)])
def test_each_image_of_a_step_gets_its_numbers_whatever_the_processes_and_micro_batches(world_size, accumulate):
    """The draws of one process with the step's 8 images in one batch, against each process's
    micro-batches; process `rank` holds images rank, rank + world_size, ... of the step (as
    DistributedSampler deals them), its micro-batch m the m-th accumulate-th of those."""
    whole = GlobalBatchRandomness(torch.Generator().manual_seed(3))
    expected_t, expected_noise = whole.randint(1000, 8, "cpu"), whole.randn_like(torch.zeros(8, 2))
    local = 8 // (world_size * accumulate)
    for rank in range(world_size):
        draws = AccumulatedDraws(torch.Generator().manual_seed(3), rank, world_size, accumulate)
        for m, (_, last) in enumerate(draws.micro_batches([None] * accumulate)):
            t, noise = draws.randint(1000, local, "cpu"), draws.randn_like(torch.zeros(local, 2))
            images = [rank + world_size * j for j in range(m * local, (m + 1) * local)]
            assert torch.equal(t, expected_t[images]) and torch.equal(noise, expected_noise[images])
            assert last == (m == accumulate - 1) and draws.size(local) == 8


def test_a_dataset_smaller_than_one_step_is_refused_before_training(images, tmp_path):
    with pytest.raises(ConfigError, match=r"has 16 images, fewer than one optimizer step takes \(batch_size 4 x "
                                          r"accumulate 8 x 1 process\(es\)\)"):
        trained(images, tmp_path / "ckpt", batch_size=4, accumulate=8)
    assert not (tmp_path / "ckpt" / TRAINING_STATE).exists()


def test_a_missing_init_weights_and_accumulate_0_are_refused_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"init_weights '.*none\.pt' does not exist: give the weights file"):
        checked({**RUN, "init_weights": str(tmp_path / "none.pt")})
    with pytest.raises(ConfigError, match=r"accumulate must be at least 1 \(1: no gradient accumulation\), not 0"):
        checked({**RUN, "accumulate": 0})
