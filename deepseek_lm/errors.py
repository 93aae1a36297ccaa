"""The one exception type the command line turns into a one-line message (SPEC §9)."""


class UserError(Exception):
    """A problem with the user's input, shown as one line on stderr (no traceback unless `--debug`).

    The message names the input and says what to do.
    """
