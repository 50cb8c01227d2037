"""The project's user-error type.

Anything a user can cause (a bad flag, file, config value or data line) raises
`UserError` with a message that names the problem and the fix. The CLI prints it
as one line on stderr and exits non-zero, without a traceback.
"""


class UserError(ValueError):
    """An error caused by user input; its message says what to change."""


class LaunchError(UserError):
    """A launch that cannot work, found identically by every torchrun rank (e.g. a process count
    the model cannot be split over); the first rank to raise it prints it, so the user reads it once."""
