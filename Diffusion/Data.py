"""Training images: CIFAR-10, any torchvision dataset of the same form, or a folder of images.

Every image becomes RGB, is fitted to img_size (resized, centre-cropped) and scaled to [-1, 1];
training then flips it left-right at random (Randomness.flip_left_right_at_random, on the device,
so that a continued run sees the same flips). For CIFAR-10 at 32x32 this is the original's
pipeline.
"""
import difflib
import os

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder, default_loader
from torchvision.transforms import v2 as transforms

from Diffusion.Config import ConfigError
from Diffusion.Interrupt import ignore_ctrl_c


def training_transform(img_size):
    """PIL image -> [3, img_size, img_size] in [-1, 1]."""
    return transforms.Compose([
        transforms.RGB(),
        transforms.Resize(img_size),
        transforms.CenterCrop(img_size),
        transforms.ToImage(),
        transforms.ToDtype(torch.float32, scale=True),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])


class ImageFiles(Dataset):
    """Every image file under `root`, searched recursively, with the label 0."""

    def __init__(self, root, transform):
        self.paths = sorted(
            os.path.join(folder, name)
            for folder, _, names in os.walk(root, followlinks=True)
            for name in names if name.lower().endswith(IMG_EXTENSIONS))
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(default_loader(self.paths[index])), 0


def is_torchvision_dataset(name):
    """A plain name (no path) of a dataset class in torchvision.datasets."""
    is_path = "/" in name or os.sep in name
    return not is_path and isinstance(getattr(torchvision.datasets, name, None), type)


def _closest_dataset(name):
    names = [n for n in torchvision.datasets.__all__ if is_torchvision_dataset(n)]
    close = difflib.get_close_matches(name, names, n=1)
    return f" Did you mean {close[0]}?" if close else ""


def image_folder(path, transform, labelled):
    """A folder of images; `labelled`: one subfolder per class, labelled in sorted order."""
    if not os.path.isdir(path):
        raise ConfigError(f"dataset folder {path!r} does not exist: give a folder of images, or "
                          f"a torchvision dataset name such as CIFAR10, CIFAR100 or MNIST."
                          f"{_closest_dataset(path)}")
    if not labelled:
        return ImageFiles(path, transform)
    try:
        return ImageFolder(path, transform)
    except FileNotFoundError as error:
        raise ConfigError(f"the class-conditional model needs one subfolder of images per class "
                          f"in {path!r}: {error}") from None


def download_hint(dataset_class, root):
    """Which files torchvision's `dataset_class` downloads, from where, and the folder it reads."""
    if hasattr(dataset_class, "url"):  # CIFAR10, CIFAR100, ...
        return f"{dataset_class.filename} from {dataset_class.url}", root
    files = ", ".join(name for name, _ in getattr(dataset_class, "resources", []))
    mirror = getattr(dataset_class, "mirrors", ["its download page"])[0]
    # MNIST and its relatives read root/<class name>/raw
    return f"{files} from {mirror}", os.path.join(root, dataset_class.__name__, "raw")


def torchvision_dataset(name, root, transform):
    """torchvision.datasets.<name>(root=data_root/name, train=True, transform, download=True)."""
    dataset_class = getattr(torchvision.datasets, name)
    root = os.path.join(root, name)
    try:
        return dataset_class(root=root, train=True, transform=transform, download=True)
    except TypeError as error:
        raise ConfigError(f"torchvision dataset {name!r} is not of the (root, train, transform, "
                          f"download) form this repo uses ({error}): use a folder of images "
                          f"instead.") from None
    except (OSError, RuntimeError) as error:
        files, folder = download_hint(dataset_class, root)
        raise ConfigError(f"could not load or download {name} ({error}). On a machine that is "
                          f"online, download {files}, and put it in {os.path.abspath(folder)}; "
                          f"or set dataset to a folder of images.") from None


def training_dataset(config, labelled=False):
    """The dataset named by config["dataset"], cut to a fixed random max_images of its images;
    `labelled`: with class labels (its `.classes` names them)."""
    transform = training_transform(config["img_size"])
    name = config["dataset"]
    if is_torchvision_dataset(name):
        dataset = torchvision_dataset(name, config["data_root"], transform)
    else:
        dataset = image_folder(name, transform, labelled)
    if labelled and not getattr(dataset, "classes", None):
        raise ConfigError(f"dataset {name!r} has no class labels (no .classes): the "
                          f"class-conditional model needs a labelled dataset.")
    if config["max_images"] is not None and config["max_images"] < len(dataset):
        classes = getattr(dataset, "classes", None)
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = Subset(dataset, chosen[:config["max_images"]].tolist())
        dataset.classes = classes
    if len(dataset) < config["batch_size"]:
        raise ConfigError(f"dataset {name!r} has {len(dataset)} images, fewer than batch_size "
                          f"{config['batch_size']} (the last incomplete batch is dropped): lower "
                          f"batch_size, add images, or raise max_images.")
    return dataset


def training_loader(dataset, config, sampler, device):
    """Batches of (images [B, 3, img_size, img_size] in [-1, 1], labels [B]) in the order of
    `sampler`; the last incomplete batch is dropped."""
    workers = config["num_workers"]
    # Its own generator: the loader draws its workers' seeds from it, not from torch's global
    # generator, whose state a training state saves.
    return DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.device(device).type == "cuda", worker_init_fn=ignore_ctrl_c,
                      generator=torch.Generator())


def default_num_workers():
    """Up to 4 data-loading workers, no more than the CPUs."""
    return min(4, os.cpu_count() or 1)
