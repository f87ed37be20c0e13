"""The run log (training_log.jsonl), TensorBoard's event files, the sample grids drawn while
training, and the progress bar."""
import json
from pathlib import Path

import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from Diffusion import Train
from Diffusion.Run.Checkpoints import TRAINING_STATE
from Diffusion.Run.Checkpoints import LOG, PREVIEWS, TENSORBOARD


def test_the_log_has_a_line_per_log_every_steps_and_per_epoch(tiny_config, capsys):
    # 16 images of batch 4: 4 steps per epoch
    Train.train({**tiny_config, "epoch": 2, "batch_size": 4, "log_every": 3, "sample_every": 0})
    lines = [json.loads(line) for line in (Path(tiny_config["save_weight_dir"]) / LOG).read_text().splitlines()]
    assert [(line["kind"], line["step"]) for line in lines] == [
        ("step", 3), ("epoch", 4), ("step", 6), ("epoch", 8)]
    for line in lines:
        assert set(line) == {"kind", "epoch", "step", "loss", "lr", "images_per_second", "seconds",
                             "ema_decay", "skipped_steps"}
        assert line["loss"] > 0 and line["images_per_second"] > 0 and line["skipped_steps"] == 0
    assert [line["epoch"] for line in lines] == [0, 0, 1, 1]
    assert lines[1]["ema_decay"] == min(tiny_config["ema_decay"], 5 / 14)  # 4 updates: n = 4 next
    assert lines[-1]["seconds"] >= lines[0]["seconds"]
    bar = capsys.readouterr().err
    assert "img_s=" in bar and "eta=" in bar and "mean_loss=" in bar


def test_tensorboard_gets_the_scalars_and_the_sample_grids(tiny_config):
    Train.train({**tiny_config, "epoch": 2, "batch_size": 8, "log_every": 1, "sample_every": 1})
    folder = Path(tiny_config["save_weight_dir"])
    events = EventAccumulator(str(folder / TENSORBOARD)).Reload()
    assert {"step/loss", "step/lr", "step/images_per_second", "epoch/loss", "epoch/ema_decay"} <= set(
        events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("step/loss")] == [1, 2, 3, 4]
    assert len(events.Images("samples")) == 2
    for epoch in (0, 1):  # 16 samples, 4 per row, of 16 pixels with 2 of padding
        with Image.open(folder / PREVIEWS / f"epoch_{epoch}.png") as grid:
            assert grid.size == (74, 74)


def test_drawing_sample_grids_leaves_the_training_as_it_would_be(tiny_config, tmp_path):
    weights = []
    for sample_every in (1, 0):
        folder = tmp_path / f"every_{sample_every}"
        Train.train({**tiny_config, "epoch": 2, "sample_every": sample_every, "save_weight_dir": str(folder)})
        weights.append(torch.load(folder / TRAINING_STATE, weights_only=True)["model"])
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
