"""What Main.py and MainCondition.py run: the config (of the command line, or of a dict given to
main()), then the state it asks for. Whatever stops a run (a config mistake, a full disk, a lost
process, a stop request) is said in one sentence instead of a traceback."""
import sys

from Diffusion.Machinery.Config import complete, parse_command_line
from Diffusion.Machinery.Errors import RunError
from Diffusion.Machinery.Evaluation import evaluate, score
from Diffusion.Machinery.Interrupt import TrainingStopped
from Diffusion.Machinery.NLL import likelihood
from Diffusion.Train import fit

STATES = {"train": fit, "eval": evaluate, "fid": score, "nll": likelihood}


def run_state(model_config, pieces):
    """Complete and check `model_config` for the model of `pieces`, then run its "state"."""
    config = complete(model_config, pieces.keys, pieces.absent)
    STATES[config["state"]](config, pieces)


def run_script(main, script_config, pieces, description):
    """Run `main(config)` with the script's `script_config` overridden by the command line;
    an error that stops the run ends the program with its message instead of a traceback."""
    config = parse_command_line(script_config, pieces.keys, pieces.absent, sys.argv[1:], description)
    try:
        main(config)
    except RunError as error:
        say_last(f"error: {error}", 1)
    except TrainingStopped as stopped:
        say_last(str(stopped), stopped.exit_status)


def say_last(sentence, exit_status):
    """End the program with `sentence` on stderr, written in one piece (a launcher's own lines
    on the same stream cannot cut into it)."""
    sys.stderr.write(f"{sentence}\n")
    sys.exit(exit_status)
