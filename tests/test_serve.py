"""The HTTP server, through the official `openai` client and plain HTTP, on a live 127.0.0.1 server."""

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from _trained_tiny import trained_tiny_checkpoint
from serve_helpers import LiveServer, metric

KEY = "test-key-123"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint):
    live = LiveServer(checkpoint, api_key=KEY, max_batch_size=8, max_queue=32)
    yield live
    live.stop()


@pytest.fixture
def make_server(checkpoint):
    servers = []

    def make(**options):
        servers.append(LiveServer(checkpoint, **options))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def test_completions_through_the_openai_client(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.index == 0 and choice.text
    assert choice.finish_reason in ("length", "stop")
    prompt_tokens = len(server.engine.encode("The"))
    assert out.usage.prompt_tokens == prompt_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens

    pieces, finish, usage = [], None, None
    stream = client.completions.create(
        model="tiny", prompt="The", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # streamed in pieces
    assert "".join(pieces) == choice.text and finish == choice.finish_reason
    assert usage.model_dump() == out.usage.model_dump()


def test_chat_completions_through_the_openai_client(server):
    """Messages become the prompt through the checkpoint's chat format (here the plain one: role lines), and
    an assistant turn ends where the model starts the next role line."""
    client = server.client()
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does a function return?"},
    ]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    prompt = server.chat_format.render(messages)
    assert prompt.endswith("User: What does a function return?\nAssistant:")
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(server.engine.encode(prompt))
    # the same as a completion of the rendered prompt that stops at the chat format's stop strings
    same = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=list(server.chat_format.stop)
    )
    assert out.choices[0].message.content == same.choices[0].text
    assert out.choices[0].finish_reason == same.choices[0].finish_reason

    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == same.choices[0].text
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role must be one of"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])


def test_seed_n_and_stop(server):
    client = server.client()
    kw = dict(model="tiny", prompt="A function", max_tokens=16, temperature=1.0)
    a = client.completions.create(seed=11, n=3, **kw)
    b = client.completions.create(seed=11, n=3, **kw)
    c = client.completions.create(seed=12, n=3, **kw)
    texts = [ch.text for ch in sorted(a.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in sorted(a.choices, key=lambda ch: ch.index)] == [0, 1, 2]
    assert texts == [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]
    assert texts != [ch.text for ch in sorted(c.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) > 1  # the n samples differ
    assert a.usage.prompt_tokens == len(server.engine.encode("A function"))  # the prompt once, as OpenAI
    assert 3 <= a.usage.completion_tokens <= 3 * 16  # the choices' tokens together
    greedy = (
        client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0).choices[0].text
    )
    stop = greedy[6:9]
    cut = client.completions.create(
        model="tiny", prompt="The", max_tokens=30, temperature=0, stop=[stop, "§"]
    )
    assert cut.choices[0].text == greedy[: greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streaming_clients_get_their_solo_text(server, monkeypatch):
    """16 greedy streams at once through 8 slots (8 decode, 8 queue, each joins as another leaves): every
    stream completes with exactly the text its prompt gets when sent alone."""
    client, rows = server.client(), []
    step = server.engine.decoder.step
    monkeypatch.setattr(server.engine.decoder, "step", lambda ids, *a: rows.append(len(ids)) or step(ids, *a))
    prompts = [
        f"{w} {i}" for i, w in enumerate(["The", "A", "def", "Return", "class", "import", "x =", "if"] * 2)
    ]

    def stream(prompt):
        chunks = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
        return "".join(c.text for chunk in chunks for c in chunk.choices)

    alone = [stream(p) for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = stream(prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert len(set(alone)) > 8
    assert max(rows) == 8  # a full batch


def test_a_client_that_disconnects_frees_its_slot(server, monkeypatch):
    step = server.engine.decoder.step  # slowed down: the stream is still running when the client leaves
    monkeypatch.setattr(server.engine.decoder, "step", lambda *a: time.sleep(0.01) or step(*a))
    before = httpx.get(f"{server.url}/metrics").text
    cancelled = 'deepseek_lm_request_finish_total{reason="cancelled"}'
    body = {"prompt": "The", "max_tokens": 200, "temperature": 0, "stream": True}
    server.engine.eos_token_id, eos = None, server.engine.eos_token_id  # 200 tokens unless stopped
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # streaming: the request holds a slot
            assert server.engine.stats()["running"] == 1
        deadline = time.monotonic() + 10
        while server.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        page = httpx.get(f"{server.url}/metrics").text
    finally:
        server.engine.eos_token_id = eos
    assert metric(page, "deepseek_lm_running_batch_size") == 0
    assert metric(page, cancelled) == metric(before, cancelled) + 1
    out = server.client().completions.create(model="tiny", prompt="The", max_tokens=3)
    assert out.usage.completion_tokens <= 3


BAD_REQUESTS = [
    # (what, body or raw bytes, extra headers, status, words in the message)
    ("malformed JSON", b'{"prompt": "The", ', {}, 400, "not valid JSON"),
    ("a prompt of the wrong type", {"prompt": 5}, {}, 400, "prompt"),
    ("a temperature of the wrong type", {"prompt": "x", "temperature": "hot"}, {}, 400, "temperature"),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -3}, {}, 400, "max_tokens"),
    ("temperature < 0", {"prompt": "x", "temperature": -0.5}, {}, 400, "temperature"),
    ("top_p above 1", {"prompt": "x", "top_p": 1.5}, {}, 400, "top_p"),
    ("n of 0", {"prompt": "x", "n": 0}, {}, 400, "n"),
    (
        "an over-long prompt",
        {"prompt": "The quick brown fox " * 80, "max_tokens": 16},
        {},
        400,
        "-token context",
    ),
    ("token ids outside the vocabulary", {"prompt": [1, 2, 10**6]}, {}, 400, "token ids"),
    ("logprobs above 20", {"prompt": "x", "logprobs": 21}, {}, 400, "logprobs"),
    ("a seed beyond 64 bits", {"prompt": "x", "seed": 1208925819614629174706176}, {}, 400, "seed"),
    ("a lone surrogate in the prompt", b'{"prompt": "\\ud800 abc"}', {}, 400, "lone surrogate"),
    ("a lone surrogate in a stop string", b'{"prompt": "x", "stop": ["\\udfff"]}', {}, 400, "stop.0"),
    (
        "a lone surrogate in a message",
        b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}',
        {},
        400,
        "messages.0.content",
    ),
    ("more prompts than the server ever holds", {"prompt": ["x"] * 1000}, {}, 400, "ever holds: 40"),
    ("n times prompts beyond the server", {"prompt": ["x"] * 3, "n": 16}, {}, 400, "ever holds"),
    ("max_tokens 0 without echo", {"prompt": "x", "max_tokens": 0}, {}, 400, "needs echo"),
    ("a logit_bias key that is no token", {"prompt": "x", "logit_bias": {"abc": 5}}, {}, 400, "logit_bias"),
    ("a logit_bias key of other digits", {"prompt": "x", "logit_bias": {"²": 5}}, {}, 400, "logit_bias"),
    ("a logit_bias of NaN", b'{"prompt": "x", "logit_bias": {"5": NaN}}', {}, 400, "logit_bias.5"),
    (
        "a logit_bias token outside the vocabulary",
        {"prompt": "x", "logit_bias": {"99999": 5}},
        {},
        400,
        "token ids",
    ),
    ("presence_penalty above 2", {"prompt": "x", "presence_penalty": 3}, {}, 400, "presence_penalty"),
    ("repetition_penalty 0", {"prompt": "x", "repetition_penalty": 0}, {}, 400, "repetition_penalty"),
    (
        "json_schema without a schema",
        {"prompt": "x", "response_format": {"type": "json_schema"}},
        {},
        400,
        "json_schema",
    ),
    (
        "an invalid regex",
        {"prompt": "x", "structured_outputs": {"regex": "((("}},
        {},
        400,
        "regular expression",
    ),
    (
        "two constraints",
        {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}},
        {},
        400,
        "exactly one",
    ),
    (
        "top_logprobs without logprobs",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {},
        400,
        "top_logprobs needs logprobs",
    ),
    ("a huge body", {"prompt": "x" * 2_000_000}, {}, 413, "larger than"),
    ("an unknown model", {"prompt": "x", "model": "gpt-9"}, {}, 404, "does not exist"),
    ("no API key", {"prompt": "x"}, {"Authorization": ""}, 401, "no API key"),
    ("a wrong API key", {"prompt": "x"}, {"Authorization": "Bearer nope"}, 401, "incorrect API key"),
    ("chat without messages", {"messages": []}, {}, 400, "messages"),
]


@pytest.mark.parametrize("what, body, headers, status, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(
    server, what, body, headers, status, words
):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.url + path, content=content,
        headers={"Content-Type": "application/json", **server.headers, **headers}, timeout=30,
    )  # fmt: skip
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and "\n" not in error["message"]
    if what == "an over-long prompt":
        n = len(server.engine.encode(body["prompt"]))
        assert f"the prompt has {n} tokens and max_tokens is 16" in error["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    ok = server.client().completions.create(model="tiny", prompt="The", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_openai_client_raises_the_servers_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model="tiny", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)


def test_full_queue_is_a_503_with_retry_after(make_server, monkeypatch):
    live = make_server(max_batch_size=1, max_queue=0)
    live.engine.eos_token_id = None
    step = live.engine.decoder.step  # slowed down: the first request holds the slot meanwhile
    monkeypatch.setattr(live.engine.decoder, "step", lambda *a: time.sleep(0.02) or step(*a))
    body = {"prompt": "The", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response (the client leaves)
        next(lines)  # the one slot is taken
        busy = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "busy" in busy.json()["error"]["message"]


def test_health_metrics_and_page_need_no_key(server):
    assert httpx.get(f"{server.url}/health").json() == dict(status="ok", waiting=0, prefilling=0, running=0)
    page = httpx.get(f"{server.url}/metrics").text
    for name in (
        "deepseek_lm_requests_total", "deepseek_lm_prompt_tokens_total", "deepseek_lm_generation_tokens_total",
        "deepseek_lm_queue_depth", "deepseek_lm_running_batch_size", "deepseek_lm_time_to_first_token_seconds",
        "deepseek_lm_time_per_output_token_seconds",
    ):  # fmt: skip
        assert f"# TYPE {name.removesuffix('_total')}" in page
    assert metric(page, "deepseek_lm_generation_tokens_total") > 0
    assert metric(page, "deepseek_lm_time_to_first_token_seconds_count") > 0
    html = httpx.get(server.url + "/").text
    assert "<title>deepseek-lm playground</title>" in html and "://" not in html  # nothing from elsewhere
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_the_package_and_the_engine_import_no_web_stack():
    code = (
        "import sys, deepseek_lm, deepseek_lm.cli, deepseek_lm.generate.batching; "
        "print(','.join(m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def test_connections_send_each_event_at_once(server):
    """Nagle's algorithm off on every connection: with it on, a stream's second small write (the first
    token after the role event) waited for the client's delayed ACK, up to 40 ms."""
    with httpx.Client() as client:
        assert client.get(f"{server.url}/health").status_code == 200  # the connection stays open
        sockets = [c.transport.get_extra_info("socket") for c in server.server.server_state.connections]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
