"""User-facing errors: one line each, printed by ``main`` without a traceback (exit 2).

Raise a subclass of ``TRMError`` wherever the cause is the user's input (a config, a
dataset, a checkpoint) rather than a bug; its message must say what is wrong and, where
it helps, what the valid choices are or how to fix it.
"""


class TRMError(Exception):
    """Base class for errors reported to the user as one line."""


class ConfigError(TRMError, ValueError):
    """A config field holds an unknown name or an invalid value."""


class DataError(TRMError):
    """A dataset is missing, malformed, or does not fit the requested task split."""


class CheckpointError(TRMError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class TrainingError(TRMError):
    """Training or merging diverged (a NaN or Inf loss); the message names where."""


class WorkdirError(TRMError):
    """The workdir cannot be used: not a writable directory, or held by another run."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup missed; the message lists the choices (a ``KeyError`` too, so
    code that catches a registry's ``KeyError`` keeps working)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def check_choice(value, choices, field: str) -> None:
    """Raise ``UnknownNameError`` naming ``field`` and the sorted ``choices`` unless
    ``value`` is one of them (the one check every registry and config field uses)."""
    if value not in choices:
        raise UnknownNameError(
            f"unknown {field} {value!r}; choices: {', '.join(sorted(map(str, choices)))}"
        )
