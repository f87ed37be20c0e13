"""Learning-rate warm-up, then another schedule (cosine annealing in this repo)."""
import warnings

from torch.optim.lr_scheduler import LRScheduler


class GradualWarmupScheduler(LRScheduler):
    """Per epoch: lr grows linearly from lr to lr * multiplier over `warm_epoch` epochs, is held
    at the peak one epoch more, then follows `after_scheduler`, which starts from the peak (None:
    stays at the peak).

    With after_scheduler = CosineAnnealingLR(T_max=epoch) this is the original's schedule:
    lr(e) = lr * (1 + (multiplier - 1) e / warm_epoch) for e <= warm_epoch, then
    lr * multiplier * (1 + cos(pi (e - warm_epoch - 1) / epoch)) / 2.
    Step it once per epoch, after the optimizer's steps.
    """

    def __init__(self, optimizer, multiplier, warm_epoch, after_scheduler=None):
        self.multiplier = multiplier
        self.warm_epoch = warm_epoch
        self.after_scheduler = after_scheduler
        super().__init__(optimizer)
        if after_scheduler is not None:
            after_scheduler.base_lrs = [lr * multiplier for lr in self.base_lrs]

    def get_lr(self):
        progress = min(self.last_epoch / self.warm_epoch, 1.) if self.warm_epoch else 1.
        return [lr * (1. + (self.multiplier - 1.) * progress) for lr in self.base_lrs]

    def step(self, epoch=None, metrics=None):
        """The next epoch's lr, or with `epoch` that epoch's (torch's deprecated form, as the
        original); `metrics` is ignored, as in the original."""
        if self.after_scheduler is None or (self.last_epoch if epoch is None else epoch) <= self.warm_epoch:
            return super().step(epoch)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        self.after_scheduler.step(None if epoch is None else epoch - self.warm_epoch - 1)
        self._last_lr = self.after_scheduler.get_last_lr()

    def state_dict(self):
        """Plain values only (the schedule after warm-up as its own state_dict), so that the
        training state loads with torch.load(weights_only=True)."""
        state = {key: value for key, value in super().state_dict().items() if key != "after_scheduler"}
        return {**state, "after_scheduler": self.after_scheduler and self.after_scheduler.state_dict()}

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        after_scheduler = state.pop("after_scheduler")
        if self.after_scheduler is not None:
            self.after_scheduler.load_state_dict(after_scheduler)
        super().load_state_dict(state)

    def fast_forward(self, epochs):
        """Step through `epochs` epochs at once (continuing a run from its weights alone)."""
        with warnings.catch_warnings():  # no optimizer step comes before these steps
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            for _ in range(epochs):
                self.step()
