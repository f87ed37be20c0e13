"""Stopping a training run cleanly: SIGTERM (a scheduler's pre-emption, `kill`) or Ctrl-C asks
the run to stop after the current step; it then saves its training state and ends with
`TrainingStopped`, whose message says how to continue. A second Ctrl-C stops at once.
"""
import signal


class TrainingStopped(Exception):
    """The run stopped on request after saving its state; the message says how to continue.
    `exit_status` is the shell's convention for the signal: 128 + its number."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.exit_status = 128 + signal_number


class StopRequests:
    """While entered, SIGTERM and SIGINT set `.signal` (the first one received) instead of
    killing the process; the training loop looks at it between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _request(self, signal_number, frame):
        if self.signal == signal.SIGINT and signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.signal = self.signal or signal_number

    @property
    def name(self):
        return signal.Signals(self.signal).name

    def __enter__(self):
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._request)
        return self

    def __exit__(self, *exception):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False


def ignore_ctrl_c(worker_id=None):
    """For data-loading workers (DataLoader's worker_init_fn): Ctrl-C reaches every process of
    the terminal's group, and the main process alone decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
