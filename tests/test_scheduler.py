"""The learning-rate schedule: linear warm-up to lr * multiplier, then cosine annealing."""
import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

import Main
import MainCondition
from Scheduler import GradualWarmupScheduler


def lr_per_epoch(epoch, lr, multiplier):
    """The LR in force during each epoch, with the schedule built and stepped as training does:
    warm-up over epoch // 10 epochs, CosineAnnealingLR(T_max=epoch), one step per epoch."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=lr, weight_decay=1e-4)
    scheduler = GradualWarmupScheduler(
        optimizer, multiplier=multiplier, warm_epoch=epoch // 10,
        after_scheduler=CosineAnnealingLR(optimizer, T_max=epoch, eta_min=0))
    lrs = []
    for _ in range(epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("script", [Main, MainCondition], ids=["Main", "MainCondition"])
def test_schedule_reproduces_the_original_for_the_default_config(script, lr_schedules):
    name = script.__name__ + ".py"
    (expected,) = [lrs for key, lrs in lr_schedules.items() if key.startswith(name + " ")]
    config = script.modelConfig
    got = lr_per_epoch(config["epoch"], config["lr"], config["multiplier"])
    assert len(got) == len(expected) == config["epoch"]
    for epoch, (g, e) in enumerate(zip(got, expected)):
        assert abs(g - e) <= 1e-3 * e, f"epoch {epoch}: lr {g}, the original's {e}"


@pytest.mark.parametrize("epoch", [1, 2, 5, 9])
def test_schedule_without_warm_up_epochs_starts_at_the_peak_and_anneals(epoch):
    lr, multiplier = 1e-4, 2.
    got = lr_per_epoch(epoch, lr, multiplier)
    peak = lr * multiplier
    assert len(got) == epoch
    assert all(0 < g <= peak * (1 + 1e-9) for g in got)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(got, got[1:]))
    for e in range(1, epoch):  # the docstring's lr * multiplier * (1 + cos(pi (e - 1) / epoch)) / 2
        assert got[e] == pytest.approx(peak * (1 + math.cos(math.pi * (e - 1) / epoch)) / 2, rel=1e-6)


def test_warm_up_rises_linearly_to_the_peak():
    got = lr_per_epoch(100, 1e-4, 3.)
    expected = [1e-4 * (1 + 2. * e / 10) for e in range(11)]
    assert got[:11] == pytest.approx(expected, rel=1e-9)
    assert max(got) == pytest.approx(3e-4, rel=1e-6)
