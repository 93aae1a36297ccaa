"""The continuous-batching engine: a request's output is its own whatever shares the batch, slots are freed
by finishing or cancelling, the queue is bounded, closing ends every request."""

import threading
import time

import pytest
import torch
from _trained_tiny import PROMPTS, trained_tiny_checkpoint

from deepseek_lm.errors import UserError
from deepseek_lm.generate import Engine, SamplingConfig
from deepseek_lm.generate.batching import BatchEngine, Params, QueueFullError, Request

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture
def make_engine(checkpoint):
    engines = []

    def make(**kwargs):
        # small prefill chunks: the longer prompts are prefilled in several chunks, between decode steps
        kwargs = {"max_batch_size": 4, "prefill_chunk": 8, **kwargs}
        engines.append(BatchEngine(checkpoint.model, checkpoint.tokenizer, **kwargs).start())
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def _run(engine, prompts, params):
    requests = [engine.submit(engine.encode(p), params) for p in prompts]
    return [_collect(r) for r in requests]


def _collect(request):
    events = list(request.events(timeout=60))
    tokens, text = [t for e in events for t in e.token_ids], "".join(e.text for e in events)
    if request.params.output_logits:  # each token's logits, bitwise
        return tokens, text, request.finish_reason, torch.stack([e.logits for e in events]).numpy().tobytes()
    return tokens, text, request.finish_reason


@pytest.mark.parametrize(
    "params",
    [
        Params(max_tokens=24, sampling=GREEDY, output_logits=True),
        Params(max_tokens=24, sampling=SamplingConfig(1.0, None), seed=7, output_logits=True),
    ],
    ids=["greedy", "sampled with a seed"],
)
def test_a_request_gets_the_same_output_alone_as_in_a_full_batch(make_engine, params, monkeypatch):
    """8 requests through 4 slots: rows join while others decode (chunked prefills in between), leave when
    done, move to other slots, and steps run at 1 to 4 rows. Tokens, text and every logit the same."""
    engine = make_engine()
    engine.eos_token_id = None  # every request runs its 24 tokens
    rows_seen = []
    step = engine.decoder.step
    monkeypatch.setattr(engine.decoder, "step", lambda ids, *a: rows_seen.append(len(ids)) or step(ids, *a))
    alone = [_run(engine, [p], params)[0] for p in PROMPTS]
    assert set(rows_seen) == {1}
    rows_seen.clear()
    together = _run(engine, PROMPTS, params)
    assert together == alone
    assert {2, 3, 4} <= set(rows_seen)  # and 1 at the end
    assert len({text for _, text, _, _ in alone}) == len(PROMPTS)


def test_greedy_tokens_are_the_engines(checkpoint, make_engine):
    """The batched decoder computes the model: greedy tokens equal `Engine.generate`'s (the decode tests hold
    both to the model's logits within 1e-5)."""
    engine = make_engine()
    reference = Engine(checkpoint.model, checkpoint.tokenizer)
    reference.eos_token_id = engine.eos_token_id = None
    prompts = PROMPTS[:4]
    expected = reference.generate_ids([engine.encode(p) for p in prompts], 32, sampling=GREEDY)
    for (tokens, text, reason), want in zip(_run(engine, prompts, Params(32, GREEDY)), expected):
        assert tokens == want.token_ids and text == want.text and reason == "length"


def test_finish_reasons_stop_string_eos_and_context(make_engine):
    engine = make_engine(context_length=64)
    eos = engine.eos_token_id
    engine.eos_token_id = None
    tokens, text, _ = _run(engine, ["The"], Params(40, GREEDY))[0]
    stop = text[8:11]
    cut, cut_text, reason = _run(engine, ["The"], Params(40, GREEDY, stop=[stop]))[0]
    assert reason == "stop" and cut_text == text[: text.index(stop)] and cut == tokens[: len(cut)]
    engine.eos_token_id = tokens[5]
    first = tokens.index(tokens[5])
    ended, _, reason = _run(engine, ["The"], Params(40, GREEDY))[0]
    assert reason == "eos" and ended == tokens[: first + 1]
    engine.eos_token_id = eos
    prompt = engine.encode("The quick brown fox jumps over the lazy dog. " * 20)[:60]
    request = engine.submit(prompt, Params(4, GREEDY))
    assert _collect(request)[2] in ("length", "eos")
    with pytest.raises(
        UserError, match=r"60 tokens and max_tokens is 5: together 65, more than the 64-token"
    ):
        engine.submit(prompt, Params(5, GREEDY))


def _slowed(engine, monkeypatch):
    """Steps of >= 10 ms: a 200-token request is still running while the test acts on it."""
    step = engine.decoder.step
    monkeypatch.setattr(engine.decoder, "step", lambda *a: time.sleep(0.01) or step(*a))
    engine.eos_token_id = None
    return engine


def test_cancelled_request_frees_its_slot(make_engine, monkeypatch):
    engine = _slowed(make_engine(max_batch_size=1, max_queue=1), monkeypatch)
    long = engine.submit(engine.encode("The"), Params(200, GREEDY))
    events = long.events(timeout=60)
    next(events)  # decoding now
    waiting = engine.submit(engine.encode("A"), Params(3, GREEDY))
    with pytest.raises(QueueFullError):
        engine.submit(engine.encode("x"), Params(3, GREEDY))
    long.cancel()
    assert _collect(waiting)[2] == "length"  # it got the only slot
    assert long.finish_reason == "cancelled" and long.completion_tokens < 200
    assert engine.stats() == dict(waiting=0, prefilling=0, running=0)


def test_close_ends_every_request_with_an_error(make_engine, monkeypatch):
    engine = _slowed(make_engine(max_batch_size=1), monkeypatch)
    running = engine.submit(engine.encode("The"), Params(200, GREEDY))
    queued = engine.submit(engine.encode("A"), Params(200, GREEDY))
    next(running.events(timeout=60))
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(30)
    for request in (running, queued):
        last = list(request.events(timeout=10))[-1]
        assert last.finish_reason == "error" and "shutting down" in last.error
    with pytest.raises(QueueFullError, match="stopping"):
        engine.submit(engine.encode("A"), Params(2, GREEDY))


def test_the_decoder_is_built_once(checkpoint, monkeypatch):
    from deepseek_lm.generate import batching

    built = []
    decoder = batching.Decoder
    monkeypatch.setattr(batching, "Decoder", lambda *a, **k: built.append(1) or decoder(*a, **k))
    engine = BatchEngine(checkpoint.model, checkpoint.tokenizer, max_batch_size=2).start()
    try:
        _run(engine, PROMPTS[:3], Params(4, GREEDY))
        assert built == [1]
    finally:
        engine.close()


@pytest.mark.slow
def test_compiled_engine_gives_the_eager_engines_greedy_tokens(checkpoint):
    """--compile: one graph per power-of-2 batch size over the whole context, compiled at start (~10 s
    each for the tiny model); it picks kernels per shape, so it matches the eager engine to rounding."""
    engines = [
        BatchEngine(checkpoint.model, checkpoint.tokenizer, max_batch_size=2, compile=c).start()
        for c in (False, True)
    ]
    try:
        for engine in engines:
            engine.eos_token_id = None
        eager, compiled = (_run(e, PROMPTS[:3], Params(16, GREEDY)) for e in engines)
        assert compiled == eager
    finally:
        for engine in engines:
            engine.close()


# failures: one request's fault fails that request alone, and every request is answered ---------------------


def _answers(engine, prompts, params):
    """Submit every prompt, then collect: each request's last event is its answer."""
    return [_collect(r) for r in [engine.submit(engine.encode(p), params) for p in prompts]]


def test_a_seed_the_generator_refuses_fails_that_request_alone(make_engine):
    """The engine used to fail its whole batch on a seed beyond 64 bits, and never answer the request
    itself (caught between its lists). The server refuses such seeds first; the engine answers anyway."""
    engine = make_engine()
    engine.eos_token_id = None
    params = Params(max_tokens=12, sampling=GREEDY)
    alone = _answers(engine, PROMPTS[:3], params)
    others = [engine.submit(engine.encode(p), params) for p in PROMPTS[:3]]
    bad = engine.submit(engine.encode("The"), Params(max_tokens=12, seed=2**70))
    assert [_collect(r) for r in others] == alone
    last = list(bad.events(timeout=60))[-1]
    assert last.finish_reason == "error" and "internal error" in last.error and "Overflow" in last.error
    assert engine.stats() == dict(waiting=0, prefilling=0, running=0)
    assert _answers(engine, PROMPTS[:1], params) == alone[:1]


@pytest.mark.parametrize("where", ["_prefill_chunk", "_sample_row", "_advance"])
def test_a_fault_in_one_requests_work_fails_it_alone(make_engine, monkeypatch, where):
    """A fault injected into the prefill, the sampling or the text of one request (seed 666): that request
    ends with an error event, the requests decoding beside it give their solo output, bitwise."""
    engine = make_engine()
    engine.eos_token_id = None
    params = Params(max_tokens=16, sampling=SamplingConfig(1.0, None), seed=5, output_logits=True)
    alone = _answers(engine, PROMPTS[:3], params)
    real = getattr(engine, where)

    def faulty(*args, **kwargs):
        request = next(a for a in args if isinstance(a, Request))
        if request.params.seed == 666 and (where == "_prefill_chunk" or request.completion_tokens >= 3):
            raise ValueError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, where, faulty)
    doomed = engine.submit(engine.encode(PROMPTS[3]), Params(max_tokens=16, seed=666))
    assert _answers(engine, PROMPTS[:3], params) == alone
    last = list(doomed.events(timeout=60))[-1]
    assert last.finish_reason == "error" and last.error == "internal error: ValueError: injected"
    assert engine.stats() == dict(waiting=0, prefilling=0, running=0)


def test_a_fault_in_the_shared_step_fails_its_rows_and_the_queue_goes_on(make_engine, monkeypatch):
    """The decode step all running rows share raises once: those rows end with an error event; the
    requests still waiting for a slot then run, with their solo output."""
    engine = make_engine(max_batch_size=2)
    engine.eos_token_id = None
    params = Params(max_tokens=12, sampling=GREEDY)
    alone = _answers(engine, PROMPTS[2:4], params)
    step, failed = engine.decoder.step, []

    def once(ids, *args):
        if len(ids) == 2 and not failed:  # the first step both running requests share
            failed.append(1)
            raise RuntimeError("injected")
        return step(ids, *args)

    monkeypatch.setattr(engine.decoder, "step", once)
    running = [engine.submit(engine.encode(p), params) for p in PROMPTS[:2]]
    queued = [engine.submit(engine.encode(p), params) for p in PROMPTS[2:4]]
    for request in running:
        assert list(request.events(timeout=60))[-1].error == "internal error: RuntimeError: injected"
    assert [_collect(r) for r in queued] == alone


def test_a_sink_that_raises_cancels_its_request_only(make_engine):
    engine = make_engine()
    engine.eos_token_id = None
    params = Params(max_tokens=40, sampling=GREEDY)
    alone = _answers(engine, PROMPTS[:2], params)

    def broken(event):
        raise OSError("the reader is gone")

    gone = engine.submit(engine.encode("The"), params, sink=broken)
    assert _answers(engine, PROMPTS[:2], params) == alone
    assert gone.finish_reason == "cancelled" and gone.completion_tokens < 40
    assert engine.stats() == dict(waiting=0, prefilling=0, running=0)


def test_more_requests_than_the_engine_ever_holds_is_a_user_error(make_engine):
    engine = make_engine(max_batch_size=2, max_queue=3)
    items = [(engine.encode("x"), Params(2, GREEDY), None)] * 6
    with pytest.raises(UserError, match=r"6 generations at once are more than this server ever holds: 5"):
        engine.submit_all(items)
    assert len(engine.submit_all(items[:5])) == 5  # all of them fit at once


def test_a_prompt_sent_again_is_prefilled_once_and_each_output_is_what_it_is_alone(make_engine):
    """A request's `n` choices, RL's group of completions: the prompt just prefilled, sent again, starts
    from the staging cache (no chunk computed); every completion's tokens and logits are bitwise what the
    same request gives alone. Another prompt in between is prefilled as usual."""
    engine = make_engine()
    engine.eos_token_id = None
    sampled = SamplingConfig(1.0, None)
    same, other = PROMPTS[1], PROMPTS[2]  # PROMPTS[1] takes several chunks of 8
    order = [same, same, same, other, same, same]
    params = [Params(max_tokens=12, sampling=sampled, seed=100 + i, output_logits=True) for i in range(6)]
    alone = [_collect(engine.submit(engine.encode(p), q)) for p, q in zip(order, params)]
    chunks = []
    prefill_chunk = engine._prefill_chunk
    engine._prefill_chunk = lambda request, *a, **k: chunks.append(request) or prefill_chunk(request, *a, **k)
    engine.repeated_prompts = 0
    requests = engine.submit_all([(engine.encode(p), q, None) for p, q in zip(order, params)])
    together = [_collect(r) for r in requests]
    assert together == alone
    # the first too: the last request alone had the same prompt, still staged
    assert engine.repeated_prompts == 4
    assert {id(r) for r in chunks} == {id(requests[i]) for i in (3, 4)}
    assert len({text for _, text, _, _ in together}) > 1  # different seeds, different completions
