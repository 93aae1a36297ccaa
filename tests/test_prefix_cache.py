"""Prefix caching: a prompt that starts as a recent one did reuses its chunks' latents, its output bitwise
what it is without the cache; the cache keeps to its memory bound, least recently used out first; the
server reports hits in each response's usage and in /metrics."""

import httpx
import pytest
import torch
from _trained_tiny import PROMPTS, trained_tiny_checkpoint
from serve_helpers import LiveServer, metric

from deepseek_lm.generate.batching import BatchEngine, Params
from deepseek_lm.generate.prefix_cache import PrefixCache
from deepseek_lm.generate.sampling import SamplingConfig

CHUNK = 8  # small chunks: the test's prompts span several


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture
def engines(checkpoint):
    made = [
        BatchEngine(checkpoint.model, checkpoint.tokenizer, max_batch_size=4, prefill_chunk=CHUNK, **options)
        for options in ({}, {"prefix_cache_bytes": 1 << 20})
    ]
    for engine in made:
        engine.eos_token_id = None
        engine.start()
    yield made
    for engine in made:
        engine.close()


def _turns(engine, params) -> list:
    """A 4-turn conversation sent as growing prompts (each turn's prompt: the last one, its answer and a new
    question), then the same turns again in a batch: every output with its logits."""
    history, outputs = "", []
    for question in PROMPTS[:4]:
        history += f"User: {question}\nAssistant:"
        request = engine.submit(engine.encode(history), params)
        events = list(request.events(timeout=60))
        answer = "".join(e.text for e in events)
        logits = torch.stack([e.logits for e in events]).numpy().tobytes()
        outputs.append((answer, [t for e in events for t in e.token_ids], logits, request.cached_tokens))
        history += answer + "\n"
    return outputs


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(0), SamplingConfig(1.0, None)], ids=["greedy", "sampled"]
)
def test_outputs_are_bitwise_the_same_with_the_prefix_cache(engines, sampling):
    plain, cached = engines
    params = Params(max_tokens=10, sampling=sampling, seed=3, output_logits=True)
    without, with_ = _turns(plain, params), _turns(cached, params)
    assert [o[:3] for o in with_] == [o[:3] for o in without]
    reused = [o[3] for o in with_]
    assert reused[0] == 0 and all(n > 0 and n % CHUNK == 0 for n in reused[1:])
    stats = cached.prefix_cache.stats()
    assert stats["hits"] == 3 and stats["hit_tokens"] == sum(reused)
    assert plain.prefix_cache is None and all(o[3] == 0 for o in without)


def test_the_cache_keeps_to_its_bound_least_recently_used_out_first():
    layers = [torch.randn(64, 6) for _ in range(2)]  # one prompt's staged latents: 2 layers, 64 positions
    block_bytes = 2 * CHUNK * 6 * 4
    cache = PrefixCache(CHUNK, max_bytes=3 * block_bytes)
    a, b = list(range(40)), [7, *range(1, 40)]
    for end in (8, 16, 24, 32):
        cache.store(a, end, layers)
    assert cache.stats()["blocks"] == 3 and cache.bytes == 3 * block_bytes  # a's first chunk went
    target = [torch.zeros(64, 6) for _ in range(2)]
    assert cache.restore(a, target) == 0  # its chain starts at the evicted chunk
    cache.store(a, 8, layers)  # back in; a's chunk 2 (least recently used) goes
    assert cache.restore(a, target) == 8 and torch.equal(target[0][:8], layers[0][:8])
    assert cache.restore(b, target) == 0  # another first token: another chain
    assert cache.restore(a[:9], target) == 8 and cache.restore(a[:8], target) == 0  # the last chunk computes


def test_the_server_reports_cached_tokens(checkpoint):
    live = LiveServer(checkpoint, max_batch_size=2, prefill_chunk=CHUNK, prefix_cache_bytes=1 << 20)
    try:
        client = live.client()
        messages = [{"role": "user", "content": PROMPTS[3]}]
        first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And then?"},
        ]
        second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= CHUNK and cached % CHUNK == 0
        page = httpx.get(f"{live.url}/metrics").text
        assert metric(page, "deepseek_lm_prefix_cache_hit_tokens_total") == cached
        assert metric(page, "deepseek_lm_prefix_cache_hits_total") == 1
        assert metric(page, "deepseek_lm_prefix_cache_bytes") > 0
    finally:
        live.stop()
