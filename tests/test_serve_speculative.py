"""`deepseek-lm serve --speculative`: answers are the plain server's (greedy) and reproducible (seeded), and
each response, /metrics and the model card report the drafts' acceptance."""

import threading

import httpx
import pytest
from _trained_tiny import trained_tiny_checkpoint
from serve_helpers import LiveServer, metric

from deepseek_lm.checkpoint import save_model_dir
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError
from deepseek_lm.generate.speculative_batching import SpeculativeBatchEngine
from deepseek_lm.model import get_model


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    checkpoint = trained_tiny_checkpoint(tmp_path_factory)
    plain = LiveServer(checkpoint, max_batch_size=4)
    fast = LiveServer(checkpoint, engine_type=SpeculativeBatchEngine, draft_tokens=2, max_batch_size=4)
    yield plain, fast
    for live in (plain, fast):
        live.stop()


def _stream(server, body):
    """A streamed completion -> its text, finish reason and the usage of its last event."""
    body = {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}, **body}
    chunks = list(server.client().completions.create(**body))
    text = "".join(c.text for chunk in chunks for c in chunk.choices)
    reason = next(c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason)
    return text, reason, chunks[-1].usage.model_dump()


def test_concurrent_greedy_answers_are_the_plain_servers(servers):
    """8 greedy streams of different lengths at once through 4 slots of each server (rows join and leave
    mid-run, one with a stop string): every answer is the plain server's."""
    plain, fast = servers
    prompts = ["The", "A function that", "x = 1\n", "import", "Return the", "class", "def get(self):", "if"]
    free = plain.client().completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0)
    bodies = [dict(prompt=p, max_tokens=8 + 3 * i, temperature=0) for i, p in enumerate(prompts)]
    bodies[0].update(max_tokens=30, stop=[free.choices[0].text[9:12]])
    answers = {}

    def run(server, i):
        answers[server, i] = _stream(server, bodies[i])

    threads = [threading.Thread(target=run, args=(s, i)) for s in servers for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(len(bodies)):
        (text, reason, usage), (want, want_reason, plain_usage) = answers[fast, i], answers[plain, i]
        assert (text, reason) == (want, want_reason)
        assert "speculative" not in plain_usage
        s = usage["speculative"]
        assert 0 <= s["accepted_tokens"] <= s["drafted_tokens"] and s["drafted_tokens"] % 2 == 0
        assert s["acceptance_rate"] == round(s["accepted_tokens"] / s["drafted_tokens"], 4)
    assert answers[plain, 0][1] == "stop"
    assert sum(answers[fast, i][2]["speculative"]["accepted_tokens"] for i in range(len(bodies))) > 0


def test_acceptance_in_usage_metrics_and_the_model_card(servers):
    plain, fast = servers
    client = fast.client()
    assert client.models.list().data[0].model_extra["speculative"] == {"draft_tokens": 2}
    assert "speculative" not in plain.client().models.list().data[0].model_extra
    before = httpx.get(f"{fast.url}/metrics").text
    kw = dict(model="tiny", prompt="A function", max_tokens=20, temperature=0.9, seed=5)
    a, b = client.completions.create(n=2, **kw), client.completions.create(n=2, **kw)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What does a list hold?"}], max_tokens=16
    )
    page = httpx.get(f"{fast.url}/metrics").text
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed reproduces every choice
    drafted = accepted = 0
    for out in (a, b, chat):
        s = out.usage.model_extra["speculative"]
        drafted, accepted = drafted + s["drafted_tokens"], accepted + s["accepted_tokens"]
    assert drafted > 0
    for name, total in (
        ("deepseek_lm_draft_tokens_total", drafted),
        ("deepseek_lm_accepted_draft_tokens_total", accepted),
    ):
        assert metric(page, name) - metric(before, name) == total


def test_speculative_without_mtp_modules_or_with_compile_is_a_one_line_error(tmp_path):
    from deepseek_lm.serve.cli import main

    checkpoint = save_model_dir(tmp_path / "plain", get_model(DeepSeekConfig.from_preset("tiny")))
    for args, words in [
        (
            ["--checkpoint", str(checkpoint), "--speculative"],
            "has no MTP modules (num_nextn_predict_layers=0)",
        ),
        (["--checkpoint", str(checkpoint), "--speculative", "--compile"], "leave out --compile"),
        (["--checkpoint", str(checkpoint), "--speculative", "--draft-tokens", "0"], "--draft-tokens must be"),
    ]:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
            main([*args, "--port", "0"])
        assert "\n" not in str(info.value)
