"""Exceptions and the exit codes they map to.

One exception type per kind of failure. The CLI maps them to a one-line message and an exit code
in one place (`ehrplan.cli.app.main`); set ``EHRPLAN_DEBUG=1`` to see the full traceback instead.

Exit codes (documented in the README):

- 0: success
- 1: the config does not fit the memory budget or device (a valid answer, not a crash)
- 2: bad input (unknown preset, invalid field, malformed file, unknown device, ...)
- 3: training diverged (a NaN or infinite loss); the last good checkpoint is kept
- 70: an internal error (a bug in ehrplan; the message says how to get the traceback)
- 130: interrupted (Ctrl-C)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class EhrplanError(Exception):
    """Base class of every error ehrplan reports to a user."""

    exit_code: int = EXIT_BAD_INPUT


class ConfigError(EhrplanError):
    """A config, preset name, override or config file is invalid."""


class UsageError(EhrplanError):
    """Command-line options that contradict each other or cannot be honoured."""


class DataError(EhrplanError):
    """A data set is missing, malformed or not in the expected schema."""


class OutputError(EhrplanError):
    """A file or folder cannot be written: disk full, no permission, a file where a folder
    should be, a folder where a file should be. The message names the path."""


class RunLockedError(EhrplanError):
    """Another process is writing the run folder (it holds the folder's lock)."""


class Interrupted(EhrplanError):
    """Ctrl-C: the message says where the run stands (its step and last checkpoint)."""

    exit_code = EXIT_INTERRUPTED


class DeviceError(EhrplanError):
    """An unknown device, or one that is not present on this machine."""


class DoesNotFitError(EhrplanError):
    """The model does not fit the memory budget: an answer, not a crash."""

    exit_code = EXIT_DOES_NOT_FIT


class DivergedError(EhrplanError):
    """The loss or the gradient became NaN or infinite; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class MissingExtraError(EhrplanError):
    """A command needs an optional extra (`pip install 'ehrplan[train]'`) that is not installed."""
