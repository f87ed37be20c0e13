"""Mistakes caught before the work, each with one sentence: a schedule that leaves the image in
x_T, numbers that are not finite, image names PIL cannot write, folders that cannot be written,
saves that fail, unreadable data, checkpoints that do not fit or are no weights files; and the
class names eval prints."""
import gzip
import math
import os
import pickle
import re
import resource
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

import Main
import MainCondition
from conftest import (
    REPO,
    TINY_CONDITIONAL,
    TINY_UNCONDITIONAL,
    as_arguments,
    checked,
    defaults_of,
    parsed,
    run_or_fail,
    run_script,
    script_config,
    training_dataset_of,
    write_images,
    write_mnist_files,
)
from Diffusion import Train
from Diffusion.Run.Checkpoints import (
    RUN_INFO,
    TRAINING_STATE,
    class_names,
    load_failure,
    read_run_info,
    safe_load,
    save_atomically,
    write_run_info,
)
from Diffusion.Run.Data import CIFAR10_CLASSES
from Diffusion.Run.Checkpoints import SaveFailed
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Data import DataUnavailable
from Diffusion.Run.Sampling import (
    SIGNAL_LEFT_LIMIT,
    beta_T_that_removes_the_signal,
    signal_left_at_T,
    warn_if_x_T_keeps_the_image,
)
from DiffusionFreeGuidence import TrainCondition


def one_sentence_error(process):
    """The single `error:` line of a script that stopped without a traceback."""
    assert process.returncode != 0, process.stdout + process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    errors = [line for line in process.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, process.stderr
    return errors[0]


def schedule_warnings(text):
    return [line for line in text.splitlines() if line.startswith("warning: the schedule")]


def a_file(tmp_path):
    """A regular file: no folder can be made under it, not even by root."""
    path = tmp_path / "a_file.txt"
    path.write_text("not a folder")
    return path


def copy_of(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "ckpt_copy"))


# --- the schedule warning ------------------------------------------------------------------


def test_original_schedules_do_not_warn_and_a_short_one_does_with_a_fix(capsys):
    for T, beta_T in ((1000, 0.02), (500, 0.028)):  # Main.py's and MainCondition.py's
        warn_if_x_T_keeps_the_image(1e-4, beta_T, T)
    assert capsys.readouterr().err == ""

    warn_if_x_T_keeps_the_image(1e-4, 0.02, 200)
    (line,) = capsys.readouterr().err.splitlines()
    assert "T 200" in line and "36.4%" in line and "--beta_T 0.059" in line


@pytest.mark.parametrize("T, expected", [(10, 0.79), (50, 0.23), (200, 0.059), (1000, 0.012)])
def test_suggested_beta_T_is_the_smallest_two_digit_value_that_removes_the_signal(T, expected):
    fix = beta_T_that_removes_the_signal(1e-4, T)
    assert fix == expected
    one_step_less = fix - 10 ** (math.floor(math.log10(fix)) - 1)
    assert signal_left_at_T(1e-4, fix, T) < SIGNAL_LEFT_LIMIT <= signal_left_at_T(1e-4, one_step_less, T)


def test_suggested_beta_T_stays_below_1_for_the_fewest_steps():
    fix = beta_T_that_removes_the_signal(1e-4, 2)
    assert fix < 1 and signal_left_at_T(1e-4, fix, 2) < SIGNAL_LEFT_LIMIT


def test_training_of_both_models_warns_once_about_the_schedule(tiny_config, class_folders, capsys):
    Train.train(tiny_config)
    TrainCondition.train({**MainCondition.modelConfig, **TINY_CONDITIONAL, "dataset": str(class_folders),
                          "save_dir": str(Path(tiny_config["save_weight_dir"]) / "condition")})
    assert len(schedule_warnings(capsys.readouterr().err)) == 2


def test_eval_of_both_models_warns_once_about_the_schedule(trained_unconditional, trained_conditional,
                                                           tmp_path, capsys):
    samples = {"state": "eval", "test_load_weight": "ckpt_0_.pt", "sampled_dir": str(tmp_path)}
    Main.main({**trained_unconditional, **samples, "batch_size": 2})
    assert len(schedule_warnings(capsys.readouterr().err)) == 1
    MainCondition.main({**trained_conditional, **samples, "batch_size": 3})
    assert len(schedule_warnings(capsys.readouterr().err)) == 1


# --- numbers that are not finite -----------------------------------------------------------


@pytest.mark.parametrize("text", ["nan", "inf", "0,nan,4"])
def test_guidance_weight_nan_or_inf_on_the_command_line_is_refused_before_sampling(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parsed(["--state", "eval", "--device", "cpu", "--w", text], "MainCondition")
    assert exit_info.value.code == 2
    (message,) = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert "'w'" in message and "finite" in message


@pytest.mark.parametrize("script, key, value", [
    (MainCondition, "w", [0., math.inf]), (MainCondition, "w", -math.inf), (MainCondition, "p_uncond", math.nan),
    (Main, "lr", math.inf), (Main, "beta_1", math.nan), (Main, "dropout", math.nan), (Main, "grad_clip", math.inf)])
def test_non_finite_numbers_are_refused_naming_the_key(script, key, value):
    with pytest.raises(ConfigError) as error:
        checked({key: value, "device": "cpu"}, script.__name__)
    assert f"'{key}'" in str(error.value) and "finite" in str(error.value)


# --- image names ---------------------------------------------------------------------------


def test_sampled_image_name_without_an_image_extension_stops_eval_at_start_up(tmp_path):
    config = {"state": "eval", "device": "cpu", "save_weight_dir": tmp_path / "ckpt",
              "sampled_dir": tmp_path / "samples", "sampledImgName": "samples"}
    message = one_sentence_error(run_script("Main.py", *as_arguments(config), cwd=tmp_path))
    assert "sampledImgName" in message and "'samples'" in message and ".png" in message
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("key, name", [("sampledImgName", "grid.txt"), ("sampledNoisyImgName", "noise"),
                                       ("sampledImgName", "grid.xbm"),  # PIL writes XBM in 1 bit only
                                       ("sampledImgName", "grids/grid.png"), ("sampledImgName", "")])
def test_image_names_pil_cannot_write_are_refused(key, name):
    with pytest.raises(ConfigError, match=key):
        checked({key: name, "device": "cpu"})


@pytest.mark.parametrize("name", ["grid.png", "GRID.PNG", "grid.jpg", "grid.jpeg", "grid.bmp", "grid.tif"])
def test_usual_image_extensions_are_accepted(name):
    assert checked({"sampledImgName": name, "device": "cpu"})["sampledImgName"] == name


# --- folders that cannot be written --------------------------------------------------------


def test_checkpoint_folder_under_a_file_stops_training_at_start_up(tmp_path):
    folder = a_file(tmp_path) / "ckpt"
    config = script_config("Main", TINY_UNCONDITIONAL, dataset=tmp_path / "no_images",
                           save_weight_dir=folder, sampled_dir=tmp_path / "samples")
    message = one_sentence_error(run_script("Main.py", *as_arguments(config), cwd=tmp_path))
    assert "save_weight_dir" in message and str(folder) in message and "a_file.txt" in message


@pytest.mark.parametrize("script, state, key, under", [
    (Main, "train", "save_weight_dir", False), (Main, "train", "save_weight_dir", True),
    (MainCondition, "train", "save_dir", True), (Main, "eval", "sampled_dir", False),
    (MainCondition, "eval", "sampled_dir", True)])
def test_a_folder_the_run_writes_that_is_a_file_or_under_one_is_refused(tmp_path, script, state, key, under):
    folder = a_file(tmp_path) / "out" if under else a_file(tmp_path)
    with pytest.raises(ConfigError) as error:
        checked({"state": state, key: str(folder), "device": "cpu"}, script.__name__)
    assert str(error.value).startswith(f"{key} '{folder}' cannot be written")
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file.txt"]  # the check made nothing


def test_only_the_folder_the_state_writes_to_is_checked(tmp_path):
    blocked = str(a_file(tmp_path) / "out")
    assert checked({"state": "train", "sampled_dir": blocked, "device": "cpu"})
    assert checked({"state": "eval", "save_weight_dir": blocked, "device": "cpu"})


# --- saves that fail -----------------------------------------------------------------------


def limit_file_size():
    """In the child: no file may grow past 64 KiB, so writing a checkpoint fails as on a full
    disk (Python ignores SIGXFSZ, so the write returns EFBIG instead of killing the process)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_save_that_fails_during_training_names_the_file_and_keeps_the_checkpoints(
        trained_unconditional, tmp_path):
    folder = copy_of(trained_unconditional["save_weight_dir"], tmp_path)
    checkpoints = ["ckpt_0_.pt", TRAINING_STATE]
    before = {name: (folder / name).read_bytes() for name in checkpoints}
    config = {**trained_unconditional, "save_weight_dir": str(folder), "training_load_weight": "last",
              "epoch": 2}
    process = run_script("Main.py", *as_arguments(config), cwd=tmp_path, preexec_fn=limit_file_size)
    message = one_sentence_error(process)
    assert str(folder / "ckpt_1_.pt") in message and "intact" in message
    assert {name: (folder / name).read_bytes() for name in checkpoints} == before
    assert not list(folder.glob("*.tmp")) and not (folder / "ckpt_1_.pt").exists()
    assert len(schedule_warnings(process.stderr)) == 1


def test_a_save_whose_temporary_cannot_be_made_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt_0_.pt"
    save_atomically({"weight": torch.ones(3)}, str(path))
    (tmp_path / "ckpt_0_.pt.tmp").mkdir()  # in the way of the temporary file
    with pytest.raises(SaveFailed) as error:
        save_atomically({"weight": torch.zeros(3)}, str(path))
    assert str(path) in str(error.value) and "intact" in str(error.value)
    assert torch.equal(torch.load(path, weights_only=True)["weight"], torch.ones(3))


# --- data ----------------------------------------------------------------------------------


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def test_unreadable_images_among_good_ones_are_skipped_naming_each_file(tmp_path):
    images = write_images(tmp_path / "images", 14, seed=1)
    truncated = truncate(write_images(tmp_path / "bad", 1, seed=2) / "0.png").rename(images / "truncated.png")
    (images / "not_an_image.png").write_bytes(b"hello")
    config = script_config("Main", {**TINY_UNCONDITIONAL, "T": 10, "img_size": 8, "num_workers": 2},
                           dataset=images, save_weight_dir=tmp_path / "ckpt", sampled_dir=tmp_path / "samples")
    process = run_or_fail("Main.py", *as_arguments(config), cwd=tmp_path)  # 16 files: both batches
    warnings = [line for line in process.stderr.splitlines() if line.startswith("warning: skipping")]
    assert sorted(re.search(r"'(.*?)'", line).group(1) for line in warnings) == [
        str(images / "not_an_image.png"), str(truncated)]
    assert (tmp_path / "ckpt" / "ckpt_0_.pt").is_file()


def test_an_unreadable_image_of_a_class_gives_the_next_image_and_its_label(class_folders, capsys):
    truncate(class_folders / "bird" / "7.png")  # the last bird: the first cat comes next
    config = {**defaults_of("MainCondition"), "dataset": str(class_folders), "img_size": 8, "batch_size": 4}
    dataset = training_dataset_of(config, labelled=True)
    index = dataset.paths.index(str(class_folders / "bird" / "7.png"))
    for _ in range(2):
        image, label = dataset[index]
        assert image.shape == (3, 8, 8) and label == dataset.classes.index("cat")
    (warning,) = capsys.readouterr().err.splitlines()  # once per file
    assert "bird/7.png" in warning and "1 skipped so far" in warning


def test_corrupt_cifar_archive_in_place_is_named_as_corrupt(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    archive = tmp_path / "CIFAR10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"half a download")
    with pytest.raises(DataUnavailable) as error:
        training_dataset_of({**tiny_config, "dataset": "CIFAR10", "data_root": str(tmp_path)})
    message = str(error.value)
    assert str(archive) in message and "corrupt" in message and "delete it" in message
    assert archive.read_bytes() == b"half a download"


def test_fashion_mnist_reads_its_files_from_data_root_fashionmnist_raw(tiny_config, tmp_path):
    data_root = write_mnist_files(tmp_path / "data", "FashionMNIST")
    config = {**tiny_config, "dataset": "FashionMNIST", "data_root": str(data_root), "batch_size": 4}
    dataset = training_dataset_of(config, labelled=True)
    assert isinstance(dataset, torchvision.datasets.FashionMNIST) and len(dataset) == 10
    assert dataset.classes[0] == "T-shirt/top"


def test_unreachable_fashion_mnist_download_names_data_root_fashionmnist_raw(tiny_config, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataUnavailable) as error:
        training_dataset_of({**tiny_config, "dataset": "FashionMNIST", "data_root": str(tmp_path)})
    assert f"put them in {tmp_path / 'FashionMNIST' / 'raw'} (or uncompressed" in str(error.value)
    assert not (tmp_path / "FashionMNIST").exists()


def test_a_recompressed_fashion_mnist_file_is_named_with_the_way_to_use_it(tiny_config, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    archive = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(gzip.compress(b"the same images, compressed again"))
    with pytest.raises(DataUnavailable) as error:
        training_dataset_of({**tiny_config, "dataset": "FashionMNIST", "data_root": str(tmp_path)})
    assert str(archive) in str(error.value) and "gunzip them there" in str(error.value)


# --- checkpoints ---------------------------------------------------------------------------


def test_continuing_on_a_dataset_of_other_classes_names_both_class_counts(trained_conditional, tmp_path):
    two_classes = tmp_path / "two"
    for seed, name in enumerate(["cat", "dog"]):
        write_images(two_classes / name, 6, seed=seed)
    config = {**trained_conditional, "dataset": str(two_classes), "training_load_weight": "ckpt_0_.pt",
              "save_dir": str(copy_of(trained_conditional["save_dir"], tmp_path))}
    with pytest.raises(ConfigError) as error:
        MainCondition.main(config)
    assert "trained on 3 classes" in str(error.value) and "has 2" in str(error.value)


def test_attn_for_the_conditional_model_says_its_attention_is_fixed(capsys):
    with pytest.raises(SystemExit):
        parsed(["--attn", "1"], "MainCondition")
    message = capsys.readouterr().err
    assert "'--attn'" in message and "after every down-path block" in message
    assert "unknown" not in message
    with pytest.raises(ConfigError, match="attention is fixed"):
        MainCondition.main({"attn": [1], "device": "cpu"})


class RunsAShellCommand:
    """Unpickling it calls os.system: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_code_is_refused_without_advice_to_run_it(tiny_config, tmp_path):
    marker = tmp_path / "pwned"
    folder = Path(tiny_config["save_weight_dir"])
    folder.mkdir()
    torch.save({"weight": RunsAShellCommand(f"touch {marker}")}, folder / "ckpt_0_.pt")
    with pytest.raises(ConfigError) as error:
        Main.main({**tiny_config, "state": "eval", "test_load_weight": "ckpt_0_.pt"})
    message = str(error.value)
    assert "ckpt_0_.pt" in message and re.search(r"(posix|nt)\.system", message)
    assert "weights_only" not in message and not marker.exists()


@pytest.mark.parametrize("torch_says, we_say", [
    ("Weights only load failed. ... Re-running `torch.load` with `weights_only` set to `False` will "
     "likely succeed ...\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.",
     "call posix.system"),
    ("Weights only load failed. ... `weights_only` set to `False` ...\n\tWeightsUnpickler error: "
     "Unsupported global: GLOBAL __main__.Net was not an allowed global by default.", "pickles __main__.Net"),
    ("Weights only load failed. ... `weights_only` set to `False` ...\nUnsupported operand 149", "not a torch"),
])
def test_torchs_wordings_of_a_refused_file_are_recognised_and_its_advice_dropped(torch_says, we_say):
    message = load_failure(pickle.UnpicklingError(torch_says))
    assert we_say in message and "weights_only" not in message


@pytest.mark.parametrize("content", [b"junk", RunsAShellCommand("true")], ids=["corrupt", "malicious"])
def test_a_bad_training_state_named_stops_training_with_one_sentence(trained_unconditional, tmp_path, content):
    """Named explicitly it stops the run; with `last` it is reported and passed over
    (tests/test_resume.py)."""
    folder = copy_of(trained_unconditional["save_weight_dir"], tmp_path)
    state = folder / TRAINING_STATE
    state.write_bytes(content) if isinstance(content, bytes) else torch.save(content, state)
    config = {**trained_unconditional, "save_weight_dir": str(folder),
              "training_load_weight": TRAINING_STATE, "epoch": 2}
    before = sorted(path.name for path in folder.iterdir())
    if isinstance(content, bytes):  # one real run of the script; the other case in-process
        message = one_sentence_error(run_script("Main.py", *as_arguments(config), cwd=tmp_path))
    else:
        with pytest.raises(ConfigError) as error:
            Main.main(config)
        message = str(error.value)
    assert str(state) in message and "weights_only" not in message
    assert sorted(path.name for path in folder.iterdir()) == before


def test_safe_load_gives_what_torch_load_gives_and_names_a_missing_file(tmp_path):
    saved = {"checkpoint": "ckpt_3_.pt", "optimizer": {"state": {0: {"step": torch.tensor(4.)}}}}
    torch.save(saved, tmp_path / "state.pt")
    loaded = safe_load(tmp_path / "state.pt", "cpu")
    assert loaded["checkpoint"] == "ckpt_3_.pt" and torch.equal(loaded["optimizer"]["state"][0]["step"],
                                                                torch.tensor(4.))
    with pytest.raises(ConfigError, match="missing.pt' cannot be read: No such file"):
        safe_load(tmp_path / "missing.pt", "cpu")


# --- class names at eval -------------------------------------------------------------------


def test_run_info_merges_entries_and_is_empty_when_absent_or_unreadable(tmp_path):
    assert read_run_info(tmp_path) == {}
    write_run_info(tmp_path, classes=["cat", "dog"])
    write_run_info(tmp_path, epochs=3)
    assert read_run_info(tmp_path) == {"classes": ["cat", "dog"], "epochs": 3}
    assert sorted(path.name for path in tmp_path.iterdir()) == [RUN_INFO]
    (tmp_path / RUN_INFO).write_text("{not json")
    assert read_run_info(tmp_path) == {}


def test_conditional_eval_names_the_classes_of_the_rows(trained_conditional, tmp_path, capsys):
    config = {**trained_conditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sampled_dir": str(tmp_path), "batch_size": 3}
    MainCondition.main(config)
    assert "rows: airplane, bird, cat (classes [0, 1, 2])" in capsys.readouterr().out
    MainCondition.main({**config, "labels": [2, 0]})
    assert "rows: cat, airplane (classes [2, 0])" in capsys.readouterr().out


def test_class_names_without_run_info_are_cifar10s_or_the_indices(tmp_path):
    assert class_names(tmp_path, 10, "CIFAR10") == list(CIFAR10_CLASSES)  # the original's checkpoint
    assert class_names(tmp_path, 10, "MNIST") == [str(i) for i in range(10)]
    write_run_info(tmp_path, classes=["cat", "dog"])  # of another run: not 3 classes
    assert class_names(tmp_path, 3, "CIFAR10") == ["0", "1", "2"]


# --- README --------------------------------------------------------------------------------


def test_readme_says_how_to_install_the_cpu_only_build_of_pytorch():
    readme = (REPO / "README.md").read_text()
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
