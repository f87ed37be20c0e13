"""Shared fixtures: the reference facts, tiny configs, folders of generated images."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def reference():
    """../shared/reference: layouts.json, golden_small.pt, lr_schedules.json."""
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


@pytest.fixture
def tiny_config(tmp_path, image_folder):
    """Main.py's config shrunk to seconds on a CPU, writing only under tmp_path."""
    import Main
    return {**Main.modelConfig, **TINY_UNCONDITIONAL, "dataset": str(image_folder),
            "save_weight_dir": str(tmp_path / "ckpt"), "sampled_dir": str(tmp_path / "samples")}


def as_arguments(config):
    """A config dict as command-line arguments: --key value."""
    arguments = []
    for key, value in config.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        arguments += [f"--{key}", text]
    return arguments


def run_script(script, *arguments, cwd=None):
    """Run `python <script> arguments` from the repo as a user would; returns the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *arguments], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=600)
