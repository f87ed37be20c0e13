"""Stopping and continuing real training runs of Main.py: SIGTERM, Ctrl-C and kill -9 at any
moment, then --training_load_weight last, must end with the very weights of a run that never
stopped (bit for bit on a CPU); corrupt files are reported and passed over; a new run never
overwrites an old one unasked."""
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    as_arguments,
    log_lines,
    run_or_fail,
    run_script,
    script_config,
    start_script,
    wait_until,
    write_images,
)
from Diffusion.Run.Checkpoints import TRAINING_STATE

# 32 images of batch 4: 8 steps per epoch, 24 in all; dropout on, so every generator matters.
RUN = {"T": 10, "channel": 32, "channel_mult": [1, 2], "attn": [1], "num_res_blocks": 1,
       "img_size": 8, "batch_size": 4, "epoch": 3, "dropout": 0.1, "ema_decay": 0.99,
       "num_workers": 0, "device": "cpu", "seed": 0, "save_every": 1, "log_every": 1,
       "sample_every": 1}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("resume") / "images", 32, size=(8, 8), seed=5)


def arguments(images, folder, **changes):
    config = script_config("Main", {**RUN, **changes}, dataset=images, save_weight_dir=folder,
                           sampled_dir=Path(folder) / "unused")
    return as_arguments(config)


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    """The checkpoint folder of the run that was never stopped."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "ckpt"
    run_or_fail("Main.py", *arguments(images, folder), cwd=folder.parent)
    return folder


def assert_same_result(folder, reference):
    """The same raw weights, EMA weights and last snapshot, bit for bit."""
    got = torch.load(Path(folder) / TRAINING_STATE, weights_only=True)
    expected = torch.load(Path(reference) / TRAINING_STATE, weights_only=True)
    assert (got["epoch"], got["step"]) == (expected["epoch"], expected["step"]) == (3, 24)
    for part in ("model", "ema"):
        differing = [name for name in expected[part] if not torch.equal(got[part][name], expected[part][name])]
        assert differing == [], part
    assert (Path(folder) / "ckpt_2_.pt").read_bytes() == (Path(reference) / "ckpt_2_.pt").read_bytes()


def continue_to_the_end(images, folder, **changes):
    return run_or_fail("Main.py", *arguments(images, folder, training_load_weight="last", **changes),
                       cwd=Path(folder).parent)


def saved_position(folder):
    state = torch.load(Path(folder) / TRAINING_STATE, weights_only=True)
    return state["epoch"], state["step_in_epoch"]


@pytest.mark.parametrize("signal_number, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 2)],
                         ids=["SIGTERM-no-workers", "Ctrl-C-2-workers"])
def test_a_stop_in_the_middle_of_an_epoch_saves_and_continues_to_the_same_weights(
        images, uninterrupted, tmp_path, signal_number, workers):
    folder = tmp_path / "ckpt"
    process = start_script("Main.py", *arguments(images, folder, num_workers=workers), cwd=tmp_path)
    wait_until(lambda: any(r["kind"] == "step" and r["step"] >= 10 for r in log_lines(folder)), process)
    process.send_signal(signal_number)
    assert process.wait(timeout=60) == 128 + signal_number
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    assert "--training_load_weight last" in stderr and "training state is saved" in stderr
    epoch, step_in_epoch = saved_position(folder)
    assert epoch == 1 and 0 < step_in_epoch < 8  # stopped inside epoch 1

    continued = continue_to_the_end(images, folder, num_workers=workers)

    assert f"continuing from {TRAINING_STATE}: epoch 1, step {step_in_epoch}" in continued.stdout
    assert_same_result(folder, uninterrupted)


def test_kill_9_after_an_epoch_continues_from_its_end_to_the_same_weights(images, uninterrupted, tmp_path):
    folder = tmp_path / "ckpt"
    process = start_script("Main.py", *arguments(images, folder), cwd=tmp_path)
    wait_until(lambda: any(r["kind"] == "epoch" for r in log_lines(folder)), process)
    process.kill()
    process.wait()
    assert saved_position(folder) == (1, 0)  # the end of epoch 0 (no state is saved within one)

    continue_to_the_end(images, folder)

    assert_same_result(folder, uninterrupted)


def test_kill_9_at_random_moments_and_during_saves_always_leaves_a_run_to_continue(
        images, uninterrupted, tmp_path):
    """The training state is saved after every step here (save_state_minutes tiny), so many
    kills land during a save; one is made to."""
    folder = tmp_path / "ckpt"
    rng = random.Random(0)
    temporary = folder / f"{TRAINING_STATE}.tmp"
    for attempt in range(5):
        load = "last" if attempt else None
        process = start_script("Main.py", *arguments(images, folder, save_state_minutes=1e-6,
                                                     training_load_weight=load), cwd=tmp_path)
        if attempt == 2:
            wait_until(temporary.exists, process)  # in the middle of writing the state
        else:
            done = len(log_lines(folder))
            wait_until(lambda: len(log_lines(folder)) > done + 1 and (folder / TRAINING_STATE).exists(), process)
            time.sleep(rng.uniform(0, 0.3))
        process.kill()
        process.wait()
        torch.load(folder / TRAINING_STATE, weights_only=True)  # whole, whatever the moment

    continue_to_the_end(images, folder, save_state_minutes=1e-6)

    assert_same_result(folder, uninterrupted)


def test_an_unreadable_training_state_is_named_and_the_newest_good_snapshot_used(images, tmp_path):
    folder = tmp_path / "ckpt"
    run_or_fail("Main.py", *arguments(images, folder, epoch=2, sample_every=0), cwd=tmp_path)
    (folder / TRAINING_STATE).write_bytes(b"half a file")
    (folder / "ckpt_1_.pt").write_bytes(b"")

    continued = continue_to_the_end(images, folder, sample_every=0)

    assert f"{folder / TRAINING_STATE}' cannot be read" in continued.stdout
    assert f"{folder / 'ckpt_1_.pt'}' cannot be read" in continued.stdout
    assert "continuing from the weights of ckpt_0_.pt at epoch 1" in continued.stdout
    assert saved_position(folder) == (3, 0) and (folder / "ckpt_2_.pt").is_file()


def test_a_new_run_into_a_folder_holding_a_run_is_refused_with_the_ways_on(images, tmp_path):
    folder = tmp_path / "ckpt"
    run_or_fail("Main.py", *arguments(images, folder, epoch=1, sample_every=0), cwd=tmp_path)
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}

    process = run_script("Main.py", *arguments(images, folder, epoch=1), cwd=tmp_path)

    assert process.returncode == 1 and "Traceback" not in process.stderr
    message = process.stderr.strip().splitlines()[-1]
    assert "already holds a run (ckpt_0_.pt, training_state.pt)" in message
    for way in ("--training_load_weight last", "--save_weight_dir FOLDER", "--overwrite true"):
        assert way in message
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before


def test_overwrite_deletes_the_old_run_and_starts_a_new_one(images, tmp_path):
    folder = tmp_path / "ckpt"
    run_or_fail("Main.py", *arguments(images, folder, epoch=2, sample_every=0), cwd=tmp_path)

    process = run_or_fail("Main.py", *arguments(images, folder, epoch=1, seed=1, sample_every=0,
                                                overwrite=True), cwd=tmp_path)

    assert "deleted the previous run's files" in process.stdout
    assert sorted(path.name for path in folder.glob("ckpt_*")) == ["ckpt_0_.pt"]
    assert saved_position(folder) == (1, 0)
    assert [r["epoch"] for r in log_lines(folder) if r["kind"] == "epoch"] == [0]
