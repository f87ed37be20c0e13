"""matplotlib for the benchmarks' figures: Diffusion/Run/Figures.py's pyplot, whose sentence on a
missing matplotlib (how to install it) ends the script."""
import sys

from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Figures import pyplot as figures_pyplot


def pyplot():
    """matplotlib.pyplot drawing into files only; without matplotlib, the script exits saying how to install it."""
    try:
        return figures_pyplot()
    except ConfigError as error:
        sys.exit(str(error))
