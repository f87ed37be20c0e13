"""Training, eval, checkpoints and data of the unconditional DDPM (Main.py, Diffusion/Train.py)."""
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import Main
from conftest import as_arguments, grid_size, run_or_fail, training_dataset_of
from Diffusion import Train
from Diffusion.Run.Checkpoints import RUN_INFO, TRAINING_STATE, save_atomically
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Data import DataUnavailable
from Diffusion.Run.Data import training_loader
from Diffusion.Run.Data import EpochSampler
from Diffusion.Run.Processes import Process
from Diffusion.Run.Checkpoints import LOG, TENSORBOARD
from Diffusion.Run.TrainingState import TrainingState, begin_or_continue
from Scheduler import GradualWarmupScheduler


def files_in(folder):
    return sorted(path.name for path in Path(folder).iterdir())


def contents(folder, names):
    return {name: (Path(folder) / name).read_bytes() for name in names}


# --- the training run of Main.py ----------------------------------------------------------


def test_training_run_writes_a_plain_state_dict_and_the_training_state(trained_unconditional):
    config = trained_unconditional
    folder = Path(config["save_weight_dir"])
    assert files_in(folder) == ["ckpt_0_.pt", RUN_INFO, TENSORBOARD, LOG, TRAINING_STATE]

    state_dict = torch.load(folder / "ckpt_0_.pt", weights_only=True)
    assert isinstance(state_dict, dict)
    assert all(torch.is_tensor(value) for value in state_dict.values())
    model = Train.unet_of(config)
    assert list(state_dict) == list(model.state_dict())
    model.load_state_dict(state_dict, strict=True)

    training_state = torch.load(folder / TRAINING_STATE, weights_only=True)
    assert (training_state["epoch"], training_state["step_in_epoch"]) == (1, 0)
    steps = {float(s["step"]) for s in training_state["optimizer"]["state"].values()}
    assert steps == {2.}  # 16 images, batch_size 8: two optimizer steps


def test_eval_writes_noise_and_sample_grids_of_the_expected_size(trained_unconditional, tmp_path):
    config = {**trained_unconditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sampled_dir": tmp_path / "samples", "batch_size": 5, "nrow": 2, "clip_denoised": True}
    run_or_fail("Main.py", *as_arguments(config), cwd=tmp_path)
    grids = []
    for name in (config["sampledNoisyImgName"], config["sampledImgName"]):
        with Image.open(tmp_path / "samples" / name) as grid:
            assert grid.size == grid_size(5, 2, config["img_size"]) == (22, 32)
            assert grid.mode == "RGB"
            grids.append(np.asarray(grid))
    assert not np.array_equal(*grids)
    # eval does not write to the checkpoint folder
    assert files_in(config["save_weight_dir"]) == ["ckpt_0_.pt", RUN_INFO, TENSORBOARD, LOG, TRAINING_STATE]


# --- eval errors ---------------------------------------------------------------------------


def eval_error(config):
    with pytest.raises(ConfigError) as error:
        Main.main({**config, "state": "eval"})
    assert not os.path.exists(config["sampled_dir"])
    return str(error.value)


def test_eval_of_a_missing_checkpoint_lists_the_checkpoints_present(trained_unconditional, tmp_path):
    message = eval_error({**trained_unconditional, "test_load_weight": "ckpt_9_.pt",
                          "sampled_dir": str(tmp_path / "samples")})
    assert "ckpt_9_.pt" in message and "ckpt_0_.pt" in message


def test_eval_in_an_empty_folder_says_to_train_first(tiny_config):
    message = eval_error({**tiny_config, "test_load_weight": "ckpt_0_.pt"})
    assert "no checkpoints" in message and "train" in message


def test_eval_of_a_checkpoint_of_another_size_names_the_differing_keys(trained_unconditional, tmp_path):
    message = eval_error({**trained_unconditional, "test_load_weight": "ckpt_0_.pt", "channel": 64,
                          "T": 20, "sampled_dir": str(tmp_path / "samples")})
    assert "channel 32 (config: 64)" in message and "T 10 (config: 20)" in message
    assert "num_res_blocks" not in message


def test_eval_of_a_conditional_checkpoint_says_to_use_main_condition(trained_unconditional,
                                                                    trained_conditional, tmp_path):
    message = eval_error({**trained_unconditional, "test_load_weight": "ckpt_0_.pt",
                          "save_weight_dir": trained_conditional["save_dir"],
                          "sampled_dir": str(tmp_path / "samples")})
    assert "MainCondition.py" in message


@pytest.mark.parametrize("content, says", [(b"not a checkpoint", "not a torch weights file"),
                                           ({"weights": [1, 2]}, "plain state_dict")])
def test_eval_of_a_file_that_is_no_state_dict_says_so(tiny_config, content, says):
    path = Path(tiny_config["save_weight_dir"]) / "ckpt_0_.pt"
    path.parent.mkdir()
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    message = eval_error({**tiny_config, "test_load_weight": "ckpt_0_.pt"})
    assert says in message and "ckpt_0_.pt" in message


# --- snapshots and continuing from weights -----------------------------------------------


def train(config, **changes):
    Train.train({**config, **changes})
    return config["save_weight_dir"]


def saved_state(folder):
    return torch.load(Path(folder) / TRAINING_STATE, weights_only=True)


def adam_steps(state):
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


def test_snapshots_every_save_every_epochs_and_the_last_the_newest_keep_last_kept(tiny_config):
    folder = train(tiny_config, epoch=7, save_every=2, keep_last=2)
    # snapshots after epochs 1, 3, 5 and 6 (the last); the newest two are kept; no *.tmp left
    assert files_in(folder) == ["ckpt_5_.pt", "ckpt_6_.pt", RUN_INFO, TENSORBOARD, LOG, TRAINING_STATE]
    state = saved_state(folder)
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (7, 0, 14)
    assert adam_steps(state) == {14}  # 16 images, batch_size 8: two steps per epoch


def test_start_up_line_says_what_the_run_writes_and_about_how_much_disk(tiny_config, capsys):
    train(tiny_config, epoch=5, save_every=2, keep_last=1, sample_every=0, log_every=0)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("this run writes"))
    assert "ckpt_{epoch}_.pt after epoch 1, 3, 4" in line
    assert "3 snapshots" in line and "the newest 1 kept" in line and TRAINING_STATE in line
    assert "MB in all" in line


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "ckpt_0_.pt"
    save_atomically({"weight": torch.ones(3)}, str(path))
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_atomically({"weight": torch.zeros(3), "unpicklable": lambda: None}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["weight"], torch.ones(3))


def test_a_named_snapshot_from_the_end_of_the_training_states_epoch_continues_the_full_state(tiny_config, capsys):
    folder = train(tiny_config, epoch=2, save_every=1)
    train(tiny_config, epoch=3, save_every=1, training_load_weight="ckpt_1_.pt")
    assert f"continuing from {TRAINING_STATE}: epoch 2, step 0" in capsys.readouterr().out
    assert adam_steps(saved_state(folder)) == {6}  # AdamW's 4 steps were loaded, 2 added
    assert files_in(folder)[:3] == ["ckpt_0_.pt", "ckpt_1_.pt", "ckpt_2_.pt"]


def test_a_plain_checkpoint_continues_from_its_weights_at_the_next_epoch(tiny_config, capsys):
    """The original's checkpoints: a plain state_dict, no optimizer, no EMA."""
    folder = Path(tiny_config["save_weight_dir"])
    folder.mkdir()
    weights = Train.unet_of(tiny_config).state_dict()
    table = "time_embedding.timembedding.0.weight"  # frozen: never trained, so it marks the source
    weights[table] = weights[table] + 1.
    torch.save(weights, folder / "ckpt_4_.pt")

    train(tiny_config, epoch=6, ema_decay=0., training_load_weight="ckpt_4_.pt")

    out = capsys.readouterr().out
    assert "continuing from the weights of ckpt_4_.pt at epoch 5, with a new optimizer state" in out
    assert "no EMA" in out
    state = saved_state(folder)
    assert state["epoch"] == 6 and adam_steps(state) == {2}
    assert torch.equal(state["model"][table], weights[table])
    # lr of epoch 5 (no warm-up for 6 epochs): peak * (1 + cos(pi 5 / 6)) / 2
    peak = tiny_config["lr"] * tiny_config["multiplier"]
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        peak * (1 + math.cos(math.pi * 5 / 6)) / 2, rel=1e-6)


def schedule_after_continuing(config):
    """Continue (TrainingState.begin_or_continue) on a model, optimizer and schedule built as Train.fit
    builds them: the first epoch to train and the LR it trains with."""
    model = Train.unet_of(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    scheduler = GradualWarmupScheduler(optimizer, config["multiplier"], config["epoch"] // 10,
                                       torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config["epoch"]))
    state = TrainingState(model, None, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                          Process(torch.device("cpu")), config["batch_size"])
    begin_or_continue(state, config["save_weight_dir"], "save_weight_dir", config["training_load_weight"], config["seed"],
                      config["overwrite"])
    return state.epoch, optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("saved_epochs, load, first_epoch", [
    ([0], "ckpt_0_.pt", 1), ([19], "ckpt_19_.pt", 20), ([20], "ckpt_20_.pt", 21),
    ([3, 24], "last", 25), ([3, 24, 150], "ckpt_150_.pt", 151)])
def test_continuing_from_weights_moves_the_lr_schedule_to_the_epoch_after_theirs(
        tiny_config, lr_schedules, saved_epochs, load, first_epoch):
    """Main.py's default schedule (epoch 200, lr 1e-4, multiplier 2) against the original's."""
    config = {**tiny_config, "epoch": Main.modelConfig["epoch"], "lr": Main.modelConfig["lr"],
              "multiplier": Main.modelConfig["multiplier"], "training_load_weight": load}
    (expected,) = [lrs for key, lrs in lr_schedules.items() if key.startswith("Main.py ")]
    weights = Train.unet_of(config).state_dict()
    for epoch in saved_epochs:  # "ckpt_24_" sorts before "ckpt_3_" as text: last is by number
        save_atomically(weights, os.path.join(config["save_weight_dir"], f"ckpt_{epoch}_.pt"))

    got_epoch, lr = schedule_after_continuing(config)

    assert got_epoch == first_epoch
    assert lr == pytest.approx(expected[first_epoch], rel=1e-3)


def test_continuing_from_last_in_an_empty_folder_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="last"):
        train(tiny_config, training_load_weight="last")


def test_continuing_from_a_checkpoint_that_is_not_there_lists_those_that_are(tiny_config):
    save_atomically(Train.unet_of(tiny_config).state_dict(),
                    os.path.join(tiny_config["save_weight_dir"], "ckpt_0_.pt"))
    with pytest.raises(ConfigError) as error:
        train(tiny_config, epoch=3, training_load_weight="ckpt_1_.pt")
    assert "ckpt_1_.pt" in str(error.value) and "ckpt_0_.pt" in str(error.value)


# --- data ----------------------------------------------------------------------------------


def dataset_of(tiny_config, dataset, **changes):
    return training_dataset_of({**tiny_config, "dataset": str(dataset), **changes})


def test_image_folder_is_searched_recursively(tiny_config, image_folder):
    assert len(dataset_of(tiny_config, image_folder)) == 16  # 8 of them in image_folder/more


def test_every_image_becomes_rgb_of_img_size_in_minus_1_1(tiny_config, odd_images):
    dataset = dataset_of(tiny_config, odd_images, batch_size=2)
    names = [Path(path).name for path in dataset.paths]
    assert sorted(names) == ["black.png", "gray.png", "rgba.png", "white.jpg"]  # notes.txt skipped
    images = {name: dataset[index][0] for index, name in enumerate(names)}
    for name, image in images.items():
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32, name
        assert -1 <= image.min() and image.max() <= 1, name
    gray = images["gray.png"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert gray.std() > 0.1
    assert torch.equal(images["black.png"], torch.full((3, 16, 16), -1.))
    assert torch.allclose(images["white.jpg"], torch.ones(3, 16, 16), atol=1e-2)


def test_loader_gives_full_shuffled_batches_of_images_and_labels(tiny_config, image_folder):
    config = {**tiny_config, "batch_size": 6}
    dataset = dataset_of(config, image_folder)
    loader = training_loader(dataset, config["batch_size"], 0, EpochSampler(dataset, Process(torch.device("cpu")), seed=0),
                             "cpu")
    batches = list(loader)
    assert len(batches) == 2  # 16 images: the incomplete third batch is dropped
    for images, labels in batches:
        assert images.shape == (6, 3, 16, 16) and labels.shape == (6,)


def test_max_images_trains_on_a_fixed_subset(tiny_config, class_folders):
    config = {**tiny_config, "dataset": str(class_folders), "max_images": 5, "batch_size": 4}
    first, second = training_dataset_of(config, labelled=True), training_dataset_of(config, labelled=True)
    assert len(first) == 5 and list(first.indices) == list(second.indices)
    assert first.classes == ["airplane", "bird", "cat"]
    with pytest.raises(ConfigError, match="max_images"):
        training_dataset_of({**config, "batch_size": 6})


def test_dataset_smaller_than_batch_size_is_refused(tiny_config, image_folder):
    with pytest.raises(ConfigError) as error:
        dataset_of(tiny_config, image_folder, batch_size=32)
    assert "16 images" in str(error.value) and "batch_size 32" in str(error.value)


def test_missing_image_folder_is_refused(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        dataset_of(tiny_config, tmp_path / "nowhere")


def test_unknown_dataset_name_is_refused(tiny_config):
    with pytest.raises(ConfigError) as error:
        dataset_of(tiny_config, "CIFAR11")
    assert "'CIFAR11'" in str(error.value) and "folder" in str(error.value)


def test_torchvision_dataset_loads_offline_when_its_files_exist(tiny_config, mnist_root):
    dataset = dataset_of(tiny_config, "MNIST", data_root=str(mnist_root), batch_size=4)
    assert isinstance(dataset, torchvision.datasets.MNIST) and len(dataset) == 10
    image, label = dataset[3]
    assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1
    assert label == 3
    assert len(training_dataset_of({**tiny_config, "dataset": "MNIST", "data_root": str(mnist_root),
                                 "batch_size": 4}, labelled=True).classes) == 10


def test_downloaded_dataset_in_the_working_directory_is_not_taken_for_an_image_folder(
        tiny_config, mnist_root, monkeypatch):
    # The default data_root "." downloads CIFAR10 into ./CIFAR10: the next run must use it.
    monkeypatch.chdir(mnist_root)
    dataset = dataset_of(tiny_config, "MNIST", data_root=".", batch_size=4)
    assert isinstance(dataset, torchvision.datasets.MNIST) and len(dataset) == 10


def test_unreachable_download_says_what_to_download_and_where(tiny_config, tmp_path, monkeypatch):
    # A port nothing listens on: the download fails whether this machine is online or not.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataUnavailable) as error:
        dataset_of(tiny_config, "CIFAR10", data_root=str(tmp_path))
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message
    assert str(tmp_path / "CIFAR10") in message
    assert not (tmp_path / "CIFAR10").exists()  # the failed download left no empty folder


def test_unreachable_mnist_download_names_the_folder_mnist_reads(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataUnavailable) as error:
        dataset_of(tiny_config, "MNIST", data_root=str(tmp_path))
    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message  # the folder MNIST downloads to and reads
    assert not (tmp_path / "MNIST").exists()  # the failed download left no empty folder


# --- grayscale images as one channel -------------------------------------------------------


def test_one_image_channel_trains_samples_gray_and_is_named_when_it_does_not_fit(tiny_config, mnist_root, tmp_path):
    config = {**tiny_config, "dataset": "MNIST", "data_root": str(mnist_root), "img_channels": 1,
              "batch_size": 5, "sample_every": 1}
    images, _ = training_dataset_of(config)[0]
    assert images.shape == (1, 16, 16)
    Train.train(config)
    folder = Path(config["save_weight_dir"])
    assert torch.load(folder / "ckpt_0_.pt", weights_only=True)["head.weight"].shape == (32, 1, 3, 3)
    Main.main({**config, "state": "eval", "test_load_weight": "ckpt_0_.pt", "batch_size": 2})
    with Image.open(Path(config["sampled_dir"]) / config["sampledImgName"]) as grid:
        pixels = np.asarray(grid.convert("RGB"))
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])
    with pytest.raises(ConfigError, match=r"img_channels 1 \(config: 3\)"):
        Main.main({**config, "state": "eval", "test_load_weight": "ckpt_0_.pt", "img_channels": 3})
