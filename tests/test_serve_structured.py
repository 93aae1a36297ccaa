"""Structured output: response_format (json_object, json_schema) and the structured_outputs extension (regex,
Lark grammar, choice) make even a barely trained model's answers parse and validate, sampled or greedy,
alone or in a batch beside unconstrained requests."""

import json
import re
import threading

import httpx
import jsonschema
import pytest
from _trained_tiny import trained_tiny_checkpoint
from serve_helpers import LiveServer

from deepseek_lm.generate.speculative_batching import SpeculativeBatchEngine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["function", "class", "module"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "count", "kind", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint):
    live = LiveServer(checkpoint, max_batch_size=4, max_queue=16)
    yield live
    live.stop()


def test_json_schema_answers_always_validate(server):
    """16 sampled chat answers (temperature 1) under a JSON schema: every one parses and validates, and
    ends by itself (finish_reason stop)."""
    out = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Describe json.dumps as JSON."}], n=16,
        temperature=1.0, seed=0, max_tokens=160, response_format=RESPONSE_FORMAT,
    )  # fmt: skip
    assert len(out.choices) == 16
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop"
    assert len({c.message.content for c in out.choices}) > 8  # sampled, not one answer


def test_json_object_regex_grammar_and_choice(server):
    client = server.client()
    kw = dict(model="tiny", prompt="The", max_tokens=60, temperature=1.0, seed=1)
    # any JSON object: strings without a bound may run to max_tokens (finish_reason length); an answer
    # that ends by itself parses
    objects = client.completions.create(
        extra_body={"response_format": {"type": "json_object"}}, n=8, **{**kw, "max_tokens": 200}
    ).choices
    assert any(c.finish_reason == "stop" for c in objects)
    for c in objects:
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)
    pattern = r"(yes|no), [a-z]{2,5}\.[0-9]{1,3}"
    regex = client.completions.create(extra_body={"structured_outputs": {"regex": pattern}}, **kw).choices[0]
    assert re.fullmatch(pattern, regex.text), regex.text
    lark = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'
    tuple_ = client.completions.create(extra_body={"structured_outputs": {"grammar": lark}}, **kw).choices[0]
    assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", tuple_.text), tuple_.text
    options = ["a function", "a class", "a module"]
    picked = client.completions.create(extra_body={"structured_outputs": {"choice": options}}, **kw)
    assert picked.choices[0].text in options


def test_constrained_and_free_requests_share_the_batch_undisturbed(server):
    """Constrained requests (sampled, seeded) and free greedy streams at once through 4 slots: each answer is
    what it is alone, and the constrained ones validate."""
    bodies = [
        dict(prompt=p, max_tokens=120, temperature=0.8, seed=i, response_format=RESPONSE_FORMAT)
        if i % 2
        else dict(prompt=p, max_tokens=30, temperature=0)
        for i, p in enumerate(["The", "A function", "x = 1", "import os", "class", "def", "return", "if x"])
    ]

    def send(body):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", **body}, timeout=60)
        return r.json()["choices"][0]["text"]

    alone = [send(b) for b in bodies]
    together = [None] * len(bodies)

    def run(i):
        together[i] = send(bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    for text in alone[1::2]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_the_speculative_server_refuses_what_it_cannot_honour(checkpoint):
    live = LiveServer(checkpoint, engine_type=SpeculativeBatchEngine, max_batch_size=2)
    try:
        for extra, name in [
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"logprobs": 1}, "logprobs"),
            ({"presence_penalty": 1}, "penalties_or_logit_bias"),
        ]:
            r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", **extra}, timeout=30)
            assert r.status_code == 400 and f"{name} is not supported" in r.json()["error"]["message"]
    finally:
        live.stop()
