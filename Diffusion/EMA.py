"""An exponential moving average (EMA) of the weights, the weights DDPM samples from.

theta_ema starts as the weights after the first optimizer step; after each later step

    theta_ema <- decay_n theta_ema + (1 - decay_n) theta,   decay_n = min(ema_decay, (1 + n) / (10 + n))

with n the number of steps averaged so far. The warm-up (1 + n) / (10 + n) lets a short run
average over about its own length instead of being dominated by the first weights; with the DDPM
paper's ema_decay 0.9999 the average spans about 1 / (1 - 0.9999) = 10,000 steps once n is past
that. Built on torch.optim.swa_utils.AveragedModel.
"""
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay_at(update, ema_decay):
    """decay_n = min(ema_decay, (1 + n) / (10 + n)) at update n."""
    return min(ema_decay, (1. + update) / (10. + update))


class EMA:
    """The moving average of `model`'s weights (and buffers): `update(model)` after each
    optimizer step, `.module` is the averaged model (a copy of `model`'s architecture)."""

    def __init__(self, model, ema_decay):
        self.ema_decay = ema_decay
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.updates = 0  # mirrors averaged.n_averaged, kept on the host to avoid a device sync

    @property
    def module(self):
        return self.averaged.module

    @property
    def decay(self):
        """The decay the next update will use."""
        return ema_decay_at(self.updates, self.ema_decay)

    def _average(self, ema_weights, weights, _):
        get_ema_multi_avg_fn(self.decay)(ema_weights, weights, _)

    def update(self, model):
        """Average in `model`'s current weights (the first update copies them)."""
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self):
        """The averaged weights (`module.*`) and the number of updates (`n_averaged`)."""
        return self.averaged.state_dict()

    def load_state_dict(self, state_dict):
        self.averaged.load_state_dict(state_dict)
        self.updates = int(self.averaged.n_averaged)
