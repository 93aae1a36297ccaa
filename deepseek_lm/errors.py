"""The one exception type the command line turns into a one-line message (SPEC §9), the notices it shows
as one line, and the library warnings it does not show."""

import warnings


class UserError(Exception):
    """A problem with the user's input, shown as one line on stderr (no traceback unless `--debug`).

    The message names the input and says what to do.
    """


class Notice(UserWarning):
    """Something the user should know that is not a problem (a one-time compile, ...): the command line
    shows it as one line on stderr, without the warning's file and source line."""


def silence_library_noise() -> None:
    """Leave out warnings that say nothing to a user: torch 2.13's AOTInductor packaging calls its own
    deprecated pytree API while a decode step compiles."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
