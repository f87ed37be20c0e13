"""The speed options, for training and sampling alike; none of them changes what is saved, so a
checkpoint trained with any of them loads and samples with none of them.

- `amp`: autocast the network to bfloat16 or float16 ("none": float32, the original). The
  weights, the optimizer and the diffusion arithmetic (x_t, the loss's target) stay float32;
  float16 scales the loss with a GradScaler so that small gradients do not underflow.
- `compile`: torch.compile the network (the first steps are slow while it compiles).
- `channels_last`: the NHWC memory format, which convolution kernels on GPUs prefer.
- AdamW is the fused implementation wherever the device has it (the same update, one kernel).
"""
from contextlib import nullcontext

import torch
from torch import nn
from tqdm import tqdm

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(config, device):
    """The autocast context of config["amp"] on `device` (nothing for "none")."""
    dtype = AMP_DTYPES[config["amp"]]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(config, device):
    """A GradScaler for float16 (disabled, a pass-through, otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16")


def adamw(parameters, lr, device):
    """AdamW with the original's weight decay 1e-4, fused where `device` supports it."""
    parameters = list(parameters)  # read twice when the device has no fused kernel
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4, fused=True)
    except RuntimeError:  # no fused kernel for this device
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)


def place(model, config, device):
    """`model` moved to `device`, in channels_last memory format if config asks for it."""
    memory_format = torch.channels_last if config["channels_last"] else torch.preserve_format
    return model.to(device, memory_format=memory_format)


def memory_format_of(config):
    return torch.channels_last if config["channels_last"] else torch.contiguous_format


def compiled(network, config, announce=True):
    """torch.compile(network) if config asks for it, else `network` itself."""
    if not config["compile"]:
        return network
    if announce:
        tqdm.write("compile: the first steps are slow while torch.compile builds the kernels")
    return torch.compile(network)


class ForSampling(nn.Module):
    """The network as a sampler calls it under the speed options: x_t in the memory format of
    channels_last, the network autocast to amp's dtype (and compiled), and its estimate returned
    in float32, so that the sampler's update of x_t stays float32."""

    def __init__(self, network, config):
        super().__init__()
        self.network = compiled(network, config)
        self.config = config
        self.device = torch.device(config["device"])

    def forward(self, x_t, t, *condition):
        with autocast(self.config, self.device):
            eps = self.network(x_t.contiguous(memory_format=memory_format_of(self.config)), t, *condition)
        return eps.float()


def for_sampling(model, config):
    """`model` as samplers should call it (ForSampling), or itself when every option is off."""
    if config["amp"] == "none" and not config["compile"] and not config["channels_last"]:
        return model
    return ForSampling(model, config)
