"""Training on two CPU processes with torchrun (gloo): both end with the same weights, one set
of files is written, the result is one process's with twice the batch, and the run continues
as on one process. Exporting samples on two processes writes the images one process writes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, as_arguments, log_lines, run_or_fail, script_config, write_images
from Diffusion.Run.Checkpoints import TRAINING_STATE

RUN = {"T": 10, "channel": 32, "channel_mult": [1, 2], "attn": [1], "num_res_blocks": 1,
       "img_size": 8, "epoch": 2, "dropout": 0., "num_workers": 0, "device": "cpu", "seed": 0,
       "save_every": 1, "log_every": 1, "sample_every": 1}


def torchrun(*arguments, cwd, script="Main.py"):
    """python -m torch.distributed.run --standalone --nproc_per_node=2 script arguments."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / script), *arguments]
    process = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if process.returncode != 0:
        pytest.fail(f"torchrun exited with {process.returncode}:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    return process


def arguments(images, folder, sampled_dir=None, **changes):
    return as_arguments(script_config("Main", {**RUN, **changes}, dataset=images, save_weight_dir=folder,
                                      sampled_dir=sampled_dir or Path(folder) / "unused"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Two processes of batch 4 and one process of batch 8, on the same 32 images."""
    root = tmp_path_factory.mktemp("ddp")
    images = write_images(root / "images", 32, size=(8, 8), seed=6)
    process = torchrun(*arguments(images, root / "two", batch_size=4), cwd=root)
    run_or_fail("Main.py", *arguments(images, root / "one", batch_size=8), cwd=root)
    return root, images, process


def test_two_processes_end_with_identical_weights_and_write_one_set_of_files(two_processes):
    root, _, process = two_processes
    assert "the 2 training processes end with identical weights" in process.stdout
    assert process.stdout.count("this run writes into") == 1  # only rank 0 speaks
    folder = root / "two"
    assert sorted(path.name for path in folder.glob("ckpt_*")) == ["ckpt_0_.pt", "ckpt_1_.pt"]
    assert [line["step"] for line in log_lines(folder) if line["kind"] == "epoch"] == [4, 8]
    assert sorted(path.name for path in (folder / "samples").iterdir()) == ["epoch_0.png", "epoch_1.png"]


def test_two_processes_train_as_one_process_with_twice_the_batch(two_processes):
    root, _, _ = two_processes
    two = torch.load(root / "two" / TRAINING_STATE, weights_only=True)
    one = torch.load(root / "one" / TRAINING_STATE, weights_only=True)
    assert two["step"] == one["step"] == 8
    for part in ("model", "ema"):
        for name, expected in one[part].items():
            # float rounding only: the gradients are summed in another order
            assert torch.allclose(two[part][name], expected, rtol=0, atol=1e-4), name
    losses = [(a["loss"], b["loss"]) for a, b in zip(log_lines(root / "two"), log_lines(root / "one"))]
    assert all(a == pytest.approx(b, rel=1e-4) for a, b in losses)


def test_two_processes_continue_a_run_as_one_does(two_processes):
    root, images, _ = two_processes
    process = torchrun(*arguments(images, root / "two", batch_size=4, epoch=3, training_load_weight="last"),
                       cwd=root)
    assert f"continuing from {TRAINING_STATE}: epoch 2, step 0" in process.stdout
    state = torch.load(root / "two" / TRAINING_STATE, weights_only=True)
    assert (state["epoch"], state["step"], state["world_size"]) == (3, 12, 2)
    assert len(state["rng"]) == 2  # each process's generators


def exported_files(folder):
    """{file name: its bytes} of the PNGs under folder."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(Path(folder).rglob("*.png"))}


def test_two_processes_export_the_images_one_process_exports(two_processes):
    """With DPM-Solver++ (the guided export below: UniPC)."""
    root, images, _ = two_processes
    folders = {}
    for name in ("one", "two"):  # 5 images in batches of 2: process 0 draws 2 batches, process 1 one
        sample = arguments(images, root / "one", state="eval", test_load_weight="ckpt_1_.pt", batch_size=2,
                           num_samples=5, seed=3, sampler="dpmsolver++", sample_steps=4,
                           sampled_dir=root / f"eval-{name}", export_dir=root / f"export-{name}")
        process = run_or_fail("Main.py", *sample, cwd=root) if name == "one" else torchrun(*sample, cwd=root)
        folders[name] = exported_files(root / f"export-{name}")
    assert process.stderr.count("export (process 0's share: 1/2)") >= 1
    assert sorted(folders["two"]) == [f"{index:06d}.png" for index in range(5)]
    assert folders["two"] == folders["one"]  # the same images, bit for bit
    grids = sorted(path.name for path in (root / "eval-two").iterdir())
    assert grids == sorted(path.name for path in (root / "eval-one").iterdir())  # written once, by process 0


def test_two_processes_export_the_guided_samples_one_process_exports(trained_conditional, tmp_path):
    folders = {}
    for name in ("one", "two"):
        config = {**trained_conditional, "state": "eval", "test_load_weight": "ckpt_0_.pt", "batch_size": 3,
                  "num_samples": 7, "w": [0., 2.], "seed": 3, "process_frames": 0, "sampler": "unipc",
                  "sample_steps": 4,
                  "sampled_dir": str(tmp_path / f"eval-{name}"), "export_dir": str(tmp_path / f"export-{name}")}
        if name == "one":
            run_or_fail("MainCondition.py", *as_arguments(config), cwd=tmp_path)
        else:
            torchrun(*as_arguments(config), cwd=tmp_path, script="MainCondition.py")
        folders[name] = exported_files(tmp_path / f"export-{name}")
    assert sorted(folders["two"]) == [f"w{w}/{index:06d}.png" for w in (0, 2) for index in range(7)]
    assert folders["two"] == folders["one"]


def rank_of(pid):
    """The torchrun rank of process `pid` (its RANK variable), or None."""
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [item.split(b"=", 1)[1] for item in environment if item.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def test_a_lost_process_stops_the_others_with_one_sentence_and_the_run_continues(tmp_path):
    """kill -9 of process 1 of 2 mid-run: process 0 says in one sentence which process was lost,
    where the saved state is and how to continue (no gloo traceback); continuing works."""
    images = write_images(tmp_path / "images", 32, size=(8, 8), seed=6)
    folder = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "Main.py"), *arguments(images, folder, batch_size=4, epoch=1000, sample_every=0)]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not any(line["kind"] == "epoch" for line in log_lines(folder)):  # the state is saved
        assert run.poll() is None and time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.1)
    (lost,) = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and rank_of(int(pid)) == 1
               and str(REPO / "Main.py").encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(lost, signal.SIGKILL)
    _, stderr = run.communicate(timeout=60)

    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: process 1 of 2 (pid {lost}) stopped, so process 0 stops too: the training "
                      f"state saved last is intact in {folder}; continue with the same torchrun command "
                      f"and --training_load_weight last."]
    assert "GLHF" not in stderr and "[rank0]: Traceback" not in stderr
    saved = torch.load(folder / TRAINING_STATE, weights_only=True)
    torchrun(*arguments(images, folder, batch_size=4, epoch=saved["epoch"] + 1, sample_every=0,
                        training_load_weight="last"), cwd=tmp_path)
    assert torch.load(folder / TRAINING_STATE, weights_only=True)["epoch"] == saved["epoch"] + 1
