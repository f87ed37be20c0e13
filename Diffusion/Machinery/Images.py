"""Images in and out of the samplers: the starting noise x_T, grids of images, single PNG files.
Tensors are [N, C, H, W] in [-1, 1] (C: 3, or 1 for grayscale), as the model sees them."""
import os

import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm


def starting_noise(count, config, device):
    """x_T ~ N(0, I): [count, img_channels, img_size, img_size] of config."""
    return torch.randn(count, config["img_channels"], config["img_size"], config["img_size"], device=device)


def to_unit_range(images):
    """[-1, 1] -> [0, 1], clamped (x_t of large t reaches beyond [-1, 1])."""
    return (images * 0.5 + 0.5).clamp(0., 1.)


def as_uint8_rgb(images):
    """Images [N, C, H, W] in [-1, 1] -> uint8 [N, 3, H, W], rounded as a PNG file of them holds
    them (torchvision's save_image), gray repeated to RGB: what FID reads of a sample."""
    pixels = to_unit_range(images).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def grid_of(images, nrow):
    """Images [N, 3, H, W] in [-1, 1] -> one grid image [3, H', W'] in [0, 1], `nrow` per row,
    laid out as save_grid writes it (torchvision's make_grid, padding 2)."""
    return make_grid(to_unit_range(images), nrow=nrow)


def save_grid(images, folder, name, nrow):
    """Images [N, 3, H, W] in [-1, 1] -> one PNG grid of `nrow` images per row."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    save_image(to_unit_range(images), path, nrow=nrow)
    tqdm.write(f"wrote {path}")


def save_png_atomically(image, path):
    """One image [3, H, W] in [-1, 1] -> a PNG file, written to a temporary name and renamed, so
    that an interruption never leaves a truncated file under `path`."""
    temporary = f"{path}.tmp"
    save_image(to_unit_range(image), temporary, format="PNG")
    os.replace(temporary, path)
