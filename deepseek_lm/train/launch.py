"""Training in several local processes on a CPU (`train.cpu_processes N`): the same command, N times, under
torchrun's own machinery (`torch.distributed.run`), DDP over gloo, the cores shared out between them.

Why: a small model's CPU step is many small operations, and one process's intra-op threads share each of them
poorly, while its Python dispatch runs on one core alone; two one-thread processes, each with half the global
batch, keep both cores busy (benchmarks/learning/README.md has the figures).

What the user sees is one run: rank 0 prints (the others print nothing but errors), checkpoints are written
by rank 0 as under any torchrun job, and Ctrl-C works as in one process. torchrun starts each process in a
session of its own, so a terminal's Ctrl-C reaches the launcher alone; the launcher hands SIGINT and SIGTERM
on to the processes itself (torchrun's agent is told to leave both alone): the first stops them after their
current step, evaluated and saved, exit 0 as a single process would; a second SIGINT aborts them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

from deepseek_lm.errors import UserError

FORWARDED = (signal.SIGINT, signal.SIGTERM)


class LaunchFailed(UserError):
    """A training process ended with an error (its own message is above, on stderr)."""


def wanted(processes: int, device_type: str) -> bool:
    """Launch only from a plain command on a CPU: not from inside a torchrun job (WORLD_SIZE set), where the
    processes already are, and not on a GPU, where one process per device is torchrun's own business."""
    return processes > 1 and device_type == "cpu" and "WORLD_SIZE" not in os.environ


def threads_per_process(processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def launch(command: list[str], processes: int) -> int:
    """Run `python -m deepseek_lm COMMAND...` in `processes` local processes; 0 when all of them succeed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc_per_node={processes}",
            "--signals_to_handle=SIGHUP,SIGQUIT",
            "-m",
            "deepseek_lm",
            *command,
        ]
    )
    env = {"OMP_NUM_THREADS": str(threads_per_process(processes))}
    with _environment(env), _quiet_agent(), _forwarding(FORWARDED):
        try:
            run(args)
        except ChildFailedError as e:
            rank, failure = min(e.failures.items())
            raise LaunchFailed(
                f"training process {rank} of {processes} failed (exit code {failure.exitcode}); its error is above"
            ) from None
    return 0


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set for the processes (which inherit them), and this process's environment put back after:
    torch.distributed.run also writes into it."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _forwarding(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """While the block runs, these signals go on to this process's children (the training processes, which
    torchrun's agent, running in this process, started) instead of acting here."""
    import psutil

    def forward(signum: int, frame: object) -> None:
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """torchrun's agent logs its start and each process's failure in several lines (each of its loggers at
    its own level); the processes print their own errors, and the launcher one line, so they keep quiet."""
    loggers = [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        sys.stdout.flush()
