"""Images: CIFAR-10, any torchvision dataset of the same form, or a folder of images; for
training, for the NLL's held-out images and for FID's reference statistics alike.

Every image becomes RGB (or grayscale, with img_channels 1), is fitted to img_size (resized,
centre-cropped) and scaled to [-1, 1]; training then flips it left-right at random (on the
device, drawn so that a continued run sees the same flips), in the order of `EpochSampler`. For
CIFAR-10 at 32x32 this is the original's pipeline. An image file of a folder that PIL cannot read
is skipped with a warning naming it.
"""
import difflib
import itertools
import os
import signal
import sys

import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder, default_loader
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2 as transforms
from tqdm import tqdm

from Diffusion.Run.Config import ConfigError, RunError

# torchvision reads CIFAR-10's class names from the dataset's files; eval needs them without.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


class DataUnavailable(RunError):
    """The images cannot be had: no readable image, or a dataset that can be neither loaded nor
    downloaded."""


def image_transform(img_size, img_channels=3, for_model=True):
    """PIL image -> [img_channels, img_size, img_size] (3: RGB, 1: grayscale), fitted to img_size:
    float in [-1, 1] as the model sees it, or uint8 as FID reads it (for_model False)."""
    fitted = [transforms.RGB() if img_channels == 3 else transforms.Grayscale(1),
              transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.ToImage()]
    if not for_model:
        return transforms.Compose(fitted)
    return transforms.Compose([*fitted, transforms.ToDtype(torch.float32, scale=True),
                               transforms.Normalize([0.5] * img_channels, [0.5] * img_channels)])


_skipped_files = set()  # the unreadable images this process has warned about


def load_readable(paths, index):
    """(i, PIL image) of the first of paths[index], paths[index + 1], ... (wrapping around)
    that PIL can read. Each unreadable file (truncated, not an image) is named once per process
    (once per data-loading worker) in a warning, so that a bad file among thousands neither
    stops an epoch midway nor goes unnoticed."""
    for offset in range(len(paths)):
        i = (index + offset) % len(paths)
        try:
            return i, default_loader(paths[i])
        except UNREADABLE_IMAGE_ERRORS as error:
            if paths[i] not in _skipped_files:
                _skipped_files.add(paths[i])
                why = "not an image PIL knows" if isinstance(error, UnidentifiedImageError) else error
                tqdm.write(f"warning: skipping {paths[i]!r}, which cannot be read as an image "
                           f"({why}); the next image takes its place ({len(_skipped_files)} "
                           f"skipped so far): delete or replace the file.", file=sys.stderr)
    raise DataUnavailable(f"none of the {len(paths)} image files of the dataset can be read: "
                          f"check the dataset folder.")


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
        _, image = load_readable(self.paths, index)
        return self.transform(image), 0


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder (one subfolder per class, in sorted order) that skips an
    unreadable image as ImageFiles does: the image and label of the next readable one instead."""

    def __init__(self, root, transform):
        super().__init__(root, transform)
        self.paths = [path for path, _ in self.samples]

    def __getitem__(self, index):
        index, image = load_readable(self.paths, index)
        return self.transform(image), self.targets[index]


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
        return ClassFolders(path, transform)
    except FileNotFoundError as error:
        raise ConfigError(f"the class-conditional model needs one subfolder of images per class "
                          f"in {path!r}: {error}") from None


def is_mnist_family(dataset_class):
    """MNIST, FashionMNIST, KMNIST, EMNIST, QMNIST: they read root/<class name>/raw."""
    return issubclass(dataset_class, torchvision.datasets.MNIST)


def dataset_folders(dataset_class, data_root):
    """(root given to torchvision, the folder it downloads to and reads). The MNIST family
    makes data_root/<class name>/raw itself, so it gets data_root (Fashion-MNIST's four files
    go in data_root/FashionMNIST/raw); the others (CIFAR10, ...) get data_root/<class name>,
    as the original."""
    name = dataset_class.__name__
    if is_mnist_family(dataset_class):
        return data_root, os.path.join(data_root, name, "raw")
    root = os.path.join(data_root, name)
    return root, root


def downloaded_files(dataset_class, folder):
    """[(path, md5)] of the files torchvision downloads for `dataset_class` into `folder`."""
    if is_mnist_family(dataset_class) or not hasattr(dataset_class, "filename"):
        return [(os.path.join(folder, name), md5) for name, md5 in getattr(dataset_class, "resources", [])]
    return [(os.path.join(folder, dataset_class.filename), getattr(dataset_class, "tgz_md5", None))]


def download_hint(dataset_class):
    """Which files torchvision's `dataset_class` downloads, and from where."""
    if hasattr(dataset_class, "url") and not is_mnist_family(dataset_class):  # CIFAR10, CIFAR100, ...
        return f"{dataset_class.filename} from {dataset_class.url}"
    files = ", ".join(name for name, _ in getattr(dataset_class, "resources", []))
    mirror = getattr(dataset_class, "mirrors", ["its download page"])[0]
    return f"{files} from {mirror}"


def outermost_missing_folder(path):
    """The outermost folder on the way to `path` that does not exist yet; None if path exists."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def remove_empty_folders(folder):
    """Remove `folder` and the folders under it, deepest first, as long as they hold no file."""
    for path, _, _ in os.walk(folder, topdown=False):
        try:
            os.rmdir(path)
        except OSError:  # not empty: a partial download stays, for the next run to name
            pass


def torchvision_dataset(name, data_root, transform, train=True):
    """torchvision.datasets.<name>(root, train, transform, download=True) (train False: its test
    split), root as dataset_folders says. A failed download names the files to fetch and where they go, and
    leaves no empty folder behind; a file in place with the wrong checksum is named as corrupt."""
    dataset_class = getattr(torchvision.datasets, name)
    root, folder = dataset_folders(dataset_class, data_root)
    new_folder = outermost_missing_folder(os.path.join(data_root, name))
    try:
        return dataset_class(root=root, train=train, transform=transform, download=True)
    except TypeError as error:
        raise ConfigError(f"torchvision dataset {name!r} is not of the (root, train, transform, "
                          f"download) form this repo uses ({error}): use a folder of images "
                          f"instead.") from None
    except (OSError, RuntimeError) as error:
        if new_folder:  # made by this failed download: leave no empty folder behind
            remove_empty_folders(new_folder)
        # torchvision checks no checksum on the MNIST family's files once they are uncompressed;
        # a copy compressed again (Debian's dataset-fashion-mnist) has another checksum.
        uncompressed = (" (or uncompressed: gunzip them there, which torchvision reads without "
                        "a checksum)") if is_mnist_family(dataset_class) else ""
        corrupt = [path for path, md5 in downloaded_files(dataset_class, folder)
                   if md5 and os.path.isfile(path) and not check_integrity(path, md5)]
        if corrupt:
            raise DataUnavailable(f"{os.path.abspath(corrupt[0])} is corrupt or incomplete (its "
                                  f"MD5 checksum is not the one torchvision expects): delete it, "
                                  f"then run again online to download it afresh, or put an "
                                  f"intact copy there{uncompressed}.") from None
        # The last line says why: torchvision's MNIST lists each mirror it tried above it.
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise DataUnavailable(f"could not load or download {name} ({reason}): on a machine that "
                              f"is online, download {download_hint(dataset_class)}, and put "
                              f"it in {os.path.abspath(folder)}{uncompressed}; or set dataset to a "
                              f"folder of images.") from None


def dataset_of(name, data_root, transform, labelled=False, train=True):
    """The dataset `name`: a torchvision dataset in data_root (its test split with train False),
    or a folder of images (`labelled`: one subfolder per class)."""
    if is_torchvision_dataset(name):
        return torchvision_dataset(name, data_root, transform, train)
    return image_folder(name, transform, labelled)


def training_dataset(name, data_root, img_size, img_channels, max_images, batch_size, labelled=False):
    """The dataset `name` (a torchvision dataset in data_root, or a folder of images), its
    images fitted to img_size with img_channels, cut to a fixed random max_images of them (None:
    all); its `.classes` names the classes (empty without labels). `labelled`: the model trains
    on its labels, so it must have some."""
    dataset = dataset_of(name, data_root, image_transform(img_size, img_channels), labelled)
    classes = list(getattr(dataset, "classes", None) or [])
    if labelled and not classes:
        raise ConfigError(f"dataset {name!r} has no class labels (no .classes): the "
                          f"class-conditional model needs a labelled dataset.")
    if max_images is not None and max_images < len(dataset):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = Subset(dataset, chosen[:max_images].tolist())
    if len(dataset) < batch_size:
        raise ConfigError(f"dataset {name!r} has {len(dataset)} images, fewer than batch_size "
                          f"{batch_size} (the last incomplete batch is dropped): lower "
                          f"batch_size, add images, or raise max_images.")
    dataset.classes = classes
    return dataset


class EpochSampler(DistributedSampler):
    """The data order: epoch e is a random permutation seeded by seed + e, of which this process
    takes every world_size-th image (DistributedSampler); `start_epoch` can begin `skip` images
    into it, where a stopped run left off."""

    def __init__(self, dataset, process, seed):
        super().__init__(dataset, num_replicas=process.world_size, rank=process.rank,
                         shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def start_epoch(self, epoch, skip=0):
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def ignore_ctrl_c(worker_id=None):
    """For data-loading workers: Ctrl-C reaches every process of the terminal's group, and the
    main process alone decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_loader(dataset, batch_size, num_workers, sampler, device):
    """Batches of (images [B, C, img_size, img_size] in [-1, 1], labels [B]) in the order of
    `sampler`; the last incomplete batch is dropped."""
    # Its own generator: the loader draws its workers' seeds from it, not from torch's global
    # generator, whose state a training state saves.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=torch.device(device).type == "cuda", worker_init_fn=ignore_ctrl_c,
                      generator=torch.Generator())


def flip_left_right_at_random(images, draws):
    """Each image [B, C, H, W] mirrored left-right with probability 1/2 (the original's
    RandomHorizontalFlip, drawn from `draws`, a GlobalBatchRandomness, so that a continued run
    sees the same flips)."""
    flip = draws.rand(images.shape[0], images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
