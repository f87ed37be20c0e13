"""matplotlib, which draws the benchmarks' figures: an optional dependency, named when it is missing."""
import sys


def pyplot():
    """matplotlib.pyplot drawing into files only (the Agg backend: no window, no display needed);
    without matplotlib, the script exits with a sentence that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("the benchmarks' plots need matplotlib, which is not installed: "
                 "pip install -r requirements-optional.txt")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
