"""The denoising process made visible: a picture of a few samples on their way from noise to
image, and an animated GIF of the whole grid.

The process of one sampler run has steps + 1 states, x_T first and the final image last; each
state but the last also gives the x_0 the model predicts from it (the final image predicts
itself). `process_frames` evenly spaced states are kept.
"""
import os

import torch
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm

from Diffusion.Machinery.Images import grid_of, save_grid
from Diffusion.Machinery.Sampling import steps_of

FRAME_MILLISECONDS = 150  # each GIF frame, but the last
LAST_FRAME_MILLISECONDS = 2000  # the samples stay a while before the loop starts again


def frames_of(config):
    """How many states the process shows: process_frames, but no more than there are."""
    return min(config["process_frames"], steps_of(config) + 1)


class ProcessRecorder:
    """Pass as the sampler's on_step, then call finish(x_0) with its result: keeps `frames`
    evenly spaced states out of the steps + 1 of a run. `x_t` and `x_0` are then [F, B, C, H, W]:
    the states and the x_0 predicted from each. The kept tensors stay on the device."""

    def __init__(self, steps, frames):
        self.kept_states = set(torch.linspace(0, steps, frames).round().long().tolist()) if frames else set()
        self.state = 0
        self.states, self.predictions = [], []

    def __call__(self, x_t, x_0):
        if self.state in self.kept_states:
            self.states.append(x_t)
            self.predictions.append(x_0)
        self.state += 1

    def finish(self, x_0):
        self(x_0, x_0)
        self.x_t, self.x_0 = torch.stack(self.states), torch.stack(self.predictions)


def process_picture(x_t, x_0):
    """One row per sample: x_t [F, R, C, H, W] at the F kept states from noise to image, and
    beside them x_0 [F, R, C, H, W] predicted at the same states. -> [2, 3, H', W']: the two
    blocks, for save_grid to put side by side."""
    def block(frames):
        return make_grid(frames.transpose(0, 1).flatten(0, 1), nrow=frames.shape[0], pad_value=-1.)
    return torch.stack([block(x_t), block(x_0)])


def save_process_picture(x_t, x_0, folder, name):
    """process_picture(x_t, x_0) as a PNG: x_t on the left, predicted x_0 on the right."""
    save_grid(process_picture(x_t, x_0), folder, name, nrow=2)


def save_process_gif(frames, nrow, folder, name):
    """An animated GIF, one frame per kept state: frames [F, N, 3, H, W] in [-1, 1], each laid
    out as a grid of `nrow` images per row (as the grid of samples); it loops forever."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    pictures = [to_pil_image(grid_of(frame, nrow)) for frame in frames.cpu()]
    durations = [FRAME_MILLISECONDS] * (len(pictures) - 1) + [LAST_FRAME_MILLISECONDS]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    tqdm.write(f"wrote {path}")
