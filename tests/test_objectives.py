"""Table 2's objectives and parameterizations (the end of Diffusion/Likelihood.py): the true bound, the hybrid
loss, mu prediction, the learned variances and importance sampling of t, each against an
independent computation; then real runs of both scripts with each row, and an exact resume."""
import importlib
import json
import math
import signal
from pathlib import Path

import pytest
import torch

import Main
from conftest import as_arguments, log_lines, run_or_fail, script_config, start_script, wait_until, write_images
from Diffusion.Diffusion import (
    GaussianDiffusionSampler,
    GaussianDiffusionTrainer,
    eps_and_x0,
    linear_betas,
    target_of,
)
from Diffusion.Likelihood import (
    HISTORY,
    UNIFORM_SHARE,
    ImportanceSampling,
    bound_term,
    normal_kl,
    posterior_mean_variance,
)
from Diffusion.Model import UNet
from Diffusion.Run.Checkpoints import TRAINING_STATE
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Processes import GlobalBatchRandomness

T, BETA_1, BETA_T = 10, 1e-4, 0.2


def network(out_channels=1):
    """A tiny real UNet of one-channel images whose last conv is not near zero, so that its
    outputs (and the variance channels among them) differ from image to image."""
    torch.manual_seed(0)
    model = UNet(T=T, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0., img_channels=1,
                 out_channels=out_channels)
    torch.nn.init.normal_(model.tail[-1].weight, std=0.02)
    return model.eval()


def images(count=4, size=8, seed=0):
    """x_0 [count, 1, size, size] on the pixel values' bin centres k / 127.5 - 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, size, size), generator=generator) / 127.5 - 1.


def schedule():
    betas = linear_betas(BETA_1, BETA_T, T)
    return betas, torch.cumprod(1. - betas, 0)


def test_the_gaussian_kl_is_torch_distributions():
    generator = torch.Generator().manual_seed(1)
    mean_1, mean_2 = torch.randn(2, 100, generator=generator, dtype=torch.float64)
    var_1, var_2 = torch.rand(2, 100, generator=generator, dtype=torch.float64) + 0.01
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean_1, var_1.sqrt()),
                                                 torch.distributions.Normal(mean_2, var_2.sqrt()))
    torch.testing.assert_close(normal_kl(mean_1, var_1, mean_2, var_2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variance, prediction", [("fixedlarge", "eps"), ("fixedsmall", "mu"),
                                                  ("learned", "eps"), ("learned_range", "v")])
@pytest.mark.parametrize("index", [0, 4, T - 1])
def test_the_bound_loss_at_a_sampled_t_is_the_nll_commands_term(variance, prediction, index):
    model = network(2 if variance.startswith("learned") else 1)
    trainer = GaussianDiffusionTrainer(model, BETA_1, BETA_T, T, prediction=prediction, loss="bound",
                                       variance=variance)
    sampler = GaussianDiffusionSampler(model, BETA_1, BETA_T, T, variance=variance, prediction=prediction)
    x_0, noise = images(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((4,), index)
    with torch.no_grad():
        trained = trainer(x_0, t=t, noise=noise).double().flatten(1).sum(1) * math.log(2.) / T
        nll_term, _ = bound_term(x_0, sampler.p_mean_variance, schedule()[1], index, noise)
    torch.testing.assert_close(trained, nll_term, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_the_bound_with_a_fixed_variance_is_the_papers_weighted_mse_plus_a_constant(variance):
    """Eq. 12: L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2 + C_t,
    C_t = 1/2 (log(sigma_t^2 / beta~_t) + beta~_t / sigma_t^2 - 1) per dimension, for t >= 2."""
    model = network()
    trainer = GaussianDiffusionTrainer(model, BETA_1, BETA_T, T, loss="bound", variance=variance)
    betas, alphas_bar = schedule()
    x_0, noise = images(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1, 3, 6, 9])
    with torch.no_grad():
        nats = trainer(x_0, t=t, noise=noise).double() * math.log(2.) / T
        abar = alphas_bar[t].view(-1, 1, 1, 1)
        x_t = (abar.sqrt().float() * x_0 + (1. - abar).sqrt().float() * noise)
        eps_theta = model(x_t, t).double()
    beta, abar_prev = betas[t].view(-1, 1, 1, 1), alphas_bar[t - 1].view(-1, 1, 1, 1)
    beta_tilde = (1. - abar_prev) / (1. - abar) * beta
    sigma_squared = beta if variance == "fixedlarge" else beta_tilde
    weight = beta ** 2 / (2. * sigma_squared * (1. - beta) * (1. - abar))
    constant = 0.5 * (torch.log(sigma_squared / beta_tilde) + beta_tilde / sigma_squared - 1.)
    torch.testing.assert_close(nats, weight * (noise.double() - eps_theta) ** 2 + constant, rtol=1e-3, atol=1e-6)


def test_learned_range_at_v_0_and_1_is_the_posterior_variance_and_beta():
    sampler = GaussianDiffusionSampler(None, BETA_1, BETA_T, T, variance="learned_range")
    betas, alphas_bar = schedule()
    beta_tilde = betas[1:] * (1. - alphas_bar[:-1]) / (1. - alphas_bar[1:])  # t = 2..T
    x_t, i = torch.zeros(T, 1, 2, 2), torch.arange(T)
    at_0 = sampler.sigma_squared(x_t, i, torch.zeros_like(x_t))[:, 0, 0, 0].double()
    at_1 = sampler.sigma_squared(x_t, i, torch.ones_like(x_t))[:, 0, 0, 0].double()
    torch.testing.assert_close(at_1, betas, rtol=1e-5, atol=0)
    torch.testing.assert_close(at_0[1:], beta_tilde, rtol=1e-5, atol=0)
    torch.testing.assert_close(at_0[0], beta_tilde[0], rtol=1e-5, atol=0)  # the clipped first entry


class KeepsItsOutput(torch.nn.Module):
    """The network, its output kept with its gradient."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, t):
        self.output = self.model(x_t, t)
        self.output.retain_grad()
        return self.output


def output_gradient(loss):
    """The gradient of `loss` on the outputs of a network with a learned_range variance: [4, 2, 8, 8]."""
    model = KeepsItsOutput(network(2))
    trainer = GaussianDiffusionTrainer(model, BETA_1, BETA_T, T, loss=loss, variance="learned_range")
    t = torch.tensor([0, 2, 5, 9])  # the decoder's step among them
    trainer(images(), t=t, noise=torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))).sum().backward()
    return model.output.grad


def test_the_hybrid_loss_trains_the_mean_as_l_simple_and_the_variance_by_the_bound():
    hybrid, simple = output_gradient("hybrid"), output_gradient("simple")
    assert hybrid.isfinite().all() and simple[:, 1:].eq(0).all()
    torch.testing.assert_close(hybrid[:, :1], simple[:, :1], rtol=0, atol=0)
    assert hybrid[:, 1:].abs().min() > 0  # every variance output learns from L_vlb


def test_mu_prediction_converts_exactly_both_ways():
    """The target mu~_t is Eq. 7's posterior mean, and reading it back gives eps and x_0: exact in
    float64, to float32's precision as trained."""
    betas, alphas_bar = schedule()
    t = torch.arange(T).repeat_interleave(2)
    x_0 = images(2 * T, 4).double()
    eps = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    alpha, sigma = alphas_bar[t].sqrt().view(-1, 1, 1, 1), (1. - alphas_bar[t]).sqrt().view(-1, 1, 1, 1)
    alpha_step = (1. - betas[t]).view(-1, 1, 1, 1)
    x_t = alpha * x_0 + sigma * eps
    posterior_mean, _ = posterior_mean_variance(x_0, x_t, t, alphas_bar)  # Eq. 7
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        x_0_, eps_, x_t_, alpha_, sigma_, step_ = (v.to(dtype) for v in (x_0, eps, x_t, alpha, sigma, alpha_step))
        mu = target_of("mu", x_0_, eps_, alpha_, sigma_, step_)
        torch.testing.assert_close(mu.double(), posterior_mean, rtol=0, atol=tolerance)
    eps_back, x_0_back = eps_and_x0("mu", posterior_mean, x_t, alpha, sigma, alpha_step)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(x_0_back, x_0, rtol=0, atol=1e-9)


def filled_history(terms_of_t):
    """An ImportanceSampling whose history holds HISTORY values around each t's term."""
    sampler = ImportanceSampling(T)
    for round_ in range(HISTORY):
        sampler.record(torch.arange(T), terms_of_t * (1. + 0.1 * (-1) ** round_))
    return sampler


def test_importance_sampling_is_uniform_until_every_term_has_its_history():
    sampler = ImportanceSampling(T)
    sampler.record(torch.arange(T - 1).repeat(HISTORY), torch.ones((T - 1) * HISTORY))
    torch.testing.assert_close(sampler.probabilities(), torch.full((T,), 1. / T, dtype=torch.float64))


def test_importance_sampling_weights_are_unbiased():
    terms_of_t = torch.logspace(-2, 3, T, dtype=torch.float64)  # terms as unequal as the bound's
    sampler = filled_history(terms_of_t)
    p = sampler.probabilities()
    root_mean_square = terms_of_t * math.sqrt(1.01)
    torch.testing.assert_close(p, root_mean_square / root_mean_square.sum() * (1 - UNIFORM_SHARE) + UNIFORM_SHARE / T)
    # exactly: sum_t p_t L_t / (T p_t) = mean_t L_t
    torch.testing.assert_close((p * terms_of_t / (T * p)).sum(), terms_of_t.mean())
    # and by drawing: the weighted mean of the drawn terms is the uniform mean
    draws = GlobalBatchRandomness(torch.Generator().manual_seed(6))
    t, weights = sampler.draw(draws, 200_000, torch.device("cpu"))
    assert torch.bincount(t, minlength=T)[-1] > torch.bincount(t, minlength=T)[0] * 100
    torch.testing.assert_close((terms_of_t[t] * weights.double()).mean(), terms_of_t.mean(), rtol=0.01, atol=0)


# --- real runs --------------------------------------------------------------------------------

TINY = {"T": 10, "channel": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "img_size": 8, "batch_size": 8,
        "epoch": 1, "num_workers": 0, "device": "cpu", "seed": 0, "dropout": 0., "nrow": 4, "process_frames": 0}


@pytest.fixture(scope="module")
def folder_of_images(tmp_path_factory):
    """16 images of two classes, a subfolder each."""
    root = tmp_path_factory.mktemp("table2") / "images"
    for seed, name in enumerate(["coats", "shoes"]):
        write_images(root / name, 8, size=(8, 8), seed=seed)
    return root


@pytest.mark.parametrize("row", [
    {"prediction": "mu", "loss": "bound", "variance": "learned"},
    {"prediction": "mu", "loss": "simple"},
    {"prediction": "eps", "loss": "bound", "variance": "fixedsmall", "t_sampling": "importance", "accumulate": 2},
], ids=["mu-bound-learned", "mu-mse", "eps-bound-importance-accumulated"])
def test_each_row_of_table_2_trains_and_samples(row, folder_of_images, tmp_path):
    config = {**TINY, **row, "attn": [1], "dataset": str(folder_of_images), "save_weight_dir": str(tmp_path / "ckpt"),
              "sampled_dir": str(tmp_path / "samples")}
    Main.main({**config, "state": "train"})
    Main.main({**config, "state": "eval", "test_load_weight": "ckpt_0_.pt", "batch_size": 4})
    recorded = json.loads((tmp_path / "ckpt" / "run.json").read_text())
    recorded_keys = [key for key in row if key in ("prediction", "loss", "variance")]
    assert {key: recorded[key] for key in recorded_keys} == {key: row[key] for key in recorded_keys}
    assert (tmp_path / "samples" / "SampledNoGuidenceImgs.png").stat().st_size > 0


@pytest.mark.parametrize("script, folder_key", [("Main.py", "save_weight_dir"), ("MainCondition.py", "save_dir")])
def test_the_hybrid_row_trains_samples_and_refuses_other_settings_in_both_scripts(
        script, folder_key, folder_of_images, tmp_path):
    name = script[:-3]
    row = {"loss": "hybrid", "variance": "learned_range"}
    paths = {"dataset": folder_of_images, folder_key: tmp_path / "ckpt", "sampled_dir": tmp_path / "samples"}
    attention = {"attn": [1]} if name == "Main" else {}  # the conditional model's is fixed
    config = script_config(name, {**TINY, **row, **attention, "batch_size": 10}, **paths)
    run_or_fail(script, *as_arguments(config), cwd=tmp_path)
    recorded = json.loads((tmp_path / "ckpt" / "run.json").read_text())
    assert (recorded["loss"], recorded["variance"], recorded["prediction"]) == ("hybrid", "learned_range", "eps")
    sample = {**config, "state": "eval", "test_load_weight": "ckpt_0_.pt"}
    run_or_fail(script, *as_arguments(sample), cwd=tmp_path)
    assert any((tmp_path / "samples").glob("Sampled*.png"))
    with pytest.raises(ConfigError, match="trained with variance 'learned_range'.*--variance learned_range"):
        importlib.import_module(name).main({**sample, "variance": "fixedlarge"})
    (tmp_path / "ckpt" / "run.json").unlink()  # a checkpoint copied without its record
    with pytest.raises(ConfigError, match="it learned its variance .*: set variance learned or learned_range"):
        importlib.import_module(name).main({**sample, "variance": "fixedlarge"})


def test_continuing_a_run_with_another_loss_is_refused(folder_of_images, tmp_path):
    config = {**TINY, "attn": [1], "loss": "bound", "dataset": str(folder_of_images),
              "save_weight_dir": str(tmp_path / "ckpt")}
    Main.main({**config, "state": "train"})
    with pytest.raises(ConfigError, match="trained with loss 'bound'.*--loss bound"):
        Main.main({**config, "state": "train", "loss": "simple", "training_load_weight": "last", "epoch": 2})


IMPORTANCE_RUN = {**TINY, "T": 4, "beta_T": 0.5, "attn": [1], "batch_size": 4, "epoch": 5, "loss": "bound",
                  "t_sampling": "importance", "dropout": 0.1, "log_every": 1, "save_every": 1, "sample_every": 0}


def test_importance_sampling_resumes_to_the_same_weights_and_history(folder_of_images, tmp_path):
    """4 steps of 4 images an epoch: the history of T = 4 terms fills within 10-14 steps, of 20."""
    def arguments(folder, **changes):
        return as_arguments(script_config("Main", {**IMPORTANCE_RUN, **changes}, dataset=folder_of_images,
                                          save_weight_dir=folder))
    run_or_fail("Main.py", *arguments(tmp_path / "whole"), cwd=tmp_path)
    stopped = tmp_path / "stopped"
    process = start_script("Main.py", *arguments(stopped), cwd=tmp_path)
    wait_until(lambda: any(r["kind"] == "step" and r["step"] >= 14 for r in log_lines(stopped)), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    run_or_fail("Main.py", *arguments(stopped, training_load_weight="last"), cwd=tmp_path)
    whole, resumed = (torch.load(Path(folder) / TRAINING_STATE, weights_only=True) for folder in (tmp_path / "whole", stopped))
    assert whole["timesteps"]["counts"].sum() == 4 * 20 and whole["timesteps"]["counts"].min() >= HISTORY
    for part in ("history", "counts"):
        assert torch.equal(resumed["timesteps"][part], whole["timesteps"][part])
    assert all(torch.equal(resumed["model"][name], tensor) for name, tensor in whole["model"].items())
