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
from torch.optim.lr_scheduler import CosineAnnealingLR

import Main
from conftest import as_arguments, grid_size, run_or_fail
from Diffusion import Train
from Diffusion.Checkpoint import TRAINING_STATE, save_atomically
from Diffusion.Config import ConfigError
from Diffusion.Data import training_dataset, training_loader
from Scheduler import GradualWarmupScheduler


def files_in(folder):
    return sorted(path.name for path in Path(folder).iterdir())


def contents(folder, names):
    return {name: (Path(folder) / name).read_bytes() for name in names}


# --- the training run of Main.py ----------------------------------------------------------


def test_training_run_writes_a_plain_state_dict_and_the_optimizer_state(trained_unconditional):
    config = trained_unconditional
    folder = Path(config["save_weight_dir"])
    assert files_in(folder) == ["ckpt_0_.pt", TRAINING_STATE]

    state_dict = torch.load(folder / "ckpt_0_.pt", weights_only=True)
    assert isinstance(state_dict, dict)
    assert all(torch.is_tensor(value) for value in state_dict.values())
    model = Train.unet_of(config)
    assert list(state_dict) == list(model.state_dict())
    model.load_state_dict(state_dict, strict=True)

    training_state = torch.load(folder / TRAINING_STATE, weights_only=True)
    assert training_state["checkpoint"] == "ckpt_0_.pt"
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
    assert files_in(config["save_weight_dir"]) == ["ckpt_0_.pt", TRAINING_STATE]


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


# --- checkpoints and resuming --------------------------------------------------------------


def train(config, **changes):
    Train.train({**config, **changes})
    return config["save_weight_dir"]


def training_state(folder):
    state = torch.load(Path(folder) / TRAINING_STATE, weights_only=True)
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    return state["checkpoint"], steps, state["optimizer"]["param_groups"][0]["lr"]


def test_training_writes_a_checkpoint_per_epoch_and_leaves_no_temporary_file(tiny_config):
    folder = train(tiny_config, epoch=2)
    assert files_in(folder) == ["ckpt_0_.pt", "ckpt_1_.pt", TRAINING_STATE]  # no *.tmp
    assert training_state(folder)[:2] == ("ckpt_1_.pt", {4})


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "ckpt_0_.pt"
    save_atomically({"weight": torch.ones(3)}, str(path))
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_atomically({"weight": torch.zeros(3), "unpicklable": lambda: None}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["weight"], torch.ones(3))


def test_training_continues_from_a_named_checkpoint_at_the_next_epoch(tiny_config):
    folder = train(tiny_config, epoch=2)
    # Mark the checkpoint to continue from: the frozen time-embedding table is never trained.
    path = Path(folder) / "ckpt_1_.pt"
    state_dict = torch.load(path, weights_only=True)
    table = "time_embedding.timembedding.0.weight"
    state_dict[table] = state_dict[table] + 1.
    torch.save(state_dict, path)
    before = contents(folder, ["ckpt_0_.pt", "ckpt_1_.pt"])

    train(tiny_config, epoch=3, training_load_weight="ckpt_1_.pt")

    assert files_in(folder) == ["ckpt_0_.pt", "ckpt_1_.pt", "ckpt_2_.pt", TRAINING_STATE]
    assert contents(folder, ["ckpt_0_.pt", "ckpt_1_.pt"]) == before
    resumed = torch.load(Path(folder) / "ckpt_2_.pt", weights_only=True)
    assert torch.equal(resumed[table], state_dict[table])  # the weights came from ckpt_1_.pt
    checkpoint, steps, lr = training_state(folder)
    assert (checkpoint, steps) == ("ckpt_2_.pt", {6})  # AdamW's 4 steps were loaded, 2 added
    # lr after the schedule's 3rd step (epoch 3, no warm-up): peak * (1 + cos(2 pi / 3)) / 2
    peak = tiny_config["lr"] * tiny_config["multiplier"]
    assert lr == pytest.approx(peak * (1 + math.cos(2 * math.pi / 3)) / 2, rel=1e-6)


def test_training_continues_from_the_last_checkpoint_by_epoch_number(tiny_config):
    folder = tiny_config["save_weight_dir"]
    model = Train.unet_of(tiny_config)
    optimizer = torch.optim.AdamW(model.parameters())
    for epoch in (2, 10):  # "ckpt_10_" sorts before "ckpt_2_" as text
        Train.save_checkpoint(model, optimizer, folder, epoch)
    before = contents(folder, ["ckpt_2_.pt", "ckpt_10_.pt"])

    train(tiny_config, epoch=12, training_load_weight="last")

    assert files_in(folder) == ["ckpt_10_.pt", "ckpt_11_.pt", "ckpt_2_.pt", TRAINING_STATE]
    assert contents(folder, ["ckpt_2_.pt", "ckpt_10_.pt"]) == before
    assert training_state(folder)[0] == "ckpt_11_.pt"


def schedule_after_resume(config, folder):
    """resume() on fresh model, optimizer and schedule built as Train.fit builds them: the
    first epoch to train and the LR it trains with."""
    model = Train.unet_of(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    scheduler = GradualWarmupScheduler(
        optimizer, multiplier=config["multiplier"], warm_epoch=config["epoch"] // 10,
        after_scheduler=CosineAnnealingLR(optimizer, T_max=config["epoch"], eta_min=0))
    first_epoch = Train.resume(config, model, optimizer, scheduler, folder, torch.device("cpu"))
    return first_epoch, optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("saved_epochs, load, first_epoch", [
    ([0], "ckpt_0_.pt", 1), ([19], "ckpt_19_.pt", 20), ([20], "ckpt_20_.pt", 21),
    ([3, 24], "last", 25), ([3, 24, 150], "ckpt_150_.pt", 151)])
def test_resume_moves_the_lr_schedule_to_the_epoch_after_the_checkpoint(
        tiny_config, lr_schedules, saved_epochs, load, first_epoch):
    """Main.py's default schedule (epoch 200, lr 1e-4, multiplier 2) against the original's."""
    config = {**tiny_config, "epoch": Main.modelConfig["epoch"], "lr": Main.modelConfig["lr"],
              "multiplier": Main.modelConfig["multiplier"], "training_load_weight": load}
    (expected,) = [lrs for key, lrs in lr_schedules.items() if key.startswith("Main.py ")]
    model = Train.unet_of(config)
    for epoch in saved_epochs:
        Train.save_checkpoint(model, torch.optim.AdamW(model.parameters()), config["save_weight_dir"], epoch)

    got_epoch, lr = schedule_after_resume(config, config["save_weight_dir"])

    assert got_epoch == first_epoch
    assert lr == pytest.approx(expected[first_epoch], rel=1e-3)


def test_resume_from_last_in_an_empty_folder_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="last"):
        train(tiny_config, training_load_weight="last")


def test_resume_from_a_checkpoint_that_is_not_there_lists_those_that_are(tiny_config):
    model = Train.unet_of(tiny_config)
    Train.save_checkpoint(model, torch.optim.AdamW(model.parameters()), tiny_config["save_weight_dir"], 0)
    with pytest.raises(ConfigError) as error:
        train(tiny_config, epoch=3, training_load_weight="ckpt_1_.pt")
    assert "ckpt_1_.pt" in str(error.value) and "ckpt_0_.pt" in str(error.value)


# --- data ----------------------------------------------------------------------------------


def dataset_of(tiny_config, dataset, **changes):
    return training_dataset({**tiny_config, "dataset": str(dataset), **changes})


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
    loader = training_loader(dataset_of(config, image_folder), config, "cpu")
    batches = list(loader)
    assert len(batches) == 2  # 16 images: the incomplete third batch is dropped
    for images, labels in batches:
        assert images.shape == (6, 3, 16, 16) and labels.shape == (6,)


def test_max_images_trains_on_a_fixed_subset(tiny_config, class_folders):
    config = {**tiny_config, "dataset": str(class_folders), "max_images": 5, "batch_size": 4}
    first, second = training_dataset(config, labelled=True), training_dataset(config, labelled=True)
    assert len(first) == 5 and list(first.indices) == list(second.indices)
    assert first.classes == ["airplane", "bird", "cat"]
    with pytest.raises(ConfigError, match="max_images"):
        training_dataset({**config, "batch_size": 6})


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
    assert len(training_dataset({**tiny_config, "dataset": "MNIST", "data_root": str(mnist_root),
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
    with pytest.raises(ConfigError) as error:
        dataset_of(tiny_config, "CIFAR10", data_root=str(tmp_path))
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message
    assert str(tmp_path / "CIFAR10") in message
    assert not (tmp_path / "CIFAR10").exists()  # the failed download left no empty folder


def test_unreachable_mnist_download_names_the_folder_mnist_reads(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(ConfigError) as error:
        dataset_of(tiny_config, "MNIST", data_root=str(tmp_path))
    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message  # the folder MNIST downloads to and reads
    assert not (tmp_path / "MNIST").exists()  # the failed download left no empty folder
