"""The follow-ups' training options (Diffusion/Schedule.py): the cosine schedule, the x0 and v
targets, the Min-SNR-gamma weight; both models train and sample with each, and a checkpoint is
sampled only as it was trained."""
import math

import pytest
import torch
from torch import nn

import Main
import MainCondition
from conftest import TINY_CONDITIONAL, defaults_of, write_images
from Diffusion.Diffusion import GaussianDiffusionTrainer
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Evaluation import samplers_of, trained_model
from Diffusion.Run.Keys import SAMPLERS
from Diffusion.Diffusion import PREDICTIONS, eps_and_x0, min_snr_weight, target_of
from Diffusion.Schedule import cosine_betas, linear_betas
from Diffusion.Train import UNCONDITIONAL
from DiffusionFreeGuidence.TrainCondition import CONDITIONAL


def schedule_of(betas):
    """(alpha_t, sigma_t) [T, 1, 1, 1] of the betas."""
    alphas_bar = torch.cumprod(1. - betas, dim=0)
    return alphas_bar.sqrt().view(-1, 1, 1, 1), (1. - alphas_bar).sqrt().view(-1, 1, 1, 1)


@pytest.mark.parametrize("betas", [linear_betas(1e-4, 0.02, 1000), cosine_betas(1000)], ids=["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_eps_x0_and_v_convert_into_each_other_at_every_t(prediction, betas):
    alpha, sigma = schedule_of(betas)
    alpha_step = (1. - betas).view(-1, 1, 1, 1)  # mu's one-step alpha_t
    generator = torch.Generator().manual_seed(0)
    x_0 = torch.rand(len(betas), 3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(len(betas), 3, 4, 4, generator=generator, dtype=torch.float64)
    x_t = alpha * x_0 + sigma * eps
    output = target_of(prediction, x_0, eps, alpha, sigma, alpha_step)
    got_eps, got_x_0 = eps_and_x0(prediction, output, x_t, alpha, sigma, alpha_step)
    # float64; where alpha_t or sigma_t is tiny, dividing by it magnifies rounding
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-6 if prediction == "x0" else 1e-9)
    torch.testing.assert_close(got_x_0, x_0, rtol=0, atol=1e-6 if prediction in ("eps", "mu") else 1e-9)
    for other in PREDICTIONS:  # and back to each target
        torch.testing.assert_close(target_of(other, got_x_0, got_eps, alpha, sigma, alpha_step),
                                   target_of(other, x_0, eps, alpha, sigma, alpha_step), rtol=0, atol=1e-6)


def test_cosine_schedules_alphas_bar_is_eq_17():
    T, s = 1000, 0.008
    alphas_bar = torch.cumprod(1. - cosine_betas(T), dim=0)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t] / f[0] for t in range(1, T + 1)], dtype=torch.float64)
    unclipped = cosine_betas(T) < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta is clipped
    torch.testing.assert_close(alphas_bar[:-1], expected[:-1], rtol=1e-10, atol=0)
    assert alphas_bar[-1] < 1e-6  # nothing of x_0 is left at T


@pytest.mark.parametrize("prediction, expected", [
    ("eps", lambda snr, gamma: min(snr, gamma) / snr), ("x0", lambda snr, gamma: min(snr, gamma)),
    ("v", lambda snr, gamma: min(snr, gamma) / (snr + 1))])
def test_min_snr_weights_are_their_closed_forms(prediction, expected):
    snrs = [1e-3, 0.5, 1., 4.9, 5., 5.1, 100., 1e4]
    got = min_snr_weight(prediction, torch.tensor(snrs, dtype=torch.float64), 5.)
    assert got.tolist() == pytest.approx([expected(snr, 5.) for snr in snrs], rel=1e-12)


class Oracle(nn.Module):
    """Outputs the exact target of a known (x_0, eps) pair at x_t."""

    def __init__(self, prediction, x_0, eps, trainer):
        super().__init__()
        self.prediction, self.x_0, self.eps = prediction, x_0, eps
        self.alphas, self.sigmas = trainer.sqrt_alphas_bar, trainer.sqrt_one_minus_alphas_bar
        self.alpha_steps = 1. - trainer.betas  # mu's

    def forward(self, x_t, t):
        alpha, sigma, alpha_step = (coefficients[t].float().view(-1, 1, 1, 1)
                                    for coefficients in (self.alphas, self.sigmas, self.alpha_steps))
        return target_of(self.prediction, self.x_0, self.eps, alpha, sigma, alpha_step)


@pytest.mark.parametrize("loss_weight", ["none", "min_snr"])
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_a_model_that_outputs_the_exact_target_has_loss_0(prediction, beta_schedule, loss_weight):
    x_0, eps, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    trainer = GaussianDiffusionTrainer(None, 1e-4, 0.02, 1000, beta_schedule, prediction, loss_weight)
    trainer.model = Oracle(prediction, x_0, eps, trainer)
    assert trainer(x_0, t=t, noise=eps).abs().max() == 0
    trainer.model = Oracle(prediction, x_0 + 0.1, eps + 0.1, trainer)  # a wrong target is not
    assert trainer(x_0, t=t, noise=eps).sum() > 0


# --- both models train and sample with every option -------------------------------------------

OPTIONS = {"cosine": {"beta_schedule": "cosine"}, "x0": {"prediction": "x0"},
           "v and min_snr": {"prediction": "v", "loss_weight": "min_snr", "beta_schedule": "cosine"}}


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A tiny run of each model with each option: {(script, option): config}."""
    root = tmp_path_factory.mktemp("recipes")
    for seed, name in enumerate(["cat", "dog"]):
        write_images(root / "images" / name, 6, size=(8, 8), seed=seed)
    runs = {}
    for option, changes in OPTIONS.items():
        for script, variant in (("Main", UNCONDITIONAL), ("MainCondition", CONDITIONAL)):
            config = {**defaults_of(script), **TINY_CONDITIONAL, **changes, "dataset": str(root / "images"),
                      "sample_every": 0, "sampled_dir": str(root / "unused"),
                      variant.checkpoints_key: str(root / f"{script}-{option}")}
            if script == "Main":
                config["attn"] = [1]
            (Main if script == "Main" else MainCondition).main(config)
            runs[script, option] = config
    return runs


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("script", ["Main", "MainCondition"])
def test_each_option_trains_a_model_that_samples_finite_images_with_every_sampler(trained_runs, script, option):
    config = {**trained_runs[script, option], "state": "eval", "test_load_weight": "ckpt_0_.pt",
              "sample_steps": 5, "clip_denoised": False}
    variant = UNCONDITIONAL if script == "Main" else CONDITIONAL
    model, num_labels = trained_model(config, variant, torch.device("cpu"))
    condition = () if num_labels is None else (torch.tensor([1, 2, 1]),)
    for sampler in SAMPLERS:
        guidance = {} if num_labels is None else {"w": 2.}
        ((w, sampling),) = samplers_of({**config, "sampler": sampler, **guidance}, variant, model)
        images = sampling(torch.randn(3, 3, 8, 8), *condition, progress=False)
        assert torch.isfinite(images).all(), (sampler, w)


@pytest.mark.parametrize("key, value", [("prediction", "eps"), ("beta_schedule", "linear"), ("prediction", "x0")])
def test_a_checkpoint_sampled_or_continued_with_another_prediction_or_schedule_is_refused(trained_runs, key,
                                                                                          value, tmp_path):
    config = trained_runs["Main", "v and min_snr"]
    for state in ({"state": "eval", "test_load_weight": "ckpt_0_.pt", "sampled_dir": str(tmp_path)},
                  {"training_load_weight": "last", "epoch": 2}):
        with pytest.raises(ConfigError) as error:
            Main.main({**config, **state, key: value})
        trained = {"prediction": "'v'", "beta_schedule": "'cosine'"}[key]
        assert f"trained with {key} {trained}" in str(error.value) and repr(value) in str(error.value)
    assert not list(tmp_path.iterdir())
