"""What clients and harnesses send: logprobs (completions and chat), echo with prompt log-probabilities and
max_tokens 0, presence / frequency / repetition penalties and logit_bias, with vLLM's semantics. Checked
against the model's own forward (log-softmax within 1e-5), against a slow twin of the penalties written
here, and alone against in a full batch (bitwise)."""

import threading

import httpx
import pytest
import torch
from _trained_tiny import trained_tiny_checkpoint
from serve_helpers import LiveServer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint):
    live = LiveServer(checkpoint, max_batch_size=4, max_queue=16)
    yield live
    live.stop()


def _complete(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _model_logprobs(checkpoint, ids: list[int]) -> torch.Tensor:
    """(T, V): the log-softmax of `model(ids)`'s logits at every position (the reference)."""
    with torch.no_grad():
        logits = checkpoint.model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_echo_with_max_tokens_0_scores_the_prompt_as_the_model_does(server, checkpoint):
    """What evaluation harnesses send for log-likelihoods: every prompt token's log-probability given the
    tokens before it (the first has none: null), with the top alternatives, and nothing generated."""
    prompt = "def get(self, key, default=None):\n    return self.values"
    ids = server.engine.encode(prompt)
    out = _complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == dict(prompt_tokens=len(ids), completion_tokens=0, total_tokens=len(ids))
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    reference = _model_logprobs(checkpoint, ids)
    want = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-5, rtol=0)
    decode = server.engine.tokenizer.decode
    for i in range(1, len(ids)):
        values, top = reference[i - 1].topk(3)
        alternatives = {
            decode([t], skip_special_tokens=False): v for t, v in zip(top.tolist(), values.tolist())
        }
        for token, value in alternatives.items():
            assert lp["top_logprobs"][i][token] == pytest.approx(value, abs=1e-5)
    assert lp["tokens"] == [decode([t], skip_special_tokens=False) for t in ids]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


def test_generated_tokens_logprobs_are_the_models(server, checkpoint):
    """Greedy decoding through the batched decoder: each generated token's log-probability and the prompt's
    equal the log-softmax of the model's forward over the whole text, and each token is its row's argmax."""
    server.engine.eos_token_id, eos = None, server.engine.eos_token_id
    try:
        out = _complete(server, prompt="The quick", max_tokens=20, temperature=0, logprobs=2, echo=True)
    finally:
        server.engine.eos_token_id = eos
    lp = out["choices"][0]["logprobs"]
    prompt = server.engine.encode("The quick")
    ids = list(prompt)  # then greedy tokens of the reference
    for _ in range(20):
        ids.append(int(_model_logprobs(checkpoint, ids)[-1].argmax()))
    reference = _model_logprobs(checkpoint, ids)
    want = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert len(lp["token_logprobs"]) == len(ids)
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-5, rtol=0)
    assert out["choices"][0]["text"] == server.engine.tokenizer.decode(ids)
    for i in range(len(prompt), len(ids)):  # a greedy token is its row's most likely
        assert lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())


def test_what_lm_eval_sends(server, checkpoint):
    """lm-eval 0.4.13's local-completions log-likelihood request: 8 token-id prompts, max_tokens 1,
    logprobs 1, echo, temperature 0, seed 1234; it reads token_logprobs over every prompt token plus the
    generated one."""
    prompts = [server.engine.encode(f"x = {i} + {i * 7}") for i in range(8)]
    body = dict(prompt=prompts, max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1234)
    out = _complete(server, **body)
    assert [c["index"] for c in out["choices"]] == list(range(8))
    for ids, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and all(len(t) <= 2 for t in lp["top_logprobs"][1:])
        want = _model_logprobs(checkpoint, ids)
        got = torch.tensor(lp["token_logprobs"][1 : len(ids)])
        assert torch.allclose(got, want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=1e-5, rtol=0)


def test_chat_logprobs_through_the_openai_client(server):
    client = server.client()
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is a list?"}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(out.choices[0].message.content)
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob == max(t.logprob for t in c.top_logprobs)
        assert bytes(c.bytes).decode() == c.token
    streamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is a list?"}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3, stream=True,
    )  # fmt: skip
    pieces = [t for chunk in streamed for ch in chunk.choices if ch.logprobs for t in ch.logprobs.content]
    assert [(t.token, t.logprob) for t in pieces] == [(c.token, c.logprob) for c in content]


def test_completion_logprobs_through_the_openai_client_streamed_and_not(server):
    client = server.client()
    kw = dict(model="tiny", prompt="import", max_tokens=10, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for chunk in client.completions.create(stream=True, **kw) for c in chunk.choices]
    assert "".join(c.text for c in chunks) == whole.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens and values == whole.logprobs.token_logprobs
    assert offsets == whole.logprobs.text_offset


def _penalised(logits, prompt, output, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """vLLM's penalties, written out for one row: the slow twin of generate/logits_processing.py."""
    x = logits.clone().double()
    for token, value in (bias or {}).items():
        x[token] += value
    for token in set(prompt) | set(output):
        x[token] = x[token] / repetition if x[token] > 0 else x[token] * repetition
    for token in set(output):
        x[token] -= frequency * output.count(token) + presence
    return x


PENALTIES = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(
        presence_penalty=-0.5, frequency_penalty=1.2, repetition_penalty=1.3, logit_bias={"5": 4.0, "9": -3}
    ),
]


@pytest.mark.parametrize("penalties", PENALTIES, ids=["presence", "frequency", "repetition", "all + bias"])
def test_penalties_and_bias_follow_vllms_definition(server, checkpoint, penalties):
    """Greedy tokens under the penalties are the argmax of the slow twin over the model's own logits, and
    the reported logprobs stay the model's (before any penalty), as vLLM reports them."""
    prompt = server.engine.encode("The the the")
    server.engine.eos_token_id, eos = None, server.engine.eos_token_id
    try:
        out = _complete(
            server, prompt=prompt, max_tokens=16, temperature=0, logprobs=0, echo=True, **penalties
        )
    finally:
        server.engine.eos_token_id = eos
    bias = {int(k): float(v) for k, v in penalties.get("logit_bias", {}).items()}
    kw = dict(
        presence=penalties.get("presence_penalty", 0.0), frequency=penalties.get("frequency_penalty", 0.0),
        repetition=penalties.get("repetition_penalty", 1.0), bias=bias,
    )  # fmt: skip
    ids, generated = list(prompt), []
    for _ in range(16):
        with torch.no_grad():
            logits = checkpoint.model(torch.tensor([ids])).logits[0, -1].float()
        token = int(_penalised(logits, prompt, generated, **kw).argmax())
        generated.append(token)
        ids.append(token)
    assert out["choices"][0]["text"] == server.engine.tokenizer.decode(ids)
    plain = _complete(server, prompt=prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
    assert plain != server.engine.tokenizer.decode(generated)  # the penalties changed the answer
    reference = _model_logprobs(checkpoint, ids)
    got = torch.tensor(out["choices"][0]["logprobs"]["token_logprobs"][1:])
    assert torch.allclose(
        got, reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=1e-5, rtol=0
    )


def test_a_large_logit_bias_forces_a_token(server):
    token = server.engine.encode("def")[-1]
    out = _complete(server, prompt="The", max_tokens=6, temperature=1.0, seed=3, logit_bias={str(token): 100})
    assert out["choices"][0]["text"] == server.engine.tokenizer.decode([token] * 6)


def test_logprobs_penalties_and_bias_are_the_same_alone_and_in_a_full_batch(server):
    """8 requests with logprobs, penalties, bias, sampled with seeds, through 4 slots at once: each response
    (text, every log-probability) is bitwise what it is alone."""
    bodies = [
        dict(prompt=p, max_tokens=12, temperature=0.9, seed=i, logprobs=3, echo=i % 2 == 0,
             presence_penalty=0.2 * i, frequency_penalty=0.1, repetition_penalty=1.0 + 0.1 * i,
             logit_bias={str(i + 3): 2.0})
        for i, p in enumerate(["The", "A function", "x = 1", "import os", "class", "def", "return", "if x"])
    ]  # fmt: skip
    alone = [_complete(server, **b)["choices"] for b in bodies]
    together = [None] * len(bodies)

    def run(i):
        together[i] = _complete(server, **bodies[i])["choices"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def test_every_new_parameter_through_the_openai_client(server):
    """The official client sends each parameter as the server reads it: the same answers as plain HTTP."""
    client = server.client()
    token = server.engine.encode("def")[-1]
    kw = dict(
        prompt="The", max_tokens=12, temperature=0, presence_penalty=0.5, frequency_penalty=0.3,
        logit_bias={str(token): 3.0}, logprobs=2,
    )  # fmt: skip
    via_client = client.completions.create(model="tiny", extra_body={"repetition_penalty": 1.2}, **kw)
    plain = _complete(server, repetition_penalty=1.2, **kw)["choices"][0]
    assert via_client.choices[0].text == plain["text"]
    assert via_client.choices[0].logprobs.token_logprobs == plain["logprobs"]["token_logprobs"]
    scored = client.completions.create(model="tiny", prompt="The cat", max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == "The cat" and scored.usage.completion_tokens == 0
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        presence_penalty=1.0, frequency_penalty=0.5, logit_bias={str(token): 2.0}, logprobs=True,
    )  # fmt: skip
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
