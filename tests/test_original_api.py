"""The original's public Python API (../shared/reference/api.json): every module, class and
function it had is importable by the same name, callable with the original's arguments, and the
methods a user calls return what the original's did; its two modelConfig dicts train and sample
as they are, made tiny."""
import importlib
import inspect
import json

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from conftest import write_images

SENTINEL = object()


def api(reference):
    return json.loads((reference / "api.json").read_text())


def original_names(reference):
    """(module, name, entry) for every top-level function and class of the original."""
    return [(module, name, entry) for module, names in api(reference)["modules"].items()
            for name, entry in names.items()]


def callable_as_the_original(function, signature, is_method):
    """Whether `function` takes the original's arguments: those without a default by position,
    those with one by name."""
    parameters = signature[1:] if is_method else signature
    positional = [SENTINEL for parameter in parameters if len(parameter) == 1]
    keywords = {parameter[0]: parameter[1] for parameter in parameters if len(parameter) == 2}
    bound_self = (SENTINEL,) if is_method else ()
    try:
        inspect.signature(function).bind(*bound_self, *positional, **keywords)
    except TypeError:
        return False
    return True


def test_every_public_name_of_the_original_is_importable_from_its_module(reference):
    missing = [f"{module}.{name}" for module, name, _ in original_names(reference)
               if not hasattr(importlib.import_module(module), name)]
    assert missing == []


def test_every_class_has_the_originals_bases_and_methods(reference):
    bases = {"nn.Module": nn.Module, "_LRScheduler": LRScheduler}
    for module, name, entry in original_names(reference):
        if entry["kind"] != "class":
            continue
        cls = getattr(importlib.import_module(module), name)
        assert inspect.isclass(cls), f"{module}.{name}"
        for base in entry["bases"]:
            assert issubclass(cls, bases[base]), f"{module}.{name} is not a {base}"
        for method in entry["methods"]:
            assert callable(getattr(cls, method, None)), f"{module}.{name}.{method}"


def test_every_function_and_method_takes_the_originals_arguments(reference):
    refused = []
    for module, name, entry in original_names(reference):
        thing = getattr(importlib.import_module(module), name)
        if entry["kind"] == "function":
            if not callable_as_the_original(thing, entry["signature"], is_method=False):
                refused.append(f"{module}.{name}")
            continue
        for method, spec in entry["methods"].items():
            if not callable_as_the_original(getattr(thing, method), spec["signature"], is_method=True):
                refused.append(f"{module}.{name}.{method}{[p[0] for p in spec['signature']]}")
    assert refused == []


# --- what the methods a user calls return ---------------------------------------------------


class KnownEps(nn.Module):
    """eps_theta = 0.1 x_t + 0.01 t (+ 0.05 label): a model whose output is known."""

    def forward(self, x_t, t, labels=None):
        eps = 0.1 * x_t + 0.01 * t.float()[:, None, None, None]
        return eps if labels is None else eps + 0.05 * labels.float()[:, None, None, None]


def test_samplers_p_mean_variance_and_the_mean_from_eps_are_the_originals(golden):
    """(mean, var) with mean = coeff1 x_t - coeff2 eps and var = [posterior_var[1], betas[1:]][t],
    the original's, for both samplers; the guided one with (1 + w) eps(c) - w eps(null)."""
    from Diffusion.Diffusion import GaussianDiffusionSampler as Sampler
    from DiffusionFreeGuidence.DiffusionCondition import GaussianDiffusionSampler as GuidedSampler
    reference = golden["schedule_T1000_1e-4_0.02"]
    x_t, t = torch.randn(3, 3, 4, 4), torch.tensor([0, 500, 999])
    labels, w = torch.tensor([1, 2, 3]), 1.8
    eps = KnownEps()(x_t, t)
    guided_eps = (1 + w) * KnownEps()(x_t, t, labels) - w * KnownEps()(x_t, t, torch.zeros_like(labels))

    def expected(eps):
        coeff1, coeff2 = (reference[key][t].float()[:, None, None, None] for key in ("coeff1", "coeff2"))
        return coeff1 * x_t - coeff2 * eps, reference["sample_var"][t].float()[:, None, None, None]

    sampler = Sampler(KnownEps(), 1e-4, 0.02, 1000)
    guided = GuidedSampler(KnownEps(), 1e-4, 0.02, 1000, w=w)
    for got, (mean, var) in ((sampler.p_mean_variance(x_t, t), expected(eps)),
                             (guided.p_mean_variance(x_t, t, labels), expected(guided_eps))):
        assert len(got) == 2
        torch.testing.assert_close(got[0], mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], var, rtol=1e-6, atol=0)
    torch.testing.assert_close(sampler.predict_xt_prev_mean_from_eps(x_t, t, eps), expected(eps)[0],
                               rtol=1e-6, atol=1e-6)
    assert guided.w == w


def test_the_trainers_return_the_per_element_loss_and_the_samplers_an_image():
    from Diffusion.Diffusion import GaussianDiffusionSampler, GaussianDiffusionTrainer
    from DiffusionFreeGuidence import DiffusionCondition
    x_0, labels = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([1, 2])
    assert GaussianDiffusionTrainer(KnownEps(), 1e-4, 0.02, 10)(x_0).shape == x_0.shape
    assert DiffusionCondition.GaussianDiffusionTrainer(KnownEps(), 1e-4, 0.02, 10)(x_0, labels).shape == x_0.shape
    x_T = torch.randn(2, 3, 4, 4)
    sample = GaussianDiffusionSampler(KnownEps(), 1e-4, 0.02, 10)(x_T)
    guided = DiffusionCondition.GaussianDiffusionSampler(KnownEps(), 1e-4, 0.02, 10, w=0.5)(x_T, labels)
    for image in (sample, guided):
        assert image.shape == x_T.shape and image.abs().max() <= 1


def test_the_blocks_of_both_models_are_called_as_the_originals():
    from Diffusion import Model
    from DiffusionFreeGuidence import ModelCondition
    x, temb, t = torch.randn(2, 32, 8, 8), torch.randn(2, 128), torch.tensor([0, 9])
    assert Model.Swish()(x).shape == ModelCondition.Swish()(x).shape == x.shape
    assert Model.TimeEmbedding(10, 32, 128)(t).shape == ModelCondition.TimeEmbedding(10, 32, 128)(t).shape == (2, 128)
    assert ModelCondition.ConditionalEmbedding(3, 32, 128)(torch.tensor([0, 3])).shape == (2, 128)
    assert Model.DownSample(32)(x, temb).shape == ModelCondition.DownSample(32)(x, temb, temb).shape == (2, 32, 4, 4)
    assert Model.UpSample(32)(x, temb).shape == ModelCondition.UpSample(32)(x, temb, temb).shape == (2, 32, 16, 16)
    assert Model.AttnBlock(32)(x).shape == ModelCondition.AttnBlock(32)(x).shape == x.shape
    assert Model.ResBlock(32, 64, 128, 0.1)(x, temb).shape == (2, 64, 8, 8)
    block = ModelCondition.ResBlock(32, 64, 128, 0.1)
    assert isinstance(block.attn, Model.AttnBlock)  # the original's default: attention
    assert block(x, temb, temb).shape == (2, 64, 8, 8)
    unet = Model.UNet(T=10, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.1)
    unet.initialize()
    for block in (Model.TimeEmbedding(10, 32, 128), Model.DownSample(32), Model.UpSample(32),
                  Model.AttnBlock(32), Model.ResBlock(32, 64, 128, 0.1)):
        block.initialize()
    kept = torch.ones(4, 1, 2, 2)
    dropped = ModelCondition.drop_connect(kept, 0.5)
    assert set(dropped.unique().tolist()) <= {0., 2.}


def test_the_lr_warm_up_takes_the_originals_arguments():
    from Scheduler import GradualWarmupScheduler
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = GradualWarmupScheduler(optimizer, multiplier=2., warm_epoch=4)  # no after_scheduler
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-4, 1.25e-4, 1.5e-4, 1.75e-4, 2e-4, 2e-4, 2e-4, 2e-4])
    with pytest.warns(UserWarning):  # torch's deprecated form, as the original's
        scheduler.step(epoch=2, metrics=0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4)


# --- the original's dicts ------------------------------------------------------------------

TINY = {"device": "cpu", "epoch": 1, "batch_size": 4, "T": 10, "channel": 32, "channel_mult": [1, 2],
        "num_res_blocks": 1, "img_size": 8, "test_load_weight": "ckpt_0_.pt"}


@pytest.mark.parametrize("script, module, folder_key", [
    ("Main.py", "Diffusion.Train", "save_weight_dir"),
    ("MainCondition.py", "DiffusionFreeGuidence.TrainCondition", "save_dir")])
def test_the_originals_dicts_train_and_sample_as_they_are(reference, tmp_path, monkeypatch, script,
                                                          module, folder_key):
    """The original's modelConfig, with the device set to cpu, the sizes made tiny and a tiny
    dataset (a key the original lacks); every other key as the original ships it."""
    for seed, name in enumerate(["cat", "dog"]):
        write_images(tmp_path / "images" / name, 4, size=(8, 8), seed=seed)
    monkeypatch.chdir(tmp_path)
    config = {**api(reference)["modelConfig"][script], **TINY, "dataset": str(tmp_path / "images")}
    if "attn" in config:
        config["attn"] = [1]
    entry = importlib.import_module(module)
    entry.train(dict(config))
    assert (tmp_path / config[folder_key] / "ckpt_0_.pt").is_file()
    entry.eval({**config, "state": "eval"})
    for name in (config["sampledNoisyImgName"], config["sampledImgName"]):
        assert (tmp_path / config["sampled_dir"] / name).is_file()
