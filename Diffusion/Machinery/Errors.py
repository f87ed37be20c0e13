"""What stops a run with one sentence instead of a traceback. Each class says what went wrong:
a mistake in the config (ConfigError) or something that happened to the run (a full disk, a
diverged loss, unreadable data, a lost process). The message says what, the value or file, and
what to do."""


class RunError(Exception):
    """An error the scripts report as `error: <message>`, without a traceback."""


class ConfigError(RunError, ValueError):
    """Something the user can fix in the config or in the files it names."""


class SaveFailed(RunError):
    """A file could not be written (a full disk, a folder that went away); what was written
    before is intact."""


class TrainingDiverged(RunError):
    """The loss stopped being finite, step after step."""


class DataUnavailable(RunError):
    """The training images cannot be had: no readable image, or a dataset that can be neither
    loaded nor downloaded."""


class ProcessLost(RunError):
    """Another process of a torchrun run stopped; this one stops too."""
