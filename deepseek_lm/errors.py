"""The one exception type the command line turns into a one-line message (SPEC §9)."""


class UserError(Exception):
    """A problem with the user's input, shown as one line on stderr (no traceback unless `--debug`).

    The message names the input and says what to do.
    """


class Notice(UserWarning):
    """Something the user should know that is not a problem (a one-time compile, ...): the command line
    shows it as one line on stderr, without the warning's file and source line."""
