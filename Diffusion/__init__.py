"""Unconditional DDPM: the UNet (Model.py), Algorithms 1 and 2 (Diffusion.py), train and eval (Train.py)."""
from Diffusion.Diffusion import GaussianDiffusionSampler, GaussianDiffusionTrainer
from Diffusion.Model import UNet

__all__ = ["GaussianDiffusionSampler", "GaussianDiffusionTrainer", "UNet"]
