"""The paper's figures (Diffusion.py's latents, Likelihood.rate_and_distortion, Diffusion/Run/Figures.py):
each number against an independent computation, and each state run for both models, reading back
what it wrote."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import Main
import MainCondition
from benchmarks.stand_in_classifier import StandInClassifier, save_extractor
from conftest import REPO, as_arguments, run_or_fail, run_script, write_images
from Diffusion.Diffusion import GaussianDiffusionSampler
from Diffusion.Latents import decode, encode, interpolate, shared_latent_samples
from Diffusion.Likelihood import rate_and_distortion, variational_bound
from Diffusion.Model import UNet
from Diffusion.Run.Figures import closest, image_pairs, search_training_set
from Diffusion.Run.Processes import Process

T = 20


@pytest.fixture(scope="module")
def sampler():
    """Algorithm 2 with a tiny random UNet, T = 20, on 8x8 images, clipping its x_0."""
    torch.manual_seed(0)
    model = UNet(T=T, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.).eval()
    return GaussianDiffusionSampler(model, 1e-4, 0.2, T, clip_denoised=True)


@pytest.fixture(scope="module")
def images():
    """Three 8x8 RGB images on the pixel grid k / 127.5 - 1."""
    return torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(2)) / 127.5 - 1.


# --- rate and distortion (Fig. 5) --------------------------------------------------------------


def test_the_rate_is_the_bounds_parts_summed_from_L_T_down(sampler, images):
    measured = rate_and_distortion(images, sampler.p_mean_variance_and_x0, sampler.alphas_bar,
                                   torch.Generator().manual_seed(3))
    bound = variational_bound(images, sampler.p_mean_variance, sampler.alphas_bar, torch.Generator().manual_seed(3))
    rate = measured["rate"]
    assert rate.shape == (T + 1, 3)
    torch.testing.assert_close(rate[T], bound["prior"], rtol=1e-12, atol=0)  # before any step: x_T
    torch.testing.assert_close(rate[1], bound["prior"] + bound["diffusion"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rate[0], bound["total"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(measured["decoder"], bound["decoder"], rtol=1e-12, atol=0)
    assert (rate[:-1] >= rate[1:] - 1e-12).all()  # each step sends a KL, which is >= 0


def test_the_distortion_is_the_error_of_the_x_0_predicted_from_each_x_t(sampler, images):
    generator = torch.Generator().manual_seed(4)
    measured = rate_and_distortion(images, sampler.p_mean_variance_and_x0, sampler.alphas_bar, generator)
    assert (measured["squared_error"][0] == 0).all()  # x_0 itself has been received
    noises = torch.randn((T, *images.shape), generator=torch.Generator().manual_seed(4))
    abar = torch.cumprod(1. - torch.linspace(1e-4, 0.2, T, dtype=torch.float64), 0)
    for t in (1, 7, T):  # the paper's t: the network's input at index t - 1
        x_t = (abar[t - 1].sqrt() * images.double() + (1 - abar[t - 1]).sqrt() * noises[t - 1]).float()
        with torch.no_grad():
            eps = sampler.model(x_t, torch.full((3,), t - 1))
        x_0 = ((x_t - (1 - abar[t - 1]).sqrt().float() * eps) / abar[t - 1].sqrt().float()).clamp(-1, 1)
        pixels_error = (x_0.double() - images.double()) * 255. / 2.
        torch.testing.assert_close(measured["squared_error"][t], pixels_error.square().mean((1, 2, 3)),
                                   rtol=1e-4, atol=1e-3)


# --- shared latents and interpolation (Figs. 7 to 9) -------------------------------------------


def test_interpolation_at_lambda_0_and_1_gives_the_decodes_of_each_image(sampler, images):
    x_0, x_0_other = images[:2], images[1:]
    torch.manual_seed(5)
    mixes = interpolate(sampler, x_0, x_0_other, 10, [0., 0.5, 1.], seed=9)
    torch.manual_seed(5)
    noise = torch.randn_like(x_0)  # interpolate's draw of the shared noise
    for mix, source in ((mixes[0], x_0), (mixes[2], x_0_other)):
        torch.manual_seed(9)
        torch.testing.assert_close(mix, decode(sampler, encode(sampler, source, 10, noise), 10))
    assert not torch.allclose(mixes[1], mixes[0]) and not torch.allclose(mixes[1], mixes[2])


def test_interpolation_at_t_0_is_the_pixel_blend(sampler, images):
    mixes = interpolate(sampler, images[:2], images[1:], 0, [0., 0.3, 1.])
    for mix, weight in zip(mixes, [0., 0.3, 1.]):
        torch.testing.assert_close(mix, (1 - weight) * images[:2] + weight * images[1:])


def test_encoding_is_q_of_x_t_given_x_0(sampler, images):
    noise = torch.randn_like(images)
    abar = torch.cumprod(1. - torch.linspace(1e-4, 0.2, T, dtype=torch.float64), 0)[11].item()
    torch.testing.assert_close(encode(sampler, images, 12, noise),
                               math.sqrt(abar) * images + math.sqrt(1 - abar) * noise)


def test_shared_latent_samples_start_from_one_chains_x_t_and_differ(sampler):
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    latents, samples = shared_latent_samples(sampler, x_T, [T, 15, 5], 3)
    assert latents.shape == (3, 2, 3, 8, 8) and samples.shape == (3, 3, 2, 3, 8, 8)
    torch.testing.assert_close(latents[0], x_T)  # t = T: the chain's start
    chain = []
    torch.manual_seed(7)  # the same chain again, every x_t recorded
    sampler(x_T, on_step=lambda x_t, x_0: chain.append(x_t), progress=False)
    torch.testing.assert_close(latents[1], chain[T - 15])
    torch.testing.assert_close(latents[2], chain[T - 5])
    for step in range(3):  # the samples of one x_t differ from each other
        assert (samples[step, 0] - samples[step, 1]).abs().mean() > 1e-3
    # from x_5 they share more with each other than from x_T
    spread = [(samples[step] - samples[step].mean(0)).square().mean().item() for step in range(3)]
    assert spread[2] < spread[0]


def test_image_pairs_are_spread_over_the_set_and_share_a_class_when_labelled():
    assert image_pairs(6, [0, 1, 1, 2, 0, 2], 3) == [(0, 4), (1, 2), (3, 5)]  # classes 0, 1, 2 in turn
    assert image_pairs(6, [0, 1, 1, 0, 0, 0], 3) == [(0, 3), (1, 2), (4, 5)]  # then class 0's next pair
    assert image_pairs(6, None, 2) == [(0, 1), (2, 3)]
    assert image_pairs(100, None, 2) == [(0, 25), (50, 75)]
    with pytest.raises(ValueError, match="figure_images 4"):
        image_pairs(6, [0, 1, 1, 2, 0, 2], 4)
    with pytest.raises(ValueError, match="figure_images 4"):
        image_pairs(6, None, 4)


# --- nearest neighbours ------------------------------------------------------------------------


def test_closest_finds_the_k_nearest_as_a_brute_force_search_does():
    generator = torch.Generator().manual_seed(8)
    queries, candidates = torch.randn(4, 5, generator=generator), torch.randn(30, 5, generator=generator)
    best = None
    for first in range(0, 30, 7):  # in batches, as the training set is searched
        best = closest(queries, candidates[first:first + 7], torch.arange(first, min(first + 7, 30)), 3, best)
    distances = np.linalg.norm(queries.numpy()[:, None] - candidates.numpy()[None], axis=2)
    np.testing.assert_array_equal(best[1].numpy(), np.argsort(distances, axis=1)[:, :3])
    np.testing.assert_allclose(best[0].numpy(), np.sort(distances, axis=1)[:, :3], rtol=1e-6)


def test_a_sample_that_copies_a_training_image_finds_it(tmp_path):
    write_images(tmp_path / "training", 12, size=(8, 8), seed=3)
    torch.manual_seed(0)
    save_extractor(StandInClassifier(num_classes=4, width=4), tmp_path / "extractor.pt")
    from Diffusion.Run.Metrics import extractor_of, reference_images
    config = {"dataset": str(tmp_path / "training"), "data_root": str(tmp_path), "img_size": 8,
              "batch_size": 5, "num_workers": 0, "neighbours": 2}
    training = reference_images(config)
    copies = torch.stack([training[4][0], training[9][0]])
    found = search_training_set(copies, training, extractor_of(str(tmp_path / "extractor.pt"), 8), config,
                                Process(torch.device("cpu")))
    for space in ("pixels", "features"):
        distances, indices = found[space]
        assert indices[:, 0].tolist() == [4, 9] and distances[:, 0].tolist() == [0., 0.]
        assert (distances[:, 1] > 0).all()


# --- the states, for both models ---------------------------------------------------------------


def figure_config(trained, tmp_path, state, **changes):
    return {**trained, "state": state, "test_load_weight": "ckpt_0_.pt", "sampled_dir": str(tmp_path / "figures"),
            "batch_size": 4, **changes}


@pytest.fixture
def held_out(tmp_path):
    return write_images(tmp_path / "held_out", 6, size=(8, 8), seed=7)


def test_state_rate_distortion_writes_the_curve_the_summary_and_the_plot(trained_unconditional, tmp_path, held_out):
    config = figure_config(trained_unconditional, tmp_path, "rate_distortion", nll_dataset=str(held_out), nll_images=5)
    process = run_or_fail("Main.py", *as_arguments(config), cwd=tmp_path)
    figures = tmp_path / "figures"
    with open(figures / "rate_distortion.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["t"]) for row in rows] == list(range(10, -1, -1))  # T = 10, then 0
    summary = json.loads((figures / "rate_distortion.json").read_text())
    assert summary["images"] == 5
    assert float(rows[-1]["rate_bits_per_dim"]) == pytest.approx(summary["bound_bits_per_dim"], abs=1e-5)
    assert float(rows[-1]["distortion_rmse"]) == 0. and float(rows[-2]["distortion_rmse"]) > 0.
    assert summary["bound_bits_per_dim"] == pytest.approx(
        summary["rate_bits_per_dim"] + summary["distortion_bits_per_dim"], abs=1e-9)
    assert f"rate {summary['rate_bits_per_dim']:.3f} bits/dim" in process.stdout
    with Image.open(figures / "rate_distortion.png") as plot:
        assert plot.size[0] > 800  # three panels side by side


def test_state_rate_distortion_of_the_guided_model_has_a_curve_per_w(trained_conditional, tmp_path):
    for name in ("cat", "airplane", "bird"):
        write_images(tmp_path / "held_out" / name, 2, size=(8, 8), seed=len(name))
    MainCondition.main(figure_config(trained_conditional, tmp_path, "rate_distortion",
                                     nll_dataset=str(tmp_path / "held_out"), w=[0., 2.]))
    first, second = (json.loads((tmp_path / "figures" / f"rate_distortion_w{w}.json").read_text()) for w in (0, 2))
    assert first["images"] == second["images"] == 6
    assert first["bound_bits_per_dim"] != second["bound_bits_per_dim"]


def grid_shape(path):
    with Image.open(path) as picture:
        return picture.size


def test_state_shared_latents_draws_a_row_per_chain_and_t(trained_unconditional, tmp_path):
    Main.main(figure_config(trained_unconditional, tmp_path, "shared_latents", figure_images=2,
                            latent_steps=[10, 5, 2], latent_samples=3))
    width, height = grid_shape(tmp_path / "figures" / "shared_latents.png")
    assert (width, height) == (4 * 10 + 2, 2 * 3 * 10 + 2)  # 1 + 3 columns, 2 chains x 3 t rows of 8px
    assert json.loads((tmp_path / "figures" / "shared_latents.json").read_text())["t"] == [10, 5, 2]


def test_states_interpolate_and_coarse_to_fine_of_both_models(trained_unconditional, trained_conditional,
                                                              tmp_path, held_out):
    Main.main(figure_config(trained_unconditional, tmp_path, "interpolate", nll_dataset=str(held_out),
                            figure_images=2))
    assert grid_shape(tmp_path / "figures" / "interpolate.png") == (13 * 10 + 2, 2 * 10 + 2)
    recorded = json.loads((tmp_path / "figures" / "interpolate.json").read_text())
    assert recorded["t"] == [5] and recorded["held_out_pairs"] == [[0, 1], [2, 3]]
    for name in ("cat", "airplane", "bird"):
        write_images(tmp_path / "classes" / name, 2, size=(8, 8), seed=len(name))
    MainCondition.main(figure_config(trained_conditional, tmp_path, "coarse_to_fine", w=[1.],
                                     nll_dataset=str(tmp_path / "classes"), figure_images=3))
    assert grid_shape(tmp_path / "figures" / "coarse_to_fine_w1.png") == (13 * 10 + 2, 3 * 5 * 10 + 2)
    recorded = json.loads((tmp_path / "figures" / "coarse_to_fine_w1.json").read_text())
    assert recorded["t"] == [0, 2, 5, 7, 10]  # 0, T/4, T/2, 3T/4, T


@pytest.fixture
def extractor(tmp_path):
    torch.manual_seed(0)
    save_extractor(StandInClassifier(num_classes=4, width=4), tmp_path / "extractor.pt")
    return str(tmp_path / "extractor.pt")


def test_state_quality_over_time_scores_the_predicted_x_0_at_each_point(trained_unconditional, tmp_path, extractor):
    config = figure_config(trained_unconditional, tmp_path, "quality_over_time", num_samples=6, quality_steps=3,
                           fid_extractor=extractor, fid_stats_dir=str(tmp_path / "stats"))
    run_or_fail("Main.py", *as_arguments(config), cwd=tmp_path)
    figures = tmp_path / "figures"
    with open(figures / "quality_over_time.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["reverse_steps"]) for row in rows] == [0, 5, 10]
    assert all(float(row["fid"]) >= 0 and float(row["is"]) >= 1 - 1e-6 for row in rows)
    assert sorted(path.name for path in (figures / "quality_over_time").iterdir()) == [
        "steps_00000", "steps_00005", "steps_00010"]
    assert len(list((figures / "quality_over_time" / "steps_00010").glob("*.png"))) == 6
    assert (figures / "quality_over_time.png").is_file()


def test_state_quality_over_time_needs_samples(trained_unconditional, tmp_path):
    process = run_script("Main.py", *as_arguments(figure_config(trained_unconditional, tmp_path, "quality_over_time")),
                         cwd=tmp_path)
    assert process.returncode == 2 and "num_samples is 0" in process.stderr


def test_state_neighbours_of_the_guided_model(trained_conditional, tmp_path, extractor):
    MainCondition.main(figure_config(trained_conditional, tmp_path, "neighbours", w=[2.], figure_images=3,
                                     neighbours=4, fid_extractor=extractor))
    found = json.loads((tmp_path / "figures" / "neighbours_w2.json").read_text())
    for space in ("pixels", "features"):
        assert len(found[space]) == 3 and all(len(row) == 4 for row in found[space])
        assert all(row[0][0] <= row[-1][0] for row in found[space])  # nearest first
        assert grid_shape(tmp_path / "figures" / f"neighbours_{space}_w2.png") == (5 * 10 + 2, 3 * 10 + 2)


def test_a_step_beyond_T_is_refused_at_start_up(trained_unconditional, tmp_path):
    process = run_script("Main.py", *as_arguments(figure_config(trained_unconditional, tmp_path, "shared_latents",
                                                                latent_steps=[10, 11])), cwd=tmp_path)
    assert process.returncode == 2
    assert "latent_steps must hold steps t from 1 to T = 10" in process.stderr and "[11]" in process.stderr


def test_two_processes_find_the_neighbours_one_process_finds(trained_unconditional, tmp_path, extractor):
    """Under torchrun each process searches its share of the training set, and the first merges
    them: the same neighbours as one process (rate_distortion shares state nll's tested sums)."""
    config = figure_config(trained_unconditional, tmp_path, "neighbours", fid_extractor=extractor, figure_images=2,
                           neighbours=3, batch_size=3)
    Main.main(config)
    one = json.loads((tmp_path / "figures" / "neighbours.json").read_text())
    config["sampled_dir"] = str(tmp_path / "two")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "Main.py"), *as_arguments(config)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "neighbours.json").read_text())
    for space in ("pixels", "features"):
        assert [[index for _, index in row] for row in two[space]] == [[index for _, index in row] for row in one[space]]
        assert [d for row in two[space] for d, _ in row] == pytest.approx([d for row in one[space] for d, _ in row],
                                                                          rel=1e-6)


def test_without_matplotlib_a_plotting_state_says_how_to_install_it(trained_unconditional, tmp_path, held_out,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ValueError, match="matplotlib.*pip install -r requirements-optional.txt"):
        Main.main(figure_config(trained_unconditional, tmp_path, "rate_distortion", nll_dataset=str(held_out)))
    assert not (tmp_path / "figures").exists()  # stopped before any work
