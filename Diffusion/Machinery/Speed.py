"""The speed options, for training and sampling alike; none of them changes what is saved, so a
checkpoint trained with any of them loads and samples with none of them.

- `amp`: autocast the network to bfloat16 or float16 ("none": float32, the original). The
  weights, the optimizer and the diffusion arithmetic (x_t, the loss's target) stay float32;
  float16 scales the loss with a GradScaler so that small gradients do not underflow.
- `compile`: torch.compile the network (the first steps are slow while it compiles).
- `channels_last`: the NHWC memory format, which convolution kernels on GPUs prefer.
"""
from contextlib import nullcontext

import torch
from torch import nn
from tqdm import tqdm

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, amp):
    """The autocast context of amp ("bf16", "fp16") on `device`; nothing for "none"."""
    dtype = AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def compiled(network, compile, announce=True):
    """torch.compile(network) if `compile`, else `network` itself."""
    if not compile:
        return network
    if announce:
        tqdm.write("compile: the first steps are slow while torch.compile builds the kernels")
    return torch.compile(network)


class ForSampling(nn.Module):
    """The network as a sampler calls it under the speed options: x_t in the memory format of
    channels_last, the network autocast to amp's dtype (and compiled), and its estimate returned
    in float32, so that the sampler's update of x_t stays float32."""

    def __init__(self, network, amp, compile, channels_last, device):
        super().__init__()
        self.network = compiled(network, compile)
        self.amp, self.memory_format, self.device = amp, memory_format(channels_last), device

    def forward(self, x_t, t, *condition):
        with autocast(self.device, self.amp):
            eps = self.network(x_t.contiguous(memory_format=self.memory_format), t, *condition)
        return eps.float()


def for_sampling(model, config):
    """`model` as samplers should call it under config's amp, compile and channels_last
    (ForSampling), or itself when every option is off."""
    if config["amp"] == "none" and not config["compile"] and not config["channels_last"]:
        return model
    return ForSampling(model, config["amp"], config["compile"], config["channels_last"],
                       torch.device(config["device"]))
