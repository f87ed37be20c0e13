"""The files of a checkpoint folder, and how they are written and read:

    ckpt_{epoch}_.pt     weight snapshots: plain state_dicts like the original's (EMA weights when EMA is on)
    training_state.pt    everything needed to continue the run (TrainingState.py)
    run.json             what eval needs besides the weights (which weights the snapshots hold, the
                         schedule and prediction, the class names)
    training_log.jsonl   the run log (TrainingRun.py); tensorboard/ and samples/ beside it

Files are written to a temporary name and renamed: a failed save never leaves a truncated file. Every
.pt file is read by `safe_load` (`weights_only=True`), which runs no code from the file.
"""
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from Diffusion.Diffusion import LEARNED_VARIANCES
from Diffusion.Run.Config import ConfigError, RunError
from Diffusion.Run.Data import CIFAR10_CLASSES

TRAINING_STATE = "training_state.pt"
RUN_INFO = "run.json"
LOG = "training_log.jsonl"
TENSORBOARD = "tensorboard"
PREVIEWS = "samples"
STATE_FORMAT = "simplest-ddpm training state 1"
TIME_TABLE = "time_embedding.timembedding.0.weight"  # [T, channel]
CLASS_TABLE = "cond_embedding.condEmbedding.0.weight"  # [num_labels + 1, channel], conditional only
_CHECKPOINT_NAME = re.compile(r"ckpt_(\d+)_\.pt$")


class SaveFailed(RunError):
    """A file could not be written (a full disk, a folder that went away); what was before is intact."""


def epoch_of(name):
    """The epoch in a checkpoint's name ("ckpt_12_.pt" -> 12), or None."""
    match = _CHECKPOINT_NAME.search(name)
    return int(match.group(1)) if match else None


def _write_failure(error):
    """Why a write failed, in a few words; torch.save's own words name only its source line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # "No space left on device", "File too large", ...
    text = str(error).strip()
    if "strerror:" in text:  # torch: "[enforce fail at ...] . open file failed with strerror: ..."
        return text.split("strerror:")[-1].strip()
    if "enforce fail" in text:  # torch: "[enforce fail at inline_container.cc:672] . unexpected pos"
        return "the write stopped partway"
    return text.splitlines()[0] if text else type(error).__name__


def _free_space(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MB free on its disk"
    except OSError:
        return "its folder cannot be reached"


def write_atomically(write, path):
    """write(temporary path), then rename it to `path` (never half written); a failure raises SaveFailed
    (a full disk, say), which names the file and the space left. Every file a run writes goes through here."""
    folder = os.path.dirname(path) or "."
    temporary = f"{path}.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        raise SaveFailed(f"could not write {path!r} ({_write_failure(error)}; "
                          f"{_free_space(folder)}); the file there before, if any, and the rest of "
                          f"the folder are intact: free some space, or choose another folder.") from None
    finally:
        if os.path.isfile(temporary):
            os.remove(temporary)


def save_atomically(obj, path):
    """torch.save to `path` through a temporary file flushed to disk: never half written, even by a crash."""
    def write(temporary):
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
    write_atomically(write, path)


def write_run_info(folder, **entries):
    """Merge `entries` (JSON values, e.g. classes=[names]) into folder/run.json, atomically."""
    info = {**read_run_info(folder), **entries}
    write_atomically(lambda temporary: Path(temporary).write_text(json.dumps(info, indent=1)),
                      os.path.join(folder, RUN_INFO))


def read_run_info(folder):
    """The entries of folder/run.json; {} when it is absent or unreadable."""
    try:
        info = json.loads(Path(folder, RUN_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


# What a checkpoint's outputs mean (a v-model sampled as eps gives noise) and how it was trained; no
# record: the original's. A fixed variance may be sampled with either; a run continues with its loss.
DIFFUSION_KEYS = {"beta_schedule": "linear", "prediction": "eps", "variance": "fixedlarge", "loss": "simple"}
TRAINING_KEYS = ("loss",)
TAIL = "tail.2.weight"  # [out_channels, channel, 3, 3]: img_channels, twice as many with a learned variance


def diffusion_of(config):
    """The DIFFUSION_KEYS of config, as run.json records them."""
    return {key: config[key] for key in DIFFUSION_KEYS}


def variance_kind(variance):
    """What must agree between a checkpoint and its config: the learned variance, or any fixed one."""
    return variance if variance in LEARNED_VARIANCES else "fixed"


def check_trained_as_configured(folder, config, continuing=False):
    """Refuse a config whose beta_schedule, prediction or kind of variance (when `continuing`: loss too)
    differ from the run's in `folder` (run.json; no record: the original's, linear, eps, fixed, simple). A
    folder with no weights has nothing to disagree with: loading them says what is missing."""
    if not list_checkpoints(folder) and not os.path.isfile(os.path.join(folder, TRAINING_STATE)):
        return
    recorded = read_run_info(folder)
    for key, original in DIFFUSION_KEYS.items():
        trained = recorded.get(key, original)
        same = variance_kind(config[key]) == variance_kind(trained) if key == "variance" else config[key] == trained
        if not same and (continuing or key not in TRAINING_KEYS):
            raise ConfigError(f"the checkpoints in {folder!r} were trained with {key} {trained!r} "
                              f"({RUN_INFO if key in recorded else 'no record: the original'}'s), but "
                              f"the config has {key} {config[key]!r}, "
                              f"{'and a run continues with its loss' if key == 'loss' else 'under which the model outputs mean something else'}"
                              f": set --{key} {trained}.")


def class_names(folder, num_labels, dataset):
    """The names of a conditional checkpoint's `num_labels` classes: those in its run.json; without them (the
    original's), CIFAR-10's when it has 10 classes and `dataset` is CIFAR10; else the indices as text."""
    names = read_run_info(folder).get("classes")
    if isinstance(names, list) and len(names) == num_labels:
        return [str(name) for name in names]
    cifar10 = num_labels == len(CIFAR10_CLASSES) and dataset == "CIFAR10"
    return list(CIFAR10_CLASSES) if cifar10 else [str(index) for index in range(num_labels)]


def list_checkpoints(folder):
    """The ckpt_{epoch}_.pt files in `folder`, oldest epoch first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((name for name in names if epoch_of(name) is not None), key=epoch_of)


def is_snapshot_epoch(epoch, save_every, epochs):
    """Whether a weight snapshot is written after `epoch` (0-based) of a run of `epochs`."""
    return (epoch + 1) % save_every == 0 or epoch == epochs - 1


def save_snapshot(weights, folder, epoch, keep_last):
    """ckpt_{epoch}_.pt, then the oldest snapshots beyond the newest keep_last removed."""
    save_atomically(weights, os.path.join(folder, f"ckpt_{epoch}_.pt"))
    if keep_last is not None:
        for name in list_checkpoints(folder)[:-keep_last]:
            os.remove(os.path.join(folder, name))


# torch's words for a pickled global it refuses: "Trying to load unsupported GLOBAL posix.system whose
# module posix is blocked" (torch 2.14) and "Unsupported global: GLOBAL x.Y was not an allowed global" (2.4+).
_REFUSED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)


def load_failure(error):
    """Why torch.load(weights_only=True) failed, in one line. torch's own message is not passed
    on: it advises retrying with weights_only=False, which would run any code in the file."""
    text = str(error)
    refused = _REFUSED_GLOBAL.search(text)
    if refused and "is blocked" in text:
        return (f"it asks to call {refused.group(1)} when loaded, which could run any code (a "
                f"malicious or foreign file?); it is refused: do not load it another way")
    if refused:
        return (f"it pickles {refused.group(1)} objects besides tensors (a whole saved model?), "
                f"which cannot be loaded without running code from it; save its state_dict() instead")
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    if isinstance(error, EOFError):
        return "it is empty"
    if "Weights only load failed" in text:
        return "it is not a torch weights file (its pickle holds more than tensors and plain values)"
    return "it is not a torch weights file, or it is truncated or corrupt"


def safe_load(path, device):
    """torch.load(path, weights_only=True) onto `device`: tensors and plain values only, running no code from
    the file. One that cannot be read so raises a ConfigError naming it."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # a plain pickle gets a warning about its protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ConfigError(f"{path!r} cannot be read: {load_failure(error)}.") from None


def load_tensors(path, device):
    """The name -> tensor dict at `path`, read by safe_load; anything else raises a ConfigError saying why."""
    tensors = safe_load(path, device)
    if isinstance(tensors, dict) and all(torch.is_tensor(value) for value in tensors.values()):
        return tensors
    raise ConfigError(f"{path!r} does not hold a plain state_dict (name -> tensor), as ckpt_*_.pt files do.")


def read_state_dict(folder, name, device):
    """The state_dict in folder/name. A missing file raises a ConfigError listing those there."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        present = list_checkpoints(folder)
        there = f"the checkpoints there are: {', '.join(present)}" if present else \
            f"there are no checkpoints in {folder!r}: train first, or point to another folder"
        raise ConfigError(f"checkpoint {path!r} does not exist; {there}.")
    return load_tensors(path, device)


def num_labels_of(state_dict):
    """The classes of a conditional model's state_dict; None for the unconditional model's."""
    return state_dict[CLASS_TABLE].shape[0] - 1 if CLASS_TABLE in state_dict else None


def unet_config_of(state_dict):
    """The UNet config a state_dict was saved from (T, channel, channel_mult, num_res_blocks; attn, or
    num_labels for the conditional model), for messages about a checkpoint that does not fit. Reads the
    down path: ResBlocks, with a downsampler (no block1) closing each level but the last."""
    found = {"T": state_dict[TIME_TABLE].shape[0], "channel": state_dict["head.weight"].shape[0],
             "img_channels": state_dict["head.weight"].shape[1]}
    channel_mult, attn, blocks_in_level, index = [], [], 0, 0
    while any(key.startswith(f"downblocks.{index}.") for key in state_dict):
        conv = state_dict.get(f"downblocks.{index}.block1.2.weight")
        if conv is not None and blocks_in_level == 0:  # a level's first ResBlock
            channel_mult.append(conv.shape[0] // found["channel"])
            if f"downblocks.{index}.attn.proj.weight" in state_dict:
                attn.append(len(channel_mult) - 1)
        blocks_in_level = 0 if conv is None else blocks_in_level + 1
        index += 1
    num_labels = num_labels_of(state_dict)
    return {**found, "channel_mult": channel_mult, "num_res_blocks": blocks_in_level,
            **({"attn": attn} if num_labels is None else {"num_labels": num_labels})}


def describe_mismatch(state_dict, model):
    """Why a state_dict does not load into `model` (built from the config), and what to change."""
    has_class_embedding = num_labels_of(state_dict) is not None
    wants_class_embedding = hasattr(model, "cond_embedding")
    if has_class_embedding and not wants_class_embedding:
        return ("it is a checkpoint of the class-conditional model (it has a class embedding): "
                "sample from it with MainCondition.py, or give a checkpoint of Main.py's model")
    if wants_class_embedding and not has_class_embedding:
        return ("it is a checkpoint of the unconditional model (no class embedding): sample from "
                "it with Main.py, or give a checkpoint of MainCondition.py's model")
    try:
        found = unet_config_of(state_dict)
    except KeyError as missing:
        return f"it is not a checkpoint of this repo's UNet (it has no {missing})"
    wanted = unet_config_of(model.state_dict())
    outputs, wanted_outputs = state_dict[TAIL].shape[0], model.state_dict()[TAIL].shape[0]
    if found["img_channels"] != wanted["img_channels"]:
        outputs = wanted_outputs  # the image channels differ: said below
    if outputs != wanted_outputs and outputs == 2 * found["img_channels"]:
        return (f"it learned its variance ({outputs} output channels): set variance learned or "
                f"learned_range, as it was trained")
    if outputs != wanted_outputs and outputs == found["img_channels"]:
        return f"it has a fixed variance ({outputs} output channels): set variance fixedlarge or fixedsmall"
    if has_class_embedding and found["num_labels"] != wanted["num_labels"]:
        return (f"it was trained on {found['num_labels']} classes, but the dataset has "
                f"{wanted['num_labels']}: continue on a dataset of the same {found['num_labels']} "
                f"classes, or start a new run (training_load_weight None) in another folder")
    differing = [f"{key} {found[key]} (config: {wanted[key]})" for key in found if found[key] != wanted[key]]
    return ("it was trained with " + ", ".join(differing) + ": set these keys to match" if differing
            else "its tensors do not match the model's; check channel_mult, attn and num_res_blocks")


def load_into(model, state_dict, path):
    """model.load_state_dict(state_dict, strict=True); a state_dict that does not fit raises a
    ConfigError naming the config keys that probably differ."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        raise ConfigError(f"checkpoint {path!r} does not fit the model of this config: "
                          f"{describe_mismatch(state_dict, model)}.") from None


def load_initial_weights(model, path):
    """A new run's starting weights (init_weights): the plain state_dict at `path`, loaded strictly."""
    load_into(model, load_tensors(path, "cpu"), path)


def state_ends_epoch(path, epoch):
    """Whether the training state at `path` was saved at the end of `epoch`."""
    try:
        saved = safe_load(path, "cpu")
    except ConfigError:
        return False
    return is_training_state(saved) and saved["epoch"] == epoch + 1 and saved["step_in_epoch"] == 0


def is_training_state(saved):
    return isinstance(saved, dict) and saved.get("format") == STATE_FORMAT


def weights_to_sample(folder, name, use_ema, device):
    """The state_dict eval samples from, test_load_weight `name` in `folder`:
    - a training state: its EMA weights, or with use_ema false (or no EMA) its raw weights;
    - a snapshot ckpt_{epoch}_.pt: its weights (the EMA's when its run had EMA, as run.json records);
      with use_ema false, the raw weights of training_state.pt if it was saved at the end of that epoch;
    - a plain state_dict with no record (the original's checkpoints): its weights as they are."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return read_state_dict(folder, name, device)  # raises, listing the checkpoints there
    saved = safe_load(path, device)
    if is_training_state(saved):
        use_ema = use_ema and saved["ema"] is not None
        tqdm.write(f"sampling from the {'EMA' if use_ema else 'raw'} weights of {name} (epoch "
                   f"{saved['epoch']}, step {saved['step_in_epoch']} of it)")
        return ema_weights(saved["ema"]) if use_ema else saved["model"]
    holds = read_run_info(folder).get("snapshot_weights")
    if holds == "ema" and not use_ema:
        return raw_weights_of_snapshot(folder, name, device)
    tqdm.write({"ema": f"sampling from the EMA weights in {name}",
                "raw": f"sampling from {name} (its run had no EMA)"}.get(
        holds, f"sampling from {name}: a plain state_dict with no EMA weights recorded beside it"))
    return load_tensors(path, device)


def ema_weights(ema_state):
    """The model's state_dict inside an EMA (AveragedModel) state_dict: its "module." entries."""
    return {key[len("module."):]: value for key, value in ema_state.items() if key.startswith("module.")}


def raw_weights_of_snapshot(folder, name, device):
    """The raw weights of EMA snapshot `name`: training_state.pt's, if saved at the end of its epoch."""
    state_path = os.path.join(folder, TRAINING_STATE)
    epoch = epoch_of(name)
    if epoch is not None and os.path.isfile(state_path) and state_ends_epoch(state_path, epoch):
        tqdm.write(f"sampling from the raw weights saved with {name}, in {TRAINING_STATE}")
        return safe_load(state_path, device)["model"]
    raise ConfigError(f"{name} holds the EMA weights, and use_ema is false: a run keeps its raw weights only "
                      f"in {TRAINING_STATE}, from its newest epoch. Set test_load_weight {TRAINING_STATE} "
                      f"(with use_ema false) for those, or use_ema true for {name}'s EMA weights.")
