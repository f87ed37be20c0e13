"""Images for training, NLL and FID: CIFAR-10, any torchvision dataset of its form, or a folder of images
(an unreadable file is skipped with a warning). Each becomes RGB (or grayscale, img_channels 1), fitted to
img_size (resized, centre-cropped), scaled to [-1, 1]; training flips it left-right at random on the device
(a continued run sees the same flips), in `EpochSampler`'s order: the original's pipeline for CIFAR-10.
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
_skipped_files = set()  # the unreadable images this process has warned about


class DataUnavailable(RunError):
    """The images cannot be had: no readable image, or a dataset neither loaded nor downloaded."""


def image_transform(img_size, img_channels=3, for_model=True):
    """PIL image -> [img_channels, img_size, img_size] (3: RGB, 1: grayscale), fitted to img_size:
    float in [-1, 1] as the model sees it, or uint8 as FID reads it (for_model False)."""
    fitted = [transforms.RGB() if img_channels == 3 else transforms.Grayscale(1),
              transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.ToImage()]
    if not for_model:
        return transforms.Compose(fitted)
    return transforms.Compose([*fitted, transforms.ToDtype(torch.float32, scale=True),
                               transforms.Normalize([0.5] * img_channels, [0.5] * img_channels)])


def load_readable(paths, index):
    """(i, PIL image) of the first of paths[index], paths[index + 1], ... (wrapping around) PIL can read;
    each unreadable one is named in a warning once per process: it neither stops an epoch nor goes unseen."""
    for offset in range(len(paths)):
        i = (index + offset) % len(paths)
        try:
            return i, default_loader(paths[i])
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
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
        self.paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                            for name in names if name.lower().endswith(IMG_EXTENSIONS))
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        _, image = load_readable(self.paths, index)
        return self.transform(image), 0


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder (one subfolder per class, in sorted order), skipping as ImageFiles does."""

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


def image_folder(path, transform, labelled):
    """A folder of images; `labelled`: one subfolder per class, labelled in sorted order."""
    if not os.path.isdir(path):
        names = [name for name in torchvision.datasets.__all__ if is_torchvision_dataset(name)]
        close = difflib.get_close_matches(path, names, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"dataset folder {path!r} does not exist: give a folder of images, or a "
                          f"torchvision dataset name such as CIFAR10, CIFAR100 or MNIST.{hint}")
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
    """(root given to torchvision, the folder it downloads to and reads): the MNIST family gets data_root
    and makes data_root/<class name>/raw itself; the others (CIFAR10, ...) get data_root/<class name>."""
    folder = os.path.join(data_root, dataset_class.__name__)
    return (data_root, os.path.join(folder, "raw")) if is_mnist_family(dataset_class) else (folder, folder)


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
    return f"{files} from {getattr(dataset_class, 'mirrors', ['its download page'])[0]}"


def outermost_missing_folder(path):
    """The outermost folder on the way to `path` that does not exist yet; None if path exists."""
    path = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return None if os.path.exists(path) else path


def remove_empty_folders(folder):
    """Remove `folder` and the folders under it, deepest first, as long as they hold no file."""
    for path, _, _ in os.walk(folder, topdown=False):
        try:
            os.rmdir(path)
        except OSError:  # not empty: a partial download stays, for the next run to name
            pass


def torchvision_dataset(name, data_root, transform, train=True):
    """torchvision.datasets.<name>(root, train, transform, download=True), root as dataset_folders says.
    A failed download names what to fetch and where, leaving no empty folder, or names the corrupt file."""
    dataset_class = getattr(torchvision.datasets, name)
    root, folder = dataset_folders(dataset_class, data_root)
    new_folder = outermost_missing_folder(os.path.join(data_root, name))
    try:
        return dataset_class(root=root, train=train, transform=transform, download=True)
    except TypeError as error:
        raise ConfigError(f"torchvision dataset {name!r} is not of the (root, train, transform, download) "
                          f"form this repo uses ({error}): use a folder of images instead.") from None
    except (OSError, RuntimeError) as error:
        if new_folder:  # made by this failed download: leave no empty folder behind
            remove_empty_folders(new_folder)
        # The MNIST family's files go unchecked once uncompressed; Debian's recompressed ones fail the MD5.
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
        reason = (str(error).strip() or type(error).__name__).splitlines()[-1]
        them = "them" if is_mnist_family(dataset_class) else "it"
        raise DataUnavailable(f"could not load or download {name} ({reason}): on a machine that "
                              f"is online, download {download_hint(dataset_class)}, and put "
                              f"{them} in {os.path.abspath(folder)}{uncompressed}; or set dataset to a "
                              f"folder of images.") from None


def dataset_of(name, data_root, transform, labelled=False, train=True):
    """The torchvision dataset `name` in data_root (train False: its test split), or image_folder(name)."""
    return (torchvision_dataset(name, data_root, transform, train) if is_torchvision_dataset(name)
            else image_folder(name, transform, labelled))


def training_dataset(name, data_root, img_size, img_channels, max_images, batch_size, labelled=False):
    """dataset_of(name) fitted to img_size and img_channels, cut to a fixed random max_images (None: all);
    `.classes` names its classes (empty without labels), which `labelled` (training on them) requires."""
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
    """Epoch e is a permutation seeded by seed + e, of which this process takes every world_size-th image
    (DistributedSampler); `start_epoch` can begin `skip` images in, where a stopped run left off."""

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
    """For data-loading workers: Ctrl-C reaches the terminal's whole group; the main process decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_loader(dataset, batch_size, num_workers, sampler, device):
    """Batches of (images [B, C, img_size, img_size] in [-1, 1], labels [B]) in `sampler`'s order, the last
    incomplete one dropped. Its own generator seeds the workers, not torch's global one (a state saves it)."""
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.device(device).type == "cuda",
                      worker_init_fn=ignore_ctrl_c, generator=torch.Generator())


def flip_left_right_at_random(images, draws):
    """Each image [B, C, H, W] mirrored left-right with probability 1/2 (the original's RandomHorizontalFlip),
    drawn from `draws`, a GlobalBatchRandomness, so that a continued run sees the same flips."""
    flip = draws.rand(images.shape[0], images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
