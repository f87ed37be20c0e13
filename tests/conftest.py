"""Shared fixtures: the reference facts, tiny configs, folders of generated images."""
import importlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The facts recorded from the original code: ../shared/reference beside the checkout, or the
# copy of it in tests/reference where the checkout stands alone (a CI clone).
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
REFERENCE = SHARED_REFERENCE if SHARED_REFERENCE.is_dir() else REPO / "tests" / "reference"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def reference():
    """The reference facts: layouts.json, golden_small.pt, lr_schedules.json."""
    if not REFERENCE.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def golden(reference):
    return torch.load(reference / "golden_small.pt", weights_only=True)


def write_images(folder, count, size=(20, 24), seed=0, mode="RGB"):
    """`count` random PNGs of `size` (H, W) in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shape = size + ((3,) if mode == "RGB" else ())
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{index}.png")
    return folder


@pytest.fixture
def image_folder(tmp_path):
    """16 random RGB PNGs, half of them in a subfolder (the folder is searched recursively)."""
    root = tmp_path / "images"
    write_images(root, 8, seed=1)
    write_images(root / "more", 8, seed=2)
    return root


@pytest.fixture
def class_folders(tmp_path):
    """Three classes (sorted: airplane, bird, cat) of 8 random PNGs each."""
    root = tmp_path / "classes"
    for seed, name in enumerate(["cat", "airplane", "bird"]):
        write_images(root / name, 8, seed=seed)
    return root


TINY_UNCONDITIONAL = {
    "T": 20, "channel": 32, "channel_mult": [1, 2], "attn": [1], "num_res_blocks": 1,
    "img_size": 16, "batch_size": 8, "epoch": 1, "num_workers": 0, "device": "cpu", "seed": 0,
    "nrow": 4,
}


def variant_of(script_name):
    """The Variant of a script: Main's unconditional model, MainCondition's guided one."""
    from Diffusion.Train import UNCONDITIONAL
    from DiffusionFreeGuidence.TrainCondition import CONDITIONAL
    return {"Main": UNCONDITIONAL, "MainCondition": CONDITIONAL}[script_name]


def checked(config, script_name="Main"):
    """`config` over the script's modelConfig, completed and checked as the script does it."""
    from Diffusion.Run.Config import complete
    variant = variant_of(script_name)
    return complete({**importlib.import_module(script_name).modelConfig, **config}, variant.keys, variant.absent)


def parsed(argv, script_name="Main"):
    """The config a script's command line `argv` gives."""
    from Diffusion.Run.Config import parse_command_line
    variant = variant_of(script_name)
    return parse_command_line(importlib.import_module(script_name).modelConfig, variant.keys, variant.absent, argv)


def defaults_of(script_name):
    """Every key of a script (Main or MainCondition) with its default, as --help shows them:
    the keys' defaults overridden by the script's modelConfig."""
    from Diffusion.Run.Config import defaults
    return defaults(variant_of(script_name).keys, importlib.import_module(script_name).modelConfig)


@pytest.fixture
def tiny_config(tmp_path, image_folder):
    """Main.py's config shrunk to seconds on a CPU, writing only under tmp_path."""
    return {**defaults_of("Main"), **TINY_UNCONDITIONAL, "dataset": str(image_folder),
            "save_weight_dir": str(tmp_path / "ckpt"), "sampled_dir": str(tmp_path / "samples")}


def as_arguments(config):
    """A config dict as command-line arguments: --key value."""
    arguments = []
    for key, value in config.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        arguments += [f"--{key}", text]
    return arguments


def run_script(script, *arguments, cwd=None, preexec_fn=None, env=None):
    """Run `python <script> arguments` from the repo as a user would; returns the process.
    preexec_fn runs in the child before the script (e.g. to set a resource limit); env: more
    environment variables."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *arguments], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def start_script(script, *arguments, cwd=None):
    """Start `python <script> arguments` in the background, as a user would; returns the Popen
    (its output goes to files in cwd: stdout.txt, stderr.txt)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cwd = Path(cwd or REPO)
    return subprocess.Popen([sys.executable, str(REPO / script), *arguments], cwd=cwd, env=env,
                            stdout=open(cwd / "stdout.txt", "w"), stderr=open(cwd / "stderr.txt", "w"))


def wait_until(condition, process, timeout=120):
    """Poll condition() until it holds; fail if `process` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended (status {process.returncode}) before the awaited moment")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the training run")
        time.sleep(0.01)


def log_lines(folder):
    """The records of a run's training_log.jsonl (none yet: [])."""
    path = Path(folder) / "training_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


# One CPU thread, here and in the scripts run: the tiny models gain nothing from more, and on a
# loaded machine OpenMP threads that wait for each other make every step seconds long.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Tiny runs of the two scripts, shared by the tests of training, eval, config and guidance.
# Each script run costs seconds of imports, so each is run once per session.

TINY_CONDITIONAL = {
    "T": 10, "channel": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "img_size": 8,
    "batch_size": 6, "epoch": 1, "num_workers": 0, "device": "cpu", "seed": 0,
}


def grid_size(images, nrow, size):
    """(width, height) in pixels of torchvision's save_image / make_grid grid of `images`
    square images of `size`, `nrow` per row: padding 2 around and between them."""
    columns, rows = min(nrow, images), -(-images // nrow)
    return columns * (size + 2) + 2, rows * (size + 2) + 2


def script_config(script_name, tiny, **paths):
    """A script's config (Main or MainCondition), shrunk by `tiny`, with `paths`."""
    return {**defaults_of(script_name), **tiny, **{key: str(value) for key, value in paths.items()}}


def run_or_fail(script, *arguments, cwd=None):
    """run_script, failing the test with the script's output if it exits with an error."""
    process = run_script(script, *arguments, cwd=cwd)
    if process.returncode != 0:
        pytest.fail(f"{script} {' '.join(arguments)} exited with {process.returncode}:\n"
                    f"{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    return process


@pytest.fixture(scope="session")
def trained_unconditional(tmp_path_factory):
    """`python Main.py` trained for one tiny epoch on 16 generated PNGs (8 of them in a
    subfolder), the keys given in every command-line form: --key value, --key=value, lists as
    1,2, None, booleans. Returns the config it ran with; its checkpoints are in
    config["save_weight_dir"]."""
    root = tmp_path_factory.mktemp("unconditional")
    write_images(root / "images", 8, seed=1)
    write_images(root / "images" / "more", 8, seed=2)
    config = script_config("Main", {**TINY_UNCONDITIONAL, "T": 10, "img_size": 8},
                           dataset=root / "images", save_weight_dir=root / "ckpt",
                           sampled_dir=root / "samples")
    spelled_out = ("epoch", "seed", "clip_denoised")
    arguments = as_arguments({key: value for key, value in config.items() if key not in spelled_out})
    arguments += ["--epoch=1", "--seed=0", "--clip_denoised", "false"]
    run_or_fail("Main.py", *arguments, cwd=root)
    return config


@pytest.fixture(scope="session")
def trained_conditional(tmp_path_factory):
    """`python MainCondition.py` trained for one tiny epoch on three classes (airplane, bird,
    cat) of 8 generated PNGs each. Returns the config it ran with; its checkpoints are in
    config["save_dir"]."""
    root = tmp_path_factory.mktemp("conditional")
    for seed, name in enumerate(["cat", "airplane", "bird"]):
        write_images(root / "classes" / name, 8, seed=seed)
    config = script_config("MainCondition", TINY_CONDITIONAL, dataset=root / "classes",
                           save_dir=root / "ckpt", sampled_dir=root / "samples")
    run_or_fail("MainCondition.py", *as_arguments(config), cwd=root)
    return config


@pytest.fixture
def odd_images(tmp_path):
    """Images that need fitting, nested two folders deep: grayscale 30x30, black 5x7 (smaller
    than img_size), white 40x20 (not square), RGBA 16x16 and a text file to skip."""
    root = tmp_path / "odd"
    (root / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(root / "gray.png")
    Image.new("RGB", (7, 5), (0, 0, 0)).save(root / "a" / "black.png")
    Image.new("RGB", (20, 40), (255, 255, 255)).save(root / "a" / "b" / "white.jpg", quality=100)
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(root / "a" / "rgba.png")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def write_mnist_files(data_root, name="MNIST"):
    """A 10-image dataset of the MNIST family in torchvision's layout,
    data_root/<name>/raw/*-ubyte (as torchvision.datasets.<name>(root=data_root) reads it)."""
    raw = data_root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(4)
    for split, count in (("train", 10), ("t10k", 2)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        labels = np.arange(count, dtype=np.uint8) % 10
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.tobytes())
    return data_root


@pytest.fixture
def mnist_root(tmp_path):
    """A data_root holding a 10-image MNIST in MNIST/raw, so that it loads offline."""
    return write_mnist_files(tmp_path / "data")


@pytest.fixture(scope="module")
def layouts(reference):
    return json.loads((reference / "layouts.json").read_text())


@pytest.fixture(scope="module")
def lr_schedules(reference):
    return json.loads((reference / "lr_schedules.json").read_text())


@pytest.fixture
def sampled_labels(monkeypatch):
    """The labels eval passes to the (real) guided sampler, one list per grid."""
    from Diffusion.Run import Evaluation
    from Diffusion.Run.Sampling import sampler_of
    seen = []

    def recording_sampler_of(config, network):
        sampler = sampler_of(config, network)
        sampler.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[1].tolist()))
        return sampler

    monkeypatch.setattr(Evaluation, "sampler_of", recording_sampler_of)
    return seen


def training_dataset_of(config, labelled=False):
    """The training dataset of a config dict (Data.training_dataset with its keys)."""
    from Diffusion.Run.Data import training_dataset
    return training_dataset(config["dataset"], config["data_root"], config["img_size"], config["img_channels"],
                            config["max_images"], config["batch_size"], labelled)
