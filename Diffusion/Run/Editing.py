"""The states that edit given images with a trained model, for both models (docs/editing.md):

    inpaint   RePaint (Lugmayr et al. 2022): the masked pixels of each image sampled, given the rest
    sdedit    SDEdit (Meng et al. 2022): each image noised to t0 = strength T and brought back

The images: edit_images, an image file or a folder of them (searched recursively, in sorted order),
each fitted to img_size as the training transform does (Data.image_transform). The masks of
inpaint: a named mask, whose named region is sampled and the rest kept: center (the central square
of half the side), left, right, top, bottom (that half), random_boxes (RANDOM_BOXES boxes per image,
drawn from mask_seed and the image's index); or an image file, applied to every image, or a folder
holding a mask under each image's relative path: white keeps a pixel, black samples it. A mask file
has its image's size and only those two values, and is fitted to img_size as its image is.

What a run writes, in sampled_dir/<state>/: the results alone as 000000.png, .. in the images' order,
a folder per result (`results`; the conditional model: w{w}, or w{w}_class{c} with labels), and the
masked input (`masked`, the sampled pixels gray) or the noised one (`noised`, x_t0); `side_by_side/`
with each image's row: the input, that, and its results; and <state>.png, the first nrow images in
columns, a row for the inputs, that, and each result; with <state>.json. The results are exported
as eval's samples are: an interrupted run continues, and under torchrun each process edits its
share of the batches.
"""
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2 as transforms
from tqdm import tqdm

from Diffusion.Editing import network_evaluations, repaint, sdedit_start
from Diffusion.Editing import sdedit as sdedit_images
from Diffusion.Run.Config import ConfigError, steps_of
from Diffusion.Run.Data import ImageFiles, image_transform
from Diffusion.Run.Evaluation import on_every_process, samplers_of, trained_model
from Diffusion.Run.Figures import write_json
from Diffusion.Run.Processes import gather
from Diffusion.Run.Sampling import (
    batch_seed, export_samples, sample_file, save_grid, save_picture, starting_noise, timesteps_of)

MASK_NAMES = ("center", "left", "right", "top", "bottom", "random_boxes")
RANDOM_BOXES = 3  # boxes of random_boxes, each of a side from img_size / 8 to img_size / 2


def named_mask(name, size, seed=0, index=0):
    """The mask `name` (MASK_NAMES) of a size x size image: float [1, size, size], 0 over the region it
    names (sampled), 1 elsewhere (kept). random_boxes: its boxes drawn from (seed, index)."""
    mask, half = torch.ones(1, size, size), size // 2
    if name == "center":
        mask[:, size // 4:size - size // 4, size // 4:size - size // 4] = 0.
    elif name == "left":
        mask[:, :, :half] = 0.
    elif name == "right":
        mask[:, :, size - half:] = 0.
    elif name == "top":
        mask[:, :half] = 0.
    elif name == "bottom":
        mask[:, size - half:] = 0.
    else:
        generator = torch.Generator().manual_seed(batch_seed(seed, index))
        for _ in range(RANDOM_BOXES):
            height, width = torch.randint(max(1, size // 8), half + 1, (2,), generator=generator).tolist()
            top = int(torch.randint(size - height + 1, (), generator=generator))
            left = int(torch.randint(size - width + 1, (), generator=generator))
            mask[:, top:top + height, left:left + width] = 0.
    return mask


def mask_transform(img_size):
    """A mask file (PIL) -> float [1, img_size, img_size] of 0 and 1, fitted as image_transform fits its image."""
    nearest = transforms.InterpolationMode.NEAREST
    return transforms.Compose([transforms.Grayscale(1), transforms.Resize(img_size, nearest),
                               transforms.CenterCrop(img_size), transforms.ToImage(),
                               transforms.ToDtype(torch.float32, scale=True)])


class EditInputs(Dataset):
    """(image [C, img_size, img_size] in [-1, 1], mask [1, img_size, img_size]) of each of `paths`;
    masks: a name of MASK_NAMES, a mask file per image, or None (all kept: SDEdit)."""

    def __init__(self, paths, masks, img_size, img_channels, mask_seed=0):
        self.paths, self.masks, self.img_size, self.mask_seed = paths, masks, img_size, mask_seed
        self.transform, self.mask_transform = image_transform(img_size, img_channels), mask_transform(img_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            x_0 = self.transform(image.convert("RGB"))
        if self.masks is None:
            return x_0, torch.ones(1, self.img_size, self.img_size)
        if isinstance(self.masks, str):
            return x_0, named_mask(self.masks, self.img_size, self.mask_seed, index)
        with Image.open(self.masks[index]) as mask:
            return x_0, self.mask_transform(mask.convert("L")).round()

    def batch(self, first, count, device):
        """(images [count, C, H, W], masks [count, 1, H, W]) of indices first .. first + count - 1."""
        pairs = [self[index] for index in range(first, first + count)]
        return tuple(torch.stack(part).to(device) for part in zip(*pairs))


# --- the inputs, checked before any work --------------------------------------------------------


def image_paths(source):
    """The image files of edit_images `source`: itself, or those in the folder (recursively, sorted)."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise ConfigError(f"edit_images {source!r} does not exist: give an image file or a folder of images.")
    paths = ImageFiles(source, None).paths
    if not paths:
        raise ConfigError(f"edit_images {source!r} is a folder with no images (.png, .jpg, ...) in it or "
                          f"below it: put the images to edit there, or give an image file.")
    return paths


def mask_paths(mask, source, paths):
    """A mask file per image of `paths` (edit_images `source`): `mask` itself, or the file of the
    image's relative path in the folder `mask`; `mask` as it is when it is a name of MASK_NAMES."""
    if mask in MASK_NAMES:
        return mask
    if os.path.isfile(mask):
        return [mask] * len(paths)
    if not os.path.isdir(mask):
        raise ConfigError(f"mask {mask!r} is neither a named mask ({', '.join(MASK_NAMES)}) nor an image file "
                          f"or folder: name one, or give a black-and-white mask file (white keeps a pixel).")
    relative = [os.path.basename(path) if os.path.isfile(source) else os.path.relpath(path, source) for path in paths]
    masks = [os.path.join(mask, name) for name in relative]
    missing = next((name for name, path in zip(relative, masks) if not os.path.isfile(path)), None)
    if missing:
        raise ConfigError(f"mask folder {mask!r} has no mask {missing!r} for that image of edit_images: put a "
                          f"mask under each image's name there, or give one mask file for every image.")
    return masks


def size_of(path, key):
    """The (width, height) of image file `path`, given by config key `key`."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        raise ConfigError(f"{key} file {path!r} cannot be read as an image: replace it, or remove it.") from None


def check_mask_files(masks, paths):
    """Each mask file has its image's size and is black and white (0 and 255 only)."""
    pure = {}
    for mask, path in zip(masks, paths):
        if size_of(mask, "mask") != size_of(path, "edit_images"):
            raise ConfigError(f"mask {mask!r} is {'x'.join(map(str, size_of(mask, 'mask')))} pixels but its image "
                              f"{path!r} is {'x'.join(map(str, size_of(path, 'edit_images')))}: give a mask of "
                              f"the image's size.")
        if mask not in pure:
            with Image.open(mask) as image:
                pure[mask] = set(np.unique(np.asarray(image.convert("L")))) <= {0, 255}
        if not pure[mask]:
            raise ConfigError(f"mask {mask!r} is not black and white (it has gray pixels; a JPEG's compression "
                              f"makes them): save it as a PNG of black (to sample) and white (to keep) only.")


def edit_inputs(config):
    """EditInputs of edit_images (with mask for inpaint), every file checked: bad input stops here."""
    paths = image_paths(config["edit_images"])
    masks = mask_paths(config["mask"], config["edit_images"], paths) if config["state"] == "inpaint" else None
    if isinstance(masks, list):
        check_mask_files(masks, paths)
    else:
        for path in paths:
            size_of(path, "edit_images")
    return EditInputs(paths, masks, config["img_size"], config["img_channels"], config["mask_seed"])


def result_columns(config, variant, model, num_labels):
    """[(folder name, sampler, class or None)]: a result per guidance weight w and class of labels
    (the conditional model; without labels, its null class: the unconditional estimate)."""
    labels = config.get("labels")
    if labels is not None and max(labels) >= num_labels:
        raise ConfigError(f"labels {labels} names class {max(labels)}, but the checkpoint knows {num_labels} "
                          f"classes (0..{num_labels - 1}): give classes it knows.")
    columns = []
    for w, sampler in samplers_of(config, variant, model):
        for label in labels or [None]:
            name = "results" if w is None else f"w{w:g}" + ("" if label is None else f"_class{label}")
            columns.append((name, sampler, label))
    return columns


def condition_of(label, count, num_labels, device):
    """The model inputs besides x_t and t: () unconditional, else the labels [count] (0: the null class)."""
    if num_labels is None:
        return ()
    return (torch.full((count,), 0 if label is None else label + 1, dtype=torch.long, device=device),)


# --- the states -------------------------------------------------------------------------------


@on_every_process
def inpaint(config, variant, process):
    """State inpaint: RePaint (Diffusion/Editing.py) of edit_images' masked pixels, with jump_length and
    resample, through the configured sampler (ddpm or ddim, respaced by sample_steps)."""
    def edit(sampler, x_0, mask, condition, x_T):
        result = repaint(sampler, x_0, mask, x_T, *condition, jump_length=config["jump_length"],
                         resample=config["resample"], progress=True)
        return result, x_0 * mask  # the sampled pixels gray
    steps = steps_of(config)
    edit_images(config, variant, process, edit, "masked",
                {"mask": config["mask"], "jump_length": config["jump_length"], "resample": config["resample"],
                 "network_evaluations": network_evaluations(steps, config["jump_length"], config["resample"])})


@on_every_process
def sdedit(config, variant, process):
    """State sdedit: SDEdit (Diffusion/Editing.py) of edit_images at strength, through the configured
    sampler from t0 on its own timesteps."""
    def edit(sampler, x_0, mask, condition, noise):
        return sdedit_images(sampler, x_0, config["strength"], noise, *condition, progress=True)
    start = sdedit_start(steps_of(config), config["strength"])
    t0 = 0 if start < 0 else int(timesteps_of(config)[start]) + 1  # the paper's t of x_t0
    edit_images(config, variant, process, edit, "noised",
                {"strength": config["strength"], "t0": t0, "network_evaluations": start + 1})


def edit_images(config, variant, process, edit, second, settings):
    """Edit every image of edit_images by edit(sampler, x_0, mask, condition, noise) -> (result, what
    folder `second` shows) for each result column, and export them; then the main process draws the
    rows. noise ~ N(0, I) [N, C, H, W] is drawn once per batch, and each result of a batch is drawn
    with the same random numbers."""
    inputs = edit_inputs(config)
    model, num_labels = trained_model(config, variant, process.device)
    columns = result_columns(config, variant, model, num_labels)
    folder = os.path.join(config["sampled_dir"], config["state"])
    folders = [os.path.join(folder, name) for name in (second, *(name for name, _, _ in columns))]
    def draw(first, count):
        x_0, mask = inputs.batch(first, count, process.device)
        noise = starting_noise(count, config["img_channels"], config["img_size"], process.device)
        noise_seed = int(torch.randint(2 ** 62, ()))
        results = []
        for _, sampler, label in columns:
            torch.manual_seed(noise_seed)
            result, shown = edit(sampler, x_0, mask, condition_of(label, count, num_labels, process.device), noise)
            results.append(result)
        return torch.stack([shown, *results])
    written = export_samples(draw, folders, len(inputs), config["batch_size"], process, config["seed"],
                             description=config["state"])
    shares = gather(written, process)
    by_each = f" ({' + '.join(map(str, shares))} by the {len(shares)} processes)" if len(shares) > 1 else ""
    process.say(f"{config['state']}: {sum(shares)} images edited now{by_each}, {len(inputs)} in all, in {folder}")
    if process.is_main:
        draw_rows(config, inputs, folders, folder)
        write_json(f"{folder}.json", {**settings, "images": len(inputs), "sampler": config["sampler"],
                                      "steps": steps_of(config), "columns": ["input", *map(os.path.basename, folders)]})


def draw_rows(config, inputs, folders, folder):
    """side_by_side/{k:06d}.png for each image k without one: the input, then its file of each of
    `folders`, in a row; and <state>.png, the first nrow images in columns, a row for each of those."""
    read = image_transform(config["img_size"], config["img_channels"])
    def row(index):
        images = [inputs[index][0]]
        for each in folders:
            with Image.open(sample_file(each, index)) as image:
                images.append(read(image.convert("RGB")))
        return torch.stack(images)
    rows = os.path.join(folder, "side_by_side")
    for index in tqdm(range(len(inputs)), desc="side by side", dynamic_ncols=True, leave=False):
        if not os.path.exists(sample_file(rows, index)):
            save_picture(row(index), sample_file(rows, index), nrow=len(folders) + 1)
    shown = min(len(inputs), config["nrow"])
    columns = torch.stack([row(index) for index in range(shown)], dim=1)  # [kinds, images, C, H, W]
    save_grid(columns.flatten(0, 1), f"{folder}.png", shown)
