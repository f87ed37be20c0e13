"""The EMA of the weights: it lags the raw weights as the decay says, snapshots hold it, and
eval samples from it unless use_ema is false."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import Main
from conftest import TINY_UNCONDITIONAL, defaults_of, write_images
from Diffusion import Train
from Diffusion.Run.Checkpoints import TRAINING_STATE
from Diffusion.Run.Config import ConfigError
from Diffusion.EMA import EMA, ema_decay_at
from Diffusion.Run.Checkpoints import ema_weights


def test_ema_lags_the_raw_weights_as_the_decay_says():
    """Hand-computed: the first update copies, then theta_ema <- d theta_ema + (1 - d) theta with
    d = min(ema_decay, (1 + n) / (10 + n)), n the updates averaged so far."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, ema_decay=0.5)
    expected = None
    for n, weight in enumerate([4., 2., 8., 0.]):
        with torch.no_grad():
            model.weight.fill_(weight)
        decay = ema.decay
        ema.update(model)
        expected = weight if n == 0 else decay * expected + (1 - decay) * weight
        assert decay == (0.5 if n >= 9 else min(0.5, (1 + n) / (10 + n)))
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    # n = 1: 2/11; n = 2: 3/12; n = 3: 4/13
    assert expected == pytest.approx(((4 * 2 / 11 + 2 * 9 / 11) * 3 / 12 + 8 * 9 / 12) * 4 / 13, rel=1e-6)
    assert ema.module.weight.item() != model.weight.item()


def test_warm_up_reaches_the_decay_after_about_its_length():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert ema_decay_at(10 ** 6, 0.9999) == 0.9999


def test_the_ema_state_continues_where_it_was():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9)
    for _ in range(3):
        ema.update(model)
    again = EMA(torch.nn.Linear(2, 2), 0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 3 and again.decay == ema.decay
    assert all(torch.equal(a, b) for a, b in zip(again.module.state_dict().values(),
                                                 ema.module.state_dict().values()))


@pytest.fixture(scope="module")
def trained_with_ema(tmp_path_factory):
    """Three tiny epochs with EMA (in-process: the run is the same as Main.py's)."""
    root = tmp_path_factory.mktemp("ema")
    config = {**defaults_of("Main"), **TINY_UNCONDITIONAL, "dataset": str(write_images(root / "images", 16)),
              "save_weight_dir": str(root / "ckpt"), "epoch": 3, "ema_decay": 0.9, "sample_every": 0,
              "batch_size": 4}
    Train.train(config)
    return config


def grid_of(config, tmp_path, **changes):
    """Run eval (a fixed seed, so fixed noise) and return the sample grid's pixels."""
    sampled = tmp_path / f"samples_{len(list(tmp_path.iterdir()))}"
    Main.main({**config, "state": "eval", "seed": 1, "batch_size": 2, "sampled_dir": str(sampled), **changes})
    with Image.open(sampled / config["sampledImgName"]) as image:
        return np.asarray(image)


def test_snapshots_hold_the_ema_weights_and_the_state_both(trained_with_ema):
    folder = Path(trained_with_ema["save_weight_dir"])
    state = torch.load(folder / TRAINING_STATE, weights_only=True)
    snapshot = torch.load(folder / "ckpt_2_.pt", weights_only=True)
    ema = ema_weights(state["ema"])
    assert list(snapshot) == list(state["model"]) == list(ema)
    assert all(torch.equal(snapshot[name], ema[name]) for name in snapshot)
    assert any(not torch.equal(state["model"][name], ema[name]) for name in ema)
    assert int(state["ema"]["n_averaged"]) == 12  # 16 images, batch 4: 4 steps per epoch


def test_eval_samples_from_the_ema_weights_and_use_ema_false_from_the_raw_ones(trained_with_ema, tmp_path, capsys):
    config = {**trained_with_ema, "test_load_weight": "ckpt_2_.pt"}
    from_snapshot = grid_of(config, tmp_path)
    from_state = grid_of(config, tmp_path, test_load_weight=TRAINING_STATE)
    raw_from_state = grid_of(config, tmp_path, test_load_weight=TRAINING_STATE, use_ema=False)
    raw_of_snapshot = grid_of(config, tmp_path, use_ema=False)  # the state is from ckpt_2_'s epoch end
    out = capsys.readouterr().out
    assert "sampling from the EMA weights in ckpt_2_.pt" in out
    assert "sampling from the raw weights saved with ckpt_2_.pt" in out
    assert np.array_equal(from_snapshot, from_state)
    assert np.array_equal(raw_from_state, raw_of_snapshot)
    assert not np.array_equal(from_snapshot, raw_from_state)


def test_raw_weights_of_an_older_snapshot_are_not_kept(trained_with_ema, tmp_path):
    folder = Path(trained_with_ema["save_weight_dir"])
    older = tmp_path / "older"
    older.mkdir()
    for name in ("ckpt_2_.pt", "run.json"):  # a snapshot and its record, without its state
        (older / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ConfigError, match="use_ema true"):
        Main.main({**trained_with_ema, "state": "eval", "save_weight_dir": str(older),
                   "test_load_weight": "ckpt_2_.pt", "use_ema": False,
                   "sampled_dir": str(tmp_path / "s")})


def test_a_plain_checkpoint_without_record_samples_with_a_note(trained_with_ema, tmp_path, capsys):
    """The original's checkpoints: a plain state_dict, nothing beside it."""
    torch.save(Train.unet_of(trained_with_ema).state_dict(), tmp_path / "ckpt_199_.pt")
    Main.main({**trained_with_ema, "state": "eval", "save_weight_dir": str(tmp_path),
               "test_load_weight": "ckpt_199_.pt", "batch_size": 1, "sampled_dir": str(tmp_path / "s")})
    assert "a plain state_dict with no EMA weights recorded beside it" in capsys.readouterr().out


def test_ema_decay_0_snapshots_the_raw_weights(tiny_config):
    Train.train({**tiny_config, "ema_decay": 0., "sample_every": 0})
    folder = Path(tiny_config["save_weight_dir"])
    state = torch.load(folder / TRAINING_STATE, weights_only=True)
    snapshot = torch.load(folder / "ckpt_0_.pt", weights_only=True)
    assert state["ema"] is None
    assert all(torch.equal(snapshot[name], state["model"][name]) for name in snapshot)
