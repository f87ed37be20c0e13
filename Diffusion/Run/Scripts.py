"""What Main.py and MainCondition.py run: the config (of the command line, or of a dict given to
main()), then the state it asks for. Whatever stops a run (a config mistake, a full disk, a lost
process, a stop request) is said in one sentence instead of a traceback."""
import sys

from Diffusion.Run import Editing, Figures
from Diffusion.Run.Config import RunError, complete, parse_command_line
from Diffusion.Run.Evaluation import evaluate, likelihood, score
from Diffusion.Run.Keys import EDITS, FIGURES
from Diffusion.Run.TrainingRun import TrainingStopped
from Diffusion.Train import fit

STATES = {"train": fit, "eval": evaluate, "fid": score, "nll": likelihood,
          **{name: getattr(Figures, name) for name in FIGURES},  # each figure's state is named as its function
          **{name: getattr(Editing, name) for name in EDITS}}


def run_state(model_config, variant):
    """Complete and check `model_config` for `variant` (the unconditional or the guided model),
    then run its "state"."""
    config = complete(model_config, variant.keys, variant.absent)
    STATES[config["state"]](config, variant)


def run_script(main, script_config, variant, description):
    """Run `main(config)` with the script's `script_config` overridden by the command line;
    an error that stops the run ends the program with its message instead of a traceback."""
    config = parse_command_line(script_config, variant.keys, variant.absent, sys.argv[1:], description)
    try:
        main(config)
    except RunError as error:
        exit_with(f"error: {error}", 1)
    except TrainingStopped as stopped:
        exit_with(str(stopped), stopped.exit_status)


def exit_with(sentence, exit_status):
    """End the program with `sentence` on stderr, written in one piece (a launcher's own lines
    on the same stream cannot cut into it)."""
    sys.stderr.write(f"{sentence}\n")
    sys.exit(exit_status)
