"""Live servers for the serve tests: uvicorn in a thread on a free 127.0.0.1 port, stopped by the fixture."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn

from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.generate.batching import BatchEngine
from deepseek_lm.serve.app import create_app
from deepseek_lm.serve.server import bind


class LiveServer:
    def __init__(self, checkpoint, *, api_key=None, engine_type=BatchEngine, **engine_options) -> None:
        self.engine = engine_type(checkpoint.model, checkpoint.tokenizer, **engine_options).start()
        self.api_key = api_key
        self.chat_format = chat_format = ChatFormat.for_tokenizer(
            checkpoint.tokenizer, checkpoint.chat_template
        )
        app = create_app(self.engine, model_name="tiny", api_key=api_key, chat_format=chat_format)
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])))
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        from openai import OpenAI

        kwargs = {"api_key": self.api_key or "none", "max_retries": 0, **kwargs}
        return OpenAI(base_url=f"{self.url}/v1", **kwargs)

    def stop(self) -> None:
        self.engine.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def metric(page: str, series: str) -> float:
    """The value of one series (name and labels as printed, e.g. 'x_total{reason="stop"}') of a Prometheus
    text page; 0 when absent."""
    for line in page.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
