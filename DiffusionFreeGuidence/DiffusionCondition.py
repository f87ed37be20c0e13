"""Classifier-free guidance (Ho & Salimans 2022).

Training is Algorithm 1 with the class labels as one more model input, which Diffusion's
GaussianDiffusionTrainer passes on (`trainer(x_0, labels)`). Sampling is any of Diffusion/'s
samplers (Algorithm 2, DDIM, the ODE solvers) with the guided noise estimate in place of
eps_theta(x_t, t): the sampler calls `ClassifierFreeGuidance(model, w)` where it would call the
model.
"""
import torch
from torch import nn

from Diffusion import Diffusion
from Diffusion.Diffusion import GaussianDiffusionTrainer, extract  # noqa: F401 (the original's names)
from Diffusion.Diffusion import split_output


class ClassifierFreeGuidance(nn.Module):
    """The conditional UNet steered by the guidance weight w, as a noise model:
    `guided(x_t, t, labels)`, labels [B] in 1..num_labels. w = 0 is the conditional model alone."""

    def __init__(self, model, w):
        super().__init__()
        self.model = model
        self.w = w

    def forward(self, x_t, t, labels):
        """eps~ = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, null)   [B, C, H, W]
        (Ho & Salimans Eq. 6); a learned variance's channels (C more) are the conditional one's.

        Both estimates come from one forward pass over a batch of 2B, conditional half then
        null half (label 0): the same numbers as two passes, half the kernel launches."""
        if self.w == 0:
            return self.model(x_t, t, labels)
        output_cond, output_null = self.model(
            torch.cat([x_t, x_t]), torch.cat([t, t]),
            torch.cat([labels, torch.zeros_like(labels)])).chunk(2)
        (eps_cond, variance_cond), (eps_null, _) = (split_output(output, x_t.shape[1])
                                                    for output in (output_cond, output_null))
        guided = (1. + self.w) * eps_cond - self.w * eps_null
        return guided if variance_cond is None else torch.cat([guided, variance_cond], dim=1)


class GaussianDiffusionSampler(Diffusion.GaussianDiffusionSampler):
    """Algorithm 2 with the guided estimate, the original's guided sampler: `sampler(x_T, labels)`."""

    def __init__(self, model, beta_1, beta_T, T, w=0., **options):
        super().__init__(ClassifierFreeGuidance(model, w), beta_1, beta_T, T, **options)
        self.w = w
