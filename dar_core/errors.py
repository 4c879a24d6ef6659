"""Exception types. Every message names the offending value and what was expected."""


class DARError(Exception):
    """Base class of every error raised by dar_core and its backends."""


class ConfigError(DARError, ValueError):
    """An invalid model, routing or training configuration field."""


class InputError(DARError, ValueError):
    """A model input (image, timestep, label) with the wrong shape, range or value."""


class CheckpointError(DARError, ValueError):
    """A checkpoint that is unreadable or does not match the model it is loaded into."""


class NonFiniteLossError(DARError, FloatingPointError):
    """Training produced NaN/inf; the message names the step. The last good checkpoint stays."""


class RunFolderError(DARError, RuntimeError):
    """A run folder that holds another run, is locked by a live trainer, or cannot be written."""


class TrainingInterrupted(DARError, RuntimeError):
    """SIGTERM/SIGINT stopped training after writing a checkpoint of the current step."""
