"""Classifier-free guidance (Ho & Salimans 2022): the guided estimate, label dropout,
MainCondition.py's training and eval, and its reuse of Diffusion/."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import Diffusion.Diffusion
import Diffusion.Model
import Diffusion.Train
import MainCondition
from conftest import (
    as_arguments,
    defaults_of,
    grid_size,
    run_or_fail,
    run_script,
    training_dataset_of,
    write_images,
)
from Diffusion.Run import Evaluation
from Diffusion.Run.Checkpoints import RUN_INFO, TRAINING_STATE, read_run_info
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Processes import SINGLE_PROCESS, GlobalBatchRandomness
from Diffusion.Run.Checkpoints import LOG, TENSORBOARD
from DiffusionFreeGuidence import DiffusionCondition, ModelCondition, TrainCondition
from DiffusionFreeGuidence.TrainCondition import condition_of, drop_labels, guided_loss


def png_size(path):
    with Image.open(path) as image:
        return image.size


# --- the guided noise estimate -------------------------------------------------------------


@pytest.mark.parametrize("w", [0., 1.8])
def test_guided_estimate_in_one_pass_equals_two_separate_passes(w):
    torch.manual_seed(0)
    model = ModelCondition.UNet(T=10, num_labels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, dropout=0.1).eval()
    batches = []
    model.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    sampler = Diffusion.Diffusion.GaussianDiffusionSampler(DiffusionCondition.ClassifierFreeGuidance(model, w),
                                                           1e-4, 0.02, 10)
    x_t, t, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 6, 9]), torch.tensor([1, 2, 3, 1])

    with torch.no_grad():
        got, _ = sampler.denoise(x_t, t, labels)  # every step: positions are timesteps
        assert batches == ([8] if w else [4])  # one forward pass
        eps_cond = model(x_t, t, labels)
        eps_null = model(x_t, t, torch.zeros_like(labels))
    expected = (1 + w) * eps_cond - w * eps_null
    assert (eps_cond - eps_null).abs().max() > 1e-2  # the label matters, so w is tested
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    if w == 0:
        assert ((got - eps_cond).abs().max() / eps_cond.abs().max()).item() < 1e-5


# --- label dropout -------------------------------------------------------------------------


def test_labels_are_dropped_with_probability_p_uncond():
    torch.manual_seed(0)
    labels = torch.randint(1, 11, (100_000,))
    dropped = drop_labels(labels, 0.1)
    is_null = dropped == 0
    assert abs(is_null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others are untouched


def test_labels_are_dropped_per_example_not_per_batch():
    torch.manual_seed(0)
    for _ in range(20):
        dropped = (drop_labels(torch.randint(1, 11, (1000,)), 0.1) == 0).sum().item()
        assert 0 < dropped < 1000


def test_batch_label_dropout_drops_the_whole_batch_with_probability_p_uncond():
    """The original's choice: label_dropout "batch"."""
    torch.manual_seed(0)
    dropped_batches = 0
    for _ in range(2000):
        dropped = drop_labels(torch.randint(1, 11, (8,)), 0.1, mode="batch") == 0
        assert dropped.all() or not dropped.any()
        dropped_batches += bool(dropped.all())
    assert abs(dropped_batches / 2000 - 0.1) < 0.02


def test_label_dropout_of_a_process_is_its_share_of_the_global_batchs():
    """Two processes draw the dropout of the global batch alike and keep their own labels."""
    labels = torch.arange(1, 9)
    whole = drop_labels(labels, 0.5, "example", GlobalBatchRandomness(torch.Generator().manual_seed(3)))
    shares = [drop_labels(labels[rank::2], 0.5, "example",
                          GlobalBatchRandomness(torch.Generator().manual_seed(3), rank, world_size=2))
              for rank in (0, 1)]
    assert torch.equal(shares[0], whole[0::2]) and torch.equal(shares[1], whole[1::2])
    assert 0 < (whole == 0).sum() < 8


@pytest.mark.parametrize("p_uncond, expected", [(0., [3, 1, 7]), (1., [0, 0, 0])])
def test_label_dropout_at_probability_0_and_1(p_uncond, expected):
    assert drop_labels(torch.tensor([3, 1, 7]), p_uncond).tolist() == expected


@pytest.mark.parametrize("p_uncond, seen", [(0., [1, 2, 3]), (1., [0, 0, 0])])
def test_training_shifts_labels_so_that_0_is_the_null_label(p_uncond, seen):
    class Recording(torch.nn.Module):
        def forward(self, x_t, t, labels):
            self.labels = labels
            return torch.zeros_like(x_t)

    model = Recording()
    trainer = DiffusionCondition.GaussianDiffusionTrainer(model, 1e-4, 0.02, 10)
    condition = condition_of({"p_uncond": p_uncond, "label_dropout": "example"})
    loss = guided_loss(trainer(torch.zeros(3, 3, 4, 4), *condition(torch.tensor([0, 1, 2]), SINGLE_PROCESS)), 3)
    assert model.labels.tolist() == seen
    assert loss.shape == () and torch.isfinite(loss)


def test_conditional_training_needs_one_subfolder_per_class(tmp_path):
    flat = write_images(tmp_path / "flat", 8)
    config = {**defaults_of("MainCondition"), "dataset": str(flat), "batch_size": 4}
    with pytest.raises(ConfigError, match="subfolder"):
        training_dataset_of(config, labelled=True)


def test_class_subfolders_are_labelled_in_sorted_order(class_folders):
    config = {**defaults_of("MainCondition"), "dataset": str(class_folders), "batch_size": 4, "img_size": 8}
    dataset = training_dataset_of(config, labelled=True)
    assert dataset.classes == ["airplane", "bird", "cat"]
    assert sorted(set(label for _, label in dataset.samples)) == [0, 1, 2]


# --- MainCondition.py ----------------------------------------------------------------------


def test_training_run_writes_a_checkpoint_of_the_classes_in_save_dir(trained_conditional):
    folder = Path(trained_conditional["save_dir"])
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt_0_.pt", RUN_INFO, TENSORBOARD, LOG, TRAINING_STATE]
    assert read_run_info(folder)["classes"] == ["airplane", "bird", "cat"]
    state_dict = torch.load(folder / "ckpt_0_.pt", weights_only=True)
    assert state_dict["cond_embedding.condEmbedding.0.weight"].shape == (4, 32)  # 3 classes + null
    assert state_dict["time_embedding.timembedding.0.weight"].shape == (10, 32)
    model = TrainCondition.unet_of(trained_conditional, num_labels=3)
    model.load_state_dict(state_dict, strict=True)


def eval_config(trained_conditional, tmp_path, **changes):
    return {**trained_conditional, "state": "eval", "test_load_weight": "ckpt_0_.pt",
            "sampled_dir": str(tmp_path / "samples"), **changes}


def test_eval_grids_put_one_class_per_row_and_one_grid_per_w_side_by_side(trained_conditional, tmp_path):
    config = eval_config(trained_conditional, tmp_path, batch_size=6, w=[0., 2.])
    run_or_fail("MainCondition.py", *as_arguments(config), cwd=tmp_path)
    size = config["img_size"]
    one_grid = grid_size(6, 2, size)  # 3 classes, 2 images of each: 3 rows of 2
    assert one_grid == (22, 32)
    assert png_size(tmp_path / "samples" / config["sampledNoisyImgName"]) == one_grid
    # two grids, each framed by padding 2, side by side
    width, height = png_size(tmp_path / "samples" / config["sampledImgName"])
    assert (width, height) == (2 * (one_grid[0] + 2) + 2, one_grid[1] + 4)


def test_eval_with_one_w_writes_one_grid_with_a_row_per_class(trained_conditional, tmp_path, sampled_labels):
    config = eval_config(trained_conditional, tmp_path, batch_size=6, w=1.8)
    MainCondition.main(config)
    assert sampled_labels == [[1, 1, 2, 2, 3, 3]]  # rows: classes 0, 1, 2 (labels shifted by one)
    one_grid = grid_size(6, 2, config["img_size"])  # save_image leaves a single grid unframed
    assert png_size(tmp_path / "samples" / config["sampledImgName"]) == one_grid


def test_eval_labels_select_the_classes_of_the_rows(trained_conditional, tmp_path, sampled_labels):
    config = eval_config(trained_conditional, tmp_path, batch_size=6, labels=[0, 2], w=1.)
    MainCondition.main(config)
    assert sampled_labels == [[1, 1, 1, 3, 3, 3]]
    one_grid = grid_size(6, 3, config["img_size"])  # 2 classes, 3 images of each
    assert png_size(tmp_path / "samples" / config["sampledNoisyImgName"]) == one_grid == (32, 22)
    assert png_size(tmp_path / "samples" / config["sampledImgName"]) == one_grid


def test_eval_uses_the_same_noise_for_every_w(trained_conditional, tmp_path):
    config = eval_config(trained_conditional, tmp_path, batch_size=3, w=[1., 1.])
    MainCondition.main(config)
    with Image.open(tmp_path / "samples" / config["sampledImgName"]) as image:
        pixels = np.asarray(image)
    width, height = grid_size(3, 1, config["img_size"])  # one image of each class
    assert pixels.shape == (height + 4, 2 * (width + 2) + 2, 3)
    left, right = pixels[:, 2:2 + width], pixels[:, width + 4:2 * width + 4]
    assert np.array_equal(left, right)
    assert left.std() > 0


def test_eval_of_a_label_out_of_range_is_refused(trained_conditional, tmp_path):
    with pytest.raises(ConfigError) as error:
        MainCondition.main(eval_config(trained_conditional, tmp_path, labels=[0, 3]))
    assert "class 3" in str(error.value) and "0..2" in str(error.value)
    assert not (tmp_path / "samples").exists()


def test_eval_with_fewer_images_than_classes_is_refused(trained_conditional, tmp_path):
    with pytest.raises(ConfigError, match="batch_size 2"):
        MainCondition.main(eval_config(trained_conditional, tmp_path, batch_size=2))


def test_eval_of_an_unconditional_checkpoint_says_to_use_main(trained_conditional, trained_unconditional, tmp_path):
    config = eval_config(trained_conditional, tmp_path, save_dir=trained_unconditional["save_weight_dir"])
    process = run_script("MainCondition.py", *as_arguments(config), cwd=tmp_path)
    assert process.returncode == 1
    assert "error:" in process.stderr and "Main.py" in process.stderr
    assert "unconditional" in process.stderr
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "samples").exists()


# --- reuse of Diffusion/ -------------------------------------------------------------------


def test_conditional_model_is_built_from_the_unconditional_blocks():
    assert issubclass(ModelCondition.ResBlock, Diffusion.Model.ResBlock)
    assert issubclass(ModelCondition.TimeEmbedding, Diffusion.Model.TimeEmbedding)
    assert ModelCondition.AttnBlock is Diffusion.Model.AttnBlock
    assert issubclass(ModelCondition.UNet, Diffusion.Model.UNetBody)
    assert issubclass(Diffusion.Model.UNet, Diffusion.Model.UNetBody)
    for name in ("ResBlock", "TimeEmbedding"):  # the original's names, with nothing but their defaults
        own = set(vars(getattr(ModelCondition, name))) - {"__module__", "__doc__", "__qualname__"}
        assert own == {"__init__"}, name


def test_guided_diffusion_reuses_the_unconditional_algorithms_and_recipe():
    """Guidance is a noise model inside Diffusion's samplers; the original's guided sampler is
    Algorithm 2 around it, and training and eval are Diffusion's."""
    assert issubclass(DiffusionCondition.GaussianDiffusionSampler, Diffusion.Diffusion.GaussianDiffusionSampler)
    model = ModelCondition.UNet(T=10, num_labels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, dropout=0.)
    sampler = DiffusionCondition.GaussianDiffusionSampler(model, 1e-4, 0.02, 10, w=1.8)
    assert isinstance(sampler.model, DiffusionCondition.ClassifierFreeGuidance) and sampler.model.w == 1.8
    assert DiffusionCondition.GaussianDiffusionTrainer is Diffusion.Diffusion.GaussianDiffusionTrainer
    assert TrainCondition.fit is Diffusion.Train.fit
    assert TrainCondition.evaluate is Evaluation.evaluate
