"""The training state, `training_state.pt`: all a run needs to continue to the very result it would have
reached without stopping: the raw and EMA weights, the optimizer, the LR schedule, the GradScaler, where
the run is (epoch, step in it), its seed and every process's random generators (the data order follows
from the seed and the position). Written atomically at the end of every epoch, every save_state_minutes
and when the run is asked to stop. `begin_or_continue` begins a new run or continues one (`continue_run`).
"""
import os
import shutil

from tqdm import tqdm

from Diffusion.Run.Checkpoints import (LOG, PREVIEWS, RUN_INFO, STATE_FORMAT, TENSORBOARD, TRAINING_STATE,
                                       epoch_of, is_training_state, list_checkpoints, load_into,
                                       read_run_info, read_state_dict, safe_load, save_atomically,
                                       state_ends_epoch)
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Processes import (batch_generator, common_seed, gather, restore_rng_states, rng_states,
                                     seed_process, wait_for_all)


class TrainingState:
    """The objects a run trains and where it is: `epoch` (the one being trained, 0-based),
    `step_in_epoch` (optimizer steps taken in it) and `step` (in all)."""

    def __init__(self, model, ema, optimizer, scheduler, scaler, process, batch_size, timesteps=None):
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.timesteps = timesteps  # the sampler of t, whose importance sampling learns a history
        self.scheduler, self.scaler, self.process = scheduler, scaler, process
        self.batch_size = batch_size
        self.epoch = self.step_in_epoch = self.step = 0
        self.skipped_steps = self.non_finite_in_a_row = 0  # steps whose gradients were not finite
        self.seed = self.generator = None

    def seed_with(self, seed):
        """Seed this process (seed + rank) and the batch generator (seed, the same in all)."""
        self.seed = seed
        seed_process(seed, self.process.rank)
        self.generator = batch_generator(seed, self.process.device)

    def next_epoch(self):
        self.epoch += 1
        self.step_in_epoch = 0

    def state_dict(self):
        """The state of every process (each process must call this: it gathers their RNGs)."""
        rngs = gather(rng_states(self.process.device, self.generator), self.process)
        return {"format": STATE_FORMAT, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "step": self.step, "skipped_steps": self.skipped_steps, "seed": self.seed,
                "world_size": self.process.world_size, "batch_size": self.batch_size,
                "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs,
                "timesteps": self.timesteps.state_dict() if self.timesteps else {}}

    def load_state_dict(self, state, path):
        """Continue from `state`, read from `path`: exactly (with the same processes and
        batch_size), or as closely as the processes and batch_size allow, saying so."""
        load_into(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self._load_ema(state["ema"])
        if self.timesteps and state.get("timesteps"):
            self.timesteps.load_state_dict(state["timesteps"])
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.seed_with(state["seed"])
        same_processes = state["world_size"] == self.process.world_size
        if same_processes:
            restore_rng_states(state["rng"][self.process.rank], self.process.device, self.generator)
        if not same_processes or state["batch_size"] != self.batch_size:
            self.step_in_epoch = state["step_in_epoch"] * state["batch_size"] * state["world_size"] \
                // (self.batch_size * self.process.world_size)
            self.process.say(f"the run was saved with {state['world_size']} process(es) of batch "
                             f"{state['batch_size']}, now {self.process.world_size} of {self.batch_size}: "
                             f"it continues from the same image of the epoch, but not to the identical result")

    def _load_ema(self, saved_ema):
        if self.ema and saved_ema:
            self.ema.load_state_dict(saved_ema)
        elif self.ema:
            self.process.say("the saved state has no EMA weights: the EMA starts from the weights "
                             "of the next step")
        elif saved_ema:
            self.process.say("ema_decay is 0: the saved EMA weights are dropped")

    def save(self, folder):
        """Write training_state.pt atomically (rank 0); every process must call this."""
        state = self.state_dict()
        if self.process.is_main:
            save_atomically(state, os.path.join(folder, TRAINING_STATE))


def begin_or_continue(state, folder, checkpoints_key, training_load_weight, seed, overwrite):
    """Begin a new run in `folder` (config key `checkpoints_key`), or continue the one
    training_load_weight names there."""
    if training_load_weight is None:
        begin_new_run(state, folder, checkpoints_key, seed, overwrite)
    else:
        continue_run(state, folder, training_load_weight, seed)


def begin_new_run(state, folder, key, seed, overwrite):
    """A new run into `folder`, which must hold no run yet (unless `overwrite`)."""
    # Every process looks at the folder before any can change it (common_seed waits for all of them).
    existing, leftovers = describe_run(folder), run_files(folder)
    if existing and not overwrite:
        raise ConfigError(
            f"{folder!r} already holds a run ({existing}), and a new run would overwrite it: "
            f"continue it with --training_load_weight last, write the new run to another folder "
            f"with --{key} FOLDER, or start over in this one with --overwrite true (which "
            f"deletes the old run's checkpoints).")
    state.seed_with(common_seed(seed, state.process))
    if leftovers:  # the old run (overwrite), or the log of a run that never saved
        clear_run(folder, state.process)


def run_files(folder):
    """The files and folders of a run in `folder` (none: no run there)."""
    if not os.path.isdir(folder):
        return []
    names = list_checkpoints(folder) + [TRAINING_STATE, RUN_INFO, LOG, TENSORBOARD, PREVIEWS]
    return [name for name in names if os.path.exists(os.path.join(folder, name))]


def describe_run(folder):
    """A few words on the run `folder` holds ("" when it holds none)."""
    names = list_checkpoints(folder)
    parts = [names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"] if names else []
    if os.path.isfile(os.path.join(folder, TRAINING_STATE)):
        parts.append(TRAINING_STATE)
    return ", ".join(parts)


def clear_run(folder, process):
    """Delete the run in `folder` (rank 0), once every process has looked at the folder."""
    wait_for_all(process)
    if process.is_main:
        files = run_files(folder)
        for name in files:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        tqdm.write(f"deleted the previous run's files in {folder}: {', '.join(files)}")
    wait_for_all(process)


def continue_run(state, folder, name, seed):
    """Continue from `name` in `folder`: "last" (the training state, else the newest readable
    snapshot; an unreadable file is reported by name and the next one tried), training_state.pt,
    or a snapshot ckpt_{epoch}_.pt (its full training state when training_state.pt is from the
    end of that epoch, else its weights alone: a new optimizer, the schedule at the next epoch)."""
    for candidate in candidates(folder, name):
        if not os.path.isfile(os.path.join(folder, candidate)):
            read_state_dict(folder, candidate, "cpu")  # raises, listing the checkpoints there
        try:
            saved = safe_load(os.path.join(folder, candidate), "cpu")
        except ConfigError as unreadable:
            if name != "last":
                raise
            state.process.say(f"warning: {unreadable} Trying the next newest file.")
            continue
        if is_training_state(saved):
            state.load_state_dict(saved, os.path.join(folder, candidate))
            state.process.say(f"continuing from {candidate}: epoch {state.epoch}, step "
                              f"{state.step_in_epoch} of it ({state.step} steps in all)")
        else:
            continue_from_weights(state, saved, os.path.join(folder, candidate), seed)
        return
    raise ConfigError(f"training_load_weight is {name!r} but {folder!r} holds nothing readable to "
                      f"continue from: set it to None to start a new run.")


def candidates(folder, name):
    """The files to try for training_load_weight `name`, best first."""
    state_path = os.path.join(folder, TRAINING_STATE)
    if name == "last":  # the training state, then the snapshots newest first
        return ([TRAINING_STATE] if os.path.isfile(state_path) else []) + list_checkpoints(folder)[::-1]
    epoch = epoch_of(name)
    if epoch is not None and os.path.isfile(state_path) and state_ends_epoch(state_path, epoch):
        return [TRAINING_STATE]
    return [name]


def continue_from_weights(state, state_dict, path, seed):
    """Continue from a plain state_dict (a snapshot, or the original's checkpoint): its weights,
    a new optimizer, the EMA from them, the LR schedule moved to the epoch after its own."""
    if not isinstance(state_dict, dict) or not all(hasattr(v, "shape") for v in state_dict.values()):
        raise ConfigError(f"{path!r} is neither a training state nor a plain state_dict.")
    load_into(state.model, state_dict, path)
    epoch = epoch_of(os.path.basename(path))
    state.epoch = 0 if epoch is None else epoch + 1
    state.scheduler.fast_forward(state.epoch)
    # New random numbers for the epochs to come: a fixed seed must not replay epoch 0's.
    state.seed_with(common_seed(seed, state.process) + state.epoch)
    held = "the run's EMA weights" if read_run_info(os.path.dirname(path)).get("snapshot_weights") == "ema" \
        else "one set of weights, no EMA"
    state.process.say(f"continuing from the weights of {os.path.basename(path)} at epoch "
                      f"{state.epoch}, with a new optimizer state: a plain state_dict holds "
                      f"{held}, so training and the EMA start from them (only "
                      f"{TRAINING_STATE} continues a run exactly)")
