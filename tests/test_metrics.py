"""FID and IS through torchmetrics, with a tiny stand-in feature extractor so that nothing is
downloaded: a folder scored against itself, against noisier copies, and Main.py --state fid."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import Main
from conftest import as_arguments, defaults_of, run_or_fail
from benchmarks.stand_in_classifier import StandInClassifier, save_extractor
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Metrics import report_scores, statistics_file


def smooth_images(folder, count, size=16, seed=0):
    """`count` PNGs of random colour gradients: images with structure for noise to destroy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    ramp = np.linspace(0., 1., size)
    for index in range(count):
        low, high = rng.uniform(0, 255, (2, 3))
        image = low + (high - low) * ramp[:, None, None] * rng.uniform(0.5, 1.)
        image = np.broadcast_to(image, (size, size, 3))
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{index}.png")
    return folder


def noisy_copy(source, folder, sigma, seed=1):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        image = np.asarray(Image.open(path), dtype=np.float64) + rng.normal(0, sigma, (16, 16, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / path.name)
    return folder


@pytest.fixture
def tiny_extractor(tmp_path):
    """The TorchScript file of a small random StandInClassifier (16 features, 4 classes)."""
    torch.manual_seed(0)
    path = tmp_path / "classifier.pt"
    save_extractor(StandInClassifier(num_classes=4, width=4), path)
    return path


@pytest.fixture
def metrics_config(tmp_path, tiny_extractor):
    dataset = smooth_images(tmp_path / "training", 48)
    return {**defaults_of("Main"), "dataset": str(dataset), "img_size": 16, "batch_size": 16,
            "num_workers": 0, "device": "cpu", "fid_extractor": str(tiny_extractor),
            "fid_stats_dir": str(tmp_path / "stats")}


def test_fid_of_the_training_images_is_about_0_and_grows_with_noise(metrics_config, tmp_path):
    training = Path(metrics_config["dataset"])
    folders = {"itself": training,
               "noise 10": noisy_copy(training, tmp_path / "noise10", 10),
               "noise 40": noisy_copy(training, tmp_path / "noise40", 40)}
    scores = report_scores(metrics_config, {label: str(folder) for label, folder in folders.items()})
    assert abs(scores["itself"]["fid"]) < 1e-3 * scores["noise 40"]["fid"]
    assert 0 < scores["noise 10"]["fid"] < scores["noise 40"]["fid"]
    assert scores["itself"]["images"] == scores["itself"]["reference_images"] == 48
    assert 1 <= scores["itself"]["is"] <= 4  # between 1 and the number of classes


def test_training_statistics_are_cached_and_reused(metrics_config, tmp_path):
    folder = str(noisy_copy(Path(metrics_config["dataset"]), tmp_path / "noisy", 20))
    first = report_scores(metrics_config, {"noisy": folder})["noisy"]["fid"]
    cache = Path(statistics_file(metrics_config))
    assert cache.is_file() and cache.parent == tmp_path / "stats"
    # the cached statistics are used: the training images are no longer read
    for path in Path(metrics_config["dataset"]).iterdir():
        path.unlink()
    assert report_scores(metrics_config, {"noisy": folder})["noisy"]["fid"] == pytest.approx(first, rel=1e-9)


def test_another_extractor_gets_its_own_statistics(metrics_config, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_extractor(StandInClassifier(num_classes=4, width=4), other)
    assert statistics_file(metrics_config) != statistics_file({**metrics_config, "fid_extractor": str(other)})


def test_state_fid_scores_the_checkpoints_exported_samples(trained_unconditional, tiny_extractor, tmp_path):
    config = {**trained_unconditional, "state": "fid", "test_load_weight": "ckpt_0_.pt",
              "num_samples": 4, "batch_size": 2, "export_dir": tmp_path / "samples",
              "fid_extractor": tiny_extractor, "fid_stats_dir": tmp_path / "stats",
              "sampler": "ddim", "sample_steps": 2}
    process = run_or_fail("Main.py", *as_arguments(config), cwd=tmp_path)
    assert sorted(path.name for path in (tmp_path / "samples").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert "samples: FID" in process.stderr + process.stdout
    assert "4 images" in process.stderr + process.stdout


def test_missing_folder_to_score_is_refused(metrics_config, tmp_path):
    with pytest.raises(ConfigError, match="nothing-here"):
        Main.main({**metrics_config, "state": "fid", "fid_images": str(tmp_path / "nothing-here")})


def test_an_extractor_that_is_not_torchscript_is_refused_before_the_export(trained_unconditional, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(StandInClassifier(num_classes=4, width=4).state_dict(), weights)  # a state_dict, not TorchScript
    config = {**trained_unconditional, "state": "fid", "test_load_weight": "ckpt_0_.pt", "num_samples": 4,
              "batch_size": 2, "export_dir": str(tmp_path / "samples"), "fid_extractor": str(weights),
              "fid_stats_dir": str(tmp_path / "stats")}
    with pytest.raises(ConfigError) as error:
        Main.main(config)
    assert "fid_extractor" in str(error.value) and "torch.jit.save" in str(error.value)
    assert not (tmp_path / "samples").exists()


def test_missing_extractor_file_says_what_to_give(metrics_config, tmp_path):
    with pytest.raises(ConfigError, match="fid_extractor"):
        Main.main({**metrics_config, "state": "fid", "fid_images": metrics_config["dataset"],
                   "fid_extractor": str(tmp_path / "none.pt")})


# --- FID while training ---------------------------------------------------------------------


def test_fid_every_epoch_is_logged_and_leaves_the_training_bit_for_bit(tiny_config, tiny_extractor, tmp_path):
    """fid_every 1: an FID of the EMA weights in each epoch's log line (and TensorBoard); the
    weights are those of a run without it, and a run stopped by SIGTERM in its second epoch and
    continued ends with them too, and with the same FIDs."""
    import signal

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import log_lines, start_script, wait_until
    from Diffusion import Train
    folders = {name: tmp_path / name for name in ("plain", "fid", "continued")}
    config = {**tiny_config, "epoch": 2, "batch_size": 2, "sample_every": 0, "log_every": 1}
    fid = {"fid_every": 1, "fid_samples": 8, "fid_extractor": str(tiny_extractor), "fid_stats_dir": str(tmp_path / "stats")}
    Train.train({**config, "save_weight_dir": str(folders["plain"])})
    run_or_fail("Main.py", *as_arguments({**config, **fid, "save_weight_dir": folders["fid"]}), cwd=tmp_path)
    arguments = as_arguments({**config, **fid, "save_weight_dir": folders["continued"]})
    first = start_script("Main.py", *arguments, cwd=tmp_path)
    wait_until(lambda: any(line["kind"] == "step" and line["epoch"] == 1 for line in log_lines(folders["continued"])),
               first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 128 + signal.SIGTERM
    run_or_fail("Main.py", *arguments, "--training_load_weight", "last", cwd=tmp_path)

    fids = [line["fid"] for line in log_lines(folders["fid"]) if line["kind"] == "epoch"]
    assert len(fids) == 2 and all(np.isfinite(fids)) and fids[0] != fids[1]
    assert [line["fid"] for line in log_lines(folders["continued"]) if line["kind"] == "epoch"] == fids
    events = EventAccumulator(str(folders["fid"] / "tensorboard")).Reload()
    assert [event.value for event in events.Scalars("epoch/fid")] == pytest.approx(fids, rel=1e-6)
    states = {name: torch.load(folder / "training_state.pt", weights_only=True) for name, folder in folders.items()}
    for name in ("fid", "continued"):
        for part in ("model", "ema"):
            assert all(torch.equal(states[name][part][key], value) for key, value in states["plain"][part].items())
