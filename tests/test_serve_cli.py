"""`deepseek-lm serve` as a user runs it: a subprocess on a free port, stopped by SIGTERM mid-stream."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from _trained_tiny import trained_tiny_run

from deepseek_lm.serve.server import bind


def _serve(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "deepseek_lm", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _url(proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if match := re.search(r"serving \S+ at (http://\S+) ", line):
            return match[1]
        if proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"the server did not start: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def test_sigterm_ends_streams_with_an_error_event_and_the_server_exits(run_dir):
    proc = _serve(
        "--checkpoint", str(run_dir), "--port", "0", "--model-name", "tiny", "--max-batch-size", "2"
    )
    try:
        url = _url(proc)
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        # a stream that takes a while (the tiny model decodes ~1,000 tokens/s): 4 of them through 2 slots
        body = {"prompt": "The", "max_tokens": 250, "stream": True, "temperature": 1.0, "seed": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in rest[:-1]]
        assert len(events) < 100  # ended early (250 tokens take a few hundred ms)
        assert events[-1]["error"]["message"] == "generation stopped: the server is shutting down"
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()


def test_a_port_in_use_and_a_missing_checkpoint_are_one_line_errors(run_dir, tmp_path):
    sock = bind("127.0.0.1", 0)
    try:
        port = str(sock.getsockname()[1])
        proc = _serve("--checkpoint", str(run_dir), "--port", port)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and err.strip().count("\n") == 0
        assert f"port {port} on 127.0.0.1 is in use" in err
    finally:
        sock.close()
    proc = _serve("--checkpoint", str(tmp_path / "nothing"), "--port", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no such checkpoint" in err and err.strip().count("\n") == 0
