"""Denoising diffusion probabilistic models (Ho et al. 2020), as the paper has them: the UNet
eps_theta, training by Algorithm 1, sampling by Algorithm 2 and its fast successors, the bound on
the likelihood, the EMA of the weights, and the training recipe. What runs them (config,
checkpoints, data, processes, evaluation) is in Diffusion/Run."""
