"""FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) of sample images against
the training set, computed by torchmetrics (pip install -r requirements-optional.txt).

Both metrics read features of uint8 images [B, 3, H, W] from one feature extractor:
- "inception" (fid_extractor's default): the Inception-v3 of TensorFlow that the papers used,
  with the weights that pip installs (Inception.py), resized to 299x299 as TensorFlow 1 did.
  Pool features [B, 2048] for FID, logits [B, 1008] for IS where its classifier is at hand.
- the path of a StandInClassifier's weights: its penultimate features and its logits. Its
  numbers are only comparable with each other, never with published ones.

The training set's feature statistics are computed once and cached in fid_stats_dir, keyed by
the dataset, the image size and the extractor's weights (their hash).
"""
import hashlib
import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as transforms
from tqdm import tqdm

from Diffusion.Machinery.Checkpoint import load_tensors, save_atomically
from Diffusion.Machinery.Errors import ConfigError
from Diffusion.Machinery.Inception import INCEPTION_SHA256, inception_extractor, missing_classifier
from Diffusion.Machinery.Data import ImageFiles, image_folder, is_torchvision_dataset, torchvision_dataset

INCEPTION = "inception"
INSTALL = "pip install -r requirements-optional.txt (torchmetrics and torch-fidelity)"


class StandInClassifier(nn.Module):
    """A small CNN classifier of uint8 images [B, 3, H, W]: a stand-in feature extractor where
    Inception's weights cannot be had (offline), trained on the dataset's labels.
    features: [B, 4 * width], the input of the last layer; forward: logits [B, num_classes]."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        def conv(channels_in, channels_out):
            return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1),
                                 nn.GroupNorm(4, channels_out), nn.SiLU())
        self.body = nn.Sequential(conv(3, width), nn.MaxPool2d(2), conv(width, 2 * width), nn.MaxPool2d(2),
                                  conv(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, images):
        return self.body(images.float() / 127.5 - 1.)

    def forward(self, images):
        return self.head(self.features(images))


class FeaturesAndLogits(nn.Module):
    """A StandInClassifier as a feature extractor: images -> (features, logits)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.head.in_features

    def forward(self, images):
        features = self.classifier.features(images)
        return features, self.classifier.head(features)


class Extracted(nn.Identity):
    """What torchmetrics is given in place of its network: features already extracted."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features


def _torchmetrics():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
    except ImportError as error:
        raise ConfigError(f"FID needs torchmetrics, which is not installed ({error}): {INSTALL}.") from None
    return FrechetInceptionDistance, InceptionScore


def classifier_extractor(path):
    """The StandInClassifier whose state_dict is in `path`, as a feature extractor."""
    if not os.path.isfile(path):
        raise ConfigError(f"fid_extractor {path!r} is neither 'inception' nor a file: give the "
                          f"weights of a StandInClassifier (see benchmarks/sampling.py).")
    state_dict = load_tensors(path, "cpu")
    classifier = StandInClassifier(num_classes=state_dict["head.weight"].shape[0],
                                   width=state_dict["body.0.0.weight"].shape[0])
    classifier.load_state_dict(state_dict)
    return FeaturesAndLogits(classifier)


def extractor_of(name):
    """The feature extractor fid_extractor names, in eval mode: uint8 images [B, 3, H, W] ->
    (features [B, num_features], logits [B, K], or None where the extractor has no classifier)."""
    _torchmetrics()
    return (inception_extractor() if name == INCEPTION else classifier_extractor(name)).eval()


def extractor_label(name):
    """A short name of the extractor's weights for file names: inception and its file's hash, or
    the weights file's stem and hash."""
    if name == INCEPTION:
        return f"{INCEPTION}-{INCEPTION_SHA256[:8]}"
    with open(name, "rb") as file:
        digest = hashlib.sha1(file.read()).hexdigest()[:8]
    return f"{os.path.splitext(os.path.basename(name))[0]}-{digest}"


def evaluation_transform(img_size):
    """PIL image -> uint8 [3, img_size, img_size], fitted as the training images (no flip)."""
    return transforms.Compose([transforms.RGB(), transforms.Resize(img_size),
                               transforms.CenterCrop(img_size), transforms.ToImage()])


def reference_images(config):
    """The whole training set of config["dataset"] (all of it, whatever max_images), as uint8."""
    transform = evaluation_transform(config["img_size"])
    name = config["dataset"]
    if is_torchvision_dataset(name):
        return torchvision_dataset(name, config["data_root"], transform)
    return image_folder(name, transform, labelled=False)


def folder_images(folder, img_size):
    """The images under `folder` (searched recursively), as uint8, fitted to img_size."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a folder of images: set fid_images to one, or to "
                          f"None to score the checkpoint's samples.")
    images = ImageFiles(folder, evaluation_transform(img_size))
    if len(images) < 2:
        raise ConfigError(f"{folder!r} holds {len(images)} images; FID needs at least 2 (the "
                          f"papers use 50,000).")
    return images


@torch.no_grad()
def feature_batches(batches, extractor, device):
    """(features [B, D] float64, logits [B, K] float64 or None) of each uint8 batch [B, 3, H, W]."""
    extractor.to(device)
    for images in batches:
        features, logits = extractor(images.to(device))
        yield features.double(), None if logits is None else logits.double()


def dataset_batches(dataset, config, description):
    """The uint8 images of `dataset` in batches of batch_size, under a progress bar."""
    loader = DataLoader(dataset, batch_size=config["batch_size"], num_workers=config["num_workers"])
    for images, _ in tqdm(loader, desc=description, leave=False, dynamic_ncols=True):
        yield images


def statistics_file(config):
    """Where the training set's statistics for this dataset, img_size and extractor are cached."""
    name = config["dataset"]
    if not is_torchvision_dataset(name):
        digest = hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:8]
        name = f"{os.path.basename(os.path.normpath(name))}-{digest}"
    label = extractor_label(config["fid_extractor"])
    return os.path.join(config["fid_stats_dir"], f"{name}_{config['img_size']}px_{label}.pt")


REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def fid_metric(config, extractor):
    """torchmetrics' FID, its reference side holding the training set's statistics (read from
    fid_stats_dir, or computed and written there)."""
    FrechetInceptionDistance, _ = _torchmetrics()
    path = statistics_file(config)
    metric = FrechetInceptionDistance(feature=Extracted(extractor.num_features), reset_real_features=False)
    if os.path.isfile(path):
        statistics = load_tensors(path, "cpu")
        for state in REFERENCE_STATES:
            setattr(metric, state, statistics[state])
    else:
        batches = dataset_batches(reference_images(config), config, "training set features")
        for features, _ in feature_batches(batches, extractor, torch.device(config["device"])):
            metric.update(features, real=True)
        save_atomically({state: getattr(metric, state) for state in REFERENCE_STATES}, path)
        tqdm.write(f"wrote the training set's feature statistics to {path}")
    return metric.to(torch.device(config["device"]))


def scores_of(batches, config, extractor):
    """FID against the training set, and IS (mean and std over 10 splits) where the extractor
    has logits, of the uint8 images [B, 3, H, W] of `batches`:
    {"fid", "is", "is_std", "images", "reference_images"} (is and is_std None without logits)."""
    _, InceptionScore = _torchmetrics()
    fid = fid_metric(config, extractor)
    with warnings.catch_warnings():  # "will save all extracted features": that is what it is for
        warnings.filterwarnings("ignore", message=".*save all extracted features", category=UserWarning)
        inception_score = InceptionScore(feature=nn.Identity(), splits=10)
    has_logits = False
    for features, logits in feature_batches(batches, extractor, torch.device(config["device"])):
        fid.update(features, real=False)
        if logits is not None:
            inception_score.update(logits)
            has_logits = True
    is_mean, is_std = (value.item() for value in inception_score.compute()) if has_logits else (None, None)
    return {"fid": fid.compute().item(), "is": is_mean, "is_std": is_std,
            "images": int(fid.fake_features_num_samples),
            "reference_images": int(fid.real_features_num_samples)}


def report_scores(config, folders):
    """FID and IS of each folder of {label: folder}, printed and returned as {label: scores}."""
    extractor = extractor_of(config["fid_extractor"])
    results = {}
    for label, folder in folders.items():
        images = folder_images(folder, config["img_size"])
        scores = results[label] = scores_of(dataset_batches(images, config, f"features of {folder}"),
                                            config, extractor)
        inception_score = ("" if scores["is"] is None else
                           f", IS {scores['is']:.2f} ± {scores['is_std']:.2f}")
        tqdm.write(f"{label}: FID {scores['fid']:.2f}{inception_score} ({scores['images']} images in "
                   f"{folder} against {scores['reference_images']} training images of "
                   f"{config['dataset']}, {config['fid_extractor']} features)")
    if any(scores["is"] is None for scores in results.values()):
        tqdm.write(f"no IS: {missing_classifier()}")
    return results
