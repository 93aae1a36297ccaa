"""Run the app with uvicorn on a socket bound here, and stop cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from deepseek_lm.errors import UserError
from deepseek_lm.generate.batching import BatchEngine

_SWITCH_INTERVAL = 5e-4  # seconds a thread holds the GIL while another waits for it (Python's: 5e-3)


class _Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C / SIGTERM first closes the engine: every stream in flight ends
    with an error event at once (uvicorn would otherwise wait for them to finish), then uvicorn stops."""

    def __init__(self, config: uvicorn.Config, engine: BatchEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.close("the server is shutting down", timeout=10)
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has stopped (the process would die of it): the command
        # ends normally instead, exit code 0
        self._captured_signals.clear()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line `UserError` (port in use, address not on this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose socket
    # says TCP. With it on, a stream's second small write waits for the client's ACK of the first, which
    # Linux delays up to 40 ms: a streamed request's first token came ~44 ms after it was sent, not ~15.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use: stop what holds it, or pick --port") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): check --host and --port") from None
    sock.listen(128)
    return sock


def serve(
    app: Any, engine: BatchEngine, sock: socket.socket, on_ready: Callable[[], None] | None = None
) -> None:
    """Serve `app` on `sock` until Ctrl-C / SIGTERM (then close the engine and return)."""
    # Two busy Python threads share the GIL: the engine's loop and the event loop. A thread back from a
    # step (which runs without the GIL) waits for the other to let go, by default up to 5 ms: a token
    # every 5 ms at one client. At 0.5 ms a step is not slowed by a busy neighbour (model/aot.py's step
    # at batch 1: 5.7 ms beside a spinning Python thread at the default, 0.9 at 0.5 ms, 1.3 alone).
    sys.setswitchinterval(_SWITCH_INTERVAL)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = _Server(config, engine)
    if on_ready is not None:
        _call_when_started(server, on_ready)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


def _call_when_started(server: uvicorn.Server, callback: Callable[[], None]) -> None:
    startup = server.startup

    async def started(sockets: Any = None) -> None:
        await startup(sockets=sockets)
        if server.started:
            callback()

    server.startup = started
