"""The data layer's warnings (files with replaced bytes or no text, bad chat lines, cut conversations) on
stderr while a command runs, one line each: `deepseek-lm COMMAND: warning: ...`.

The handler is attached for the command only and removed after it, so calling two commands in one process
(the tests, a notebook) neither doubles nor misnames the lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER = "deepseek_lm.data"


class _Stderr(logging.Handler):
    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:  # looks up sys.stderr each time (pytest swaps it)
        print(f"deepseek-lm {self.command}: warning: {self.format(record)}", file=sys.stderr)


@contextmanager
def warnings_to_stderr(command: str) -> Iterator[None]:
    logger = logging.getLogger(LOGGER)
    handler, level = _Stderr(command), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
