"""Classifier-free guidance (Ho & Salimans 2022).

Training is Algorithm 1 with the class labels as one more model input, which Diffusion's
GaussianDiffusionTrainer passes on (`trainer(x_0, labels)`). Sampling is Algorithm 2 with the
guided noise estimate in place of eps_theta(x_t, t).
"""
import torch

import Diffusion.Diffusion as unconditional
from Diffusion.Diffusion import GaussianDiffusionTrainer

__all__ = ["GaussianDiffusionSampler", "GaussianDiffusionTrainer"]


class GaussianDiffusionSampler(unconditional.GaussianDiffusionSampler):
    """Algorithm 2 steered by the guidance weight w: `sampler(x_T, labels)`, labels [B] in
    1..num_labels. w = 0 samples from the conditional model alone."""

    def __init__(self, model, beta_1, beta_T, T, w=2., clip_denoised=False):
        super().__init__(model, beta_1, beta_T, T, clip_denoised)
        self.w = w

    def noise_estimate(self, x_t, t, labels):
        """eps~ = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, null)   [B, C, H, W]

        Both estimates come from one forward pass over a batch of 2B, conditional half then
        null half (label 0): the same numbers as two passes, half the kernel launches."""
        if self.w == 0:
            return self.model(x_t, t, labels)
        eps_cond, eps_null = self.model(
            torch.cat([x_t, x_t]), torch.cat([t, t]),
            torch.cat([labels, torch.zeros_like(labels)])).chunk(2)
        return (1. + self.w) * eps_cond - self.w * eps_null
