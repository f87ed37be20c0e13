"""What eval writes besides the grids: the picture and the GIF of the denoising process, and
num_samples single images, continued after an interruption."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import Main
import MainCondition
from conftest import grid_size
from Diffusion.Diffusion import GaussianDiffusionSampler
from Diffusion.Run.Evaluation import ProcessRecorder
from Diffusion.Run.Processes import Process
from Diffusion.Run.Sampling import export_samples, starting_noise
from test_diffusion import BETA_1, BETA_T, KnownEps

ONE_CPU_PROCESS = Process(torch.device("cpu"))


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_names(folder):
    return sorted(path.name for path in Path(folder).iterdir())


# --- the denoising process ----------------------------------------------------------------


def test_recorder_keeps_evenly_spaced_states_from_x_T_to_the_samples():
    sampler = GaussianDiffusionSampler(KnownEps(), BETA_1, BETA_T, 10)
    x_T = torch.randn(2, 3, 4, 4) * 0.1
    recorder = ProcessRecorder(steps=10, frames=3)  # states 0, 5 and 10 of 0..10
    x_0 = sampler(x_T, on_step=recorder, progress=False)
    recorder.finish(x_0)
    assert recorder.x_t.shape == recorder.x_0.shape == (3, 2, 3, 4, 4)
    assert torch.equal(recorder.x_t[0], x_T)
    assert torch.equal(recorder.x_t[-1], x_0) and torch.equal(recorder.x_0[-1], x_0)
    assert not torch.equal(recorder.x_t[1], recorder.x_0[1])  # x_t at step 5 and the x_0 it predicts


def test_eval_writes_the_process_picture_and_a_gif_of_the_grid(trained_unconditional, tmp_path):
    config = {**trained_unconditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sampled_dir": str(tmp_path), "batch_size": 5, "nrow": 2, "process_frames": 4}
    Main.main(config)
    size = config["img_size"]
    # 5 rows (min(8, batch_size)) of 4 x_t, then 4 predicted x_0, two blocks side by side
    block_width, block_height = grid_size(5 * 4, 4, size)
    assert (block_width, block_height) == (42, 52)
    picture = pixels(tmp_path / config["sampledProcessImgName"])
    assert picture.shape == (block_height + 4, 2 * (block_width + 2) + 2, 3)
    with Image.open(tmp_path / config["sampledProcessGifName"]) as gif:
        assert gif.n_frames == 4
        assert gif.size == grid_size(5, 2, size) == (22, 32)  # the layout of the grid of samples
        assert gif.info["loop"] == 0
        gif.seek(3)
        last_frame = np.asarray(gif.convert("RGB")).astype(int)
    samples = pixels(tmp_path / config["sampledImgName"]).astype(int)
    assert np.abs(last_frame - samples).mean() < 8  # the samples, in the GIF's 256 colours
    assert not list(tmp_path.glob("*.tmp"))  # each picture written under a temporary name, then renamed


def test_process_frames_0_writes_neither(trained_unconditional, tmp_path):
    Main.main({**trained_unconditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
               "sampled_dir": str(tmp_path), "process_frames": 0})
    assert png_names(tmp_path) == sorted([trained_unconditional["sampledNoisyImgName"],
                                          trained_unconditional["sampledImgName"]])


def test_guided_process_has_a_row_per_class_and_w_and_a_gif_of_the_grids_side_by_side(
        trained_conditional, tmp_path):
    config = {**trained_conditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sampled_dir": str(tmp_path), "batch_size": 6, "w": [0., 2.], "process_frames": 3,
              "sampler": "ddim", "sample_steps": 5}
    MainCondition.main(config)
    size = config["img_size"]
    block_width, block_height = grid_size(2 * 3 * 3, 3, size)  # 3 classes x 2 w rows, 3 frames
    picture = pixels(tmp_path / config["sampledProcessImgName"])
    assert picture.shape == (block_height + 4, 2 * (block_width + 2) + 2, 3)
    samples = pixels(tmp_path / config["sampledImgName"])
    with Image.open(tmp_path / config["sampledProcessGifName"]) as gif:
        assert gif.n_frames == 3
        assert gif.size == (samples.shape[1], samples.shape[0])


# --- export -------------------------------------------------------------------------------


def test_eval_exports_exactly_num_samples_images(trained_unconditional, tmp_path):
    config = {**trained_unconditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sampled_dir": str(tmp_path / "grids"), "export_dir": str(tmp_path / "samples"),
              "num_samples": 5, "batch_size": 2, "process_frames": 0, "sampler": "ddim", "sample_steps": 3}
    Main.main(config)
    assert png_names(tmp_path / "samples") == [f"{index:06d}.png" for index in range(5)]
    image = pixels(tmp_path / "samples" / "000004.png")
    assert image.shape == (config["img_size"], config["img_size"], 3)


def test_guided_export_writes_a_folder_per_w_with_the_classes_in_turn(trained_conditional, tmp_path,
                                                                      sampled_labels):
    config = {**trained_conditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sampled_dir": str(tmp_path / "grids"), "export_dir": str(tmp_path / "samples"),
              "num_samples": 4, "batch_size": 3, "w": [0., 1.5], "process_frames": 0}
    MainCondition.main(config)
    assert png_names(tmp_path / "samples") == ["w0", "w1.5"]
    for w in ("w0", "w1.5"):
        assert png_names(tmp_path / "samples" / w) == [f"{index:06d}.png" for index in range(4)]
    # the grids (one per w), then the export batches of each w: images 0-2, then image 3
    assert sampled_labels[2:] == [[1, 2, 3], [1], [1, 2, 3], [1]]


class FailsAfter(torch.nn.Module):
    """KnownEps that raises KeyboardInterrupt on its calls-th call: an export stopped midway."""

    def __init__(self, calls):
        super().__init__()
        self.model, self.calls = KnownEps(scale=0.1), calls

    def forward(self, x_t, t):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.model(x_t, t)


def export_with(model, folder, drawn=None):
    sampler = GaussianDiffusionSampler(model, BETA_1, BETA_T, 5)

    def draw(first, count):
        if drawn is not None:
            drawn.append((first, count))
        return sampler(starting_noise(count, 3, 4, "cpu"), progress=False)
    return export_samples(draw, str(folder), num_samples=7, batch_size=3, process=ONE_CPU_PROCESS, seed=11)


def test_export_continues_after_an_interruption_with_the_same_images(tmp_path):
    assert export_with(KnownEps(scale=0.1), tmp_path / "whole") == 7

    with pytest.raises(KeyboardInterrupt):
        export_with(FailsAfter(calls=5 + 2), tmp_path / "interrupted")  # in the 2nd batch
    assert png_names(tmp_path / "interrupted") == ["000000.png", "000001.png", "000002.png"]
    (tmp_path / "interrupted" / "000001.png").unlink()  # a lost file is drawn again too

    drawn = []
    assert export_with(KnownEps(scale=0.1), tmp_path / "interrupted", drawn) == 5
    assert drawn == [(0, 3), (3, 3), (6, 1)]
    assert png_names(tmp_path / "interrupted") == png_names(tmp_path / "whole")
    for name in png_names(tmp_path / "whole"):
        assert (tmp_path / "interrupted" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()

    drawn.clear()
    assert export_with(KnownEps(scale=0.1), tmp_path / "interrupted", drawn) == 0
    assert drawn == []


def test_process_shows_at_most_every_state_of_a_short_sampler(trained_unconditional, tmp_path):
    config = {**trained_unconditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sampled_dir": str(tmp_path), "sampler": "ddim", "sample_steps": 3, "process_frames": 10}
    Main.main(config)
    with Image.open(tmp_path / config["sampledProcessGifName"]) as gif:
        assert gif.n_frames == 4  # x_T and the state after each of the 3 steps
