"""Continuous batching with speculative rounds (generate/speculative_batching.py): a request's output is its own
whatever shares the batch, bitwise; greedy output is plain serving's and the engine's plain greedy; ends inside
a round and cancellation behave as in plain serving."""

import dataclasses
import time

import pytest
import torch
from _trained_tiny import PROMPTS, trained_tiny_checkpoint

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError
from deepseek_lm.generate import Engine, SamplingConfig
from deepseek_lm.generate.batching import BatchEngine, Params
from deepseek_lm.generate.speculative_batching import SpeculativeBatchEngine
from deepseek_lm.model import get_model
from deepseek_lm.model.decode import _KV_CHUNK
from deepseek_lm.model.draft import SpeculativeDecoder

GREEDY = SamplingConfig(temperature=0)
SAMPLED = SamplingConfig(temperature=1.0, top_k=None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture
def make_engine(checkpoint):
    engines = []

    def make(speculative=True, **kwargs):
        # small prefill chunks: the longer prompts are prefilled (and their MTP pairs) in several chunks
        kwargs = {"max_batch_size": 4, "prefill_chunk": 8, **kwargs}
        kind = SpeculativeBatchEngine if speculative else BatchEngine
        engines.append(kind(checkpoint.model, checkpoint.tokenizer, **kwargs).start())
        engines[-1].eos_token_id = None  # every request runs to max_tokens unless a test says otherwise
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def _run(engine, prompts, params):
    if isinstance(params, Params):
        params = [params] * len(prompts)
    ids = [engine.encode(p) if isinstance(p, str) else p for p in prompts]
    requests = [engine.submit(i, q) for i, q in zip(ids, params)]
    return [_collect(r) for r in requests]


def _collect(request):
    events = list(request.events(timeout=60))
    out = dict(
        tokens=[t for e in events for t in e.token_ids],
        text="".join(e.text for e in events),
        reason=request.finish_reason,
        rounds=[(e.drafted, e.accepted) for e in events if e.drafted],
    )
    if request.params.output_logits:  # each token's logits, bitwise
        out["logits"] = torch.stack([e.logits for e in events]).numpy().tobytes()
    assert (
        sum(d for d, _ in out["rounds"]) == request.drafted
        and sum(a for _, a in out["rounds"]) == request.accepted
    )
    return out


@pytest.mark.parametrize("shape", ["tiny", "seed"])
def test_batch_invariant_rounds_are_bitwise_each_rows_own(shape):
    """Every step of a round (verification, the module over the verified pairs, the chained drafts, the
    heads) gives a row bitwise the same numbers whatever rows share it (1 to 6, any order) and whatever
    length it attends to in slices of `_KV_CHUNK`. The seed's shapes at a small vocabulary are where MKL's
    products change with the rows beside a row (its 7-wide router, its (128, 128) eh_proj halves)."""
    base = DeepSeekConfig() if shape == "seed" else DeepSeekConfig.from_preset("tiny")
    config = dataclasses.replace(
        base, vocab_size=1024, max_position_embeddings=1024, num_nextn_predict_layers=1
    )
    torch.manual_seed(0)
    model = get_model(config).eval()
    rows, T, length = 6, 3, 2 * _KV_CHUNK
    decoder = SpeculativeDecoder(model, rows, T, batch_invariant=True)
    cache, draft_kv = model.new_cache(rows, length), decoder.new_draft_cache(length)
    for kv in (*cache.kv, draft_kv):
        kv.normal_()
    ids, h = torch.randint(0, 1024, (rows, T)), torch.randn(rows, T, config.hidden_size)
    pos = torch.randint(0, _KV_CHUNK - 2 * T, (rows, 1)) + torch.arange(T)

    def round_(which, attended):
        kvs, dkv = [kv[which].clone()[:, :attended] for kv in cache.kv], draft_kv[which].clone()[:, :attended]
        out = [
            decoder.verify(ids[which], pos[which], kvs),
            decoder.draft(ids[which], h[which], pos[which], dkv),
        ]
        kvs, dkv = [kv[which].clone()[:, :attended] for kv in cache.kv], draft_kv[which].clone()[:, :attended]
        return out + list(decoder.greedy_round(ids[which], pos[which], kvs, dkv))

    everyone = round_(torch.arange(rows), length)
    g = torch.Generator().manual_seed(0)
    for trial in range(8):
        which = torch.randperm(rows, generator=g)[: 1 + trial % rows]
        attended = _KV_CHUNK * (1 + trial % 2)
        for got, want in zip(round_(which, attended), everyone, strict=True):
            assert torch.equal(got, want[which]), (len(which), attended)
    assert not torch.equal(everyone[-1][0], everyone[-1][1])  # rows with their own inputs differ


def test_a_request_gets_the_same_output_alone_as_in_a_full_batch(make_engine, monkeypatch):
    """8 requests, greedy and seeded sampled in turn, through 4 slots: rows join mid-run (their prompts and
    MTP pairs prefilled in chunks between rounds), keep different numbers of drafts, leave mid-round and
    move to other slots. Tokens, text, every logit and every round's acceptance the same as alone."""
    engine = make_engine(draft_tokens=2)
    params = [
        Params(24, GREEDY, output_logits=True) if i % 2 == 0 else
        Params(20 + i, SAMPLED, seed=i, output_logits=True)
        for i in range(len(PROMPTS))
    ]  # fmt: skip
    paths, rows_seen = [], []
    for name in ("greedy_round", "verify"):
        method = getattr(engine.decoder, name)

        def spy(ids, *args, method=method, name=name):
            rows_seen.append(len(ids))
            paths.append(name)
            return method(ids, *args)

        monkeypatch.setattr(engine.decoder, name, spy)
    alone = [_run(engine, [p], q)[0] for p, q in zip(PROMPTS, params)]
    assert set(rows_seen) == {1} and set(paths) == {"greedy_round", "verify"}
    rows_seen.clear()
    together = _run(engine, PROMPTS, params)
    assert together == alone
    assert {2, 3, 4} <= set(rows_seen)
    assert len({r["text"] for r in alone}) == len(PROMPTS)
    kept = {a for r in alone for _, a in r["rounds"]}
    assert kept == {0, 1, 2}  # rows keep no, some and all drafts


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_greedy_output_is_plain_servings_and_the_engines(checkpoint, make_engine, draft_tokens):
    """Concurrent requests of different lengths, some with a stop string: the speculative engine's tokens,
    text and finish reasons are the plain batching engine's and `Engine`'s plain greedy."""
    plain, fast = make_engine(speculative=False), make_engine(draft_tokens=draft_tokens)
    reference = Engine(checkpoint.model, checkpoint.tokenizer)
    reference.eos_token_id = None
    prompts, lengths = PROMPTS[:6], [30, 12, 25, 5, 30, 17]
    expected = [
        reference.generate_ids([plain.encode(p)], n, sampling=GREEDY)[0] for p, n in zip(prompts, lengths)
    ]
    stop = expected[0].text[9:12]  # a stop string that ends the first request, maybe others
    params = [Params(n, GREEDY, stop=[stop] if i % 2 == 0 else []) for i, n in enumerate(lengths)]
    want = _run(plain, prompts, params)
    got = _run(fast, prompts, params)
    for w, g, e, p in zip(want, got, expected, params):
        assert (g["tokens"], g["text"], g["reason"]) == (w["tokens"], w["text"], w["reason"])
        if not p.stop:
            assert g["tokens"] == e.token_ids and g["text"] == e.text
    assert want[0]["reason"] == "stop" and want[0]["text"] == expected[0].text[: expected[0].text.index(stop)]
    assert sum(a for r in got for _, a in r["rounds"]) > 0  # the trained module drafts some right


def test_prompts_cut_at_turn_tokens_give_plain_servings_greedy(make_engine):
    """Prefill chunks that start before given tokens (a chat's user turns, generate/chunking.py) instead of
    at fixed offsets: the MTP pairs follow any cut, and greedy output is the plain engine's, cut the same."""
    probe = make_engine(speculative=False)
    ids = [probe.encode(p) for p in PROMPTS[:6]]
    starts = {ids[3][3], ids[1][5]}  # tokens inside the longer prompts
    plain = make_engine(speculative=False, chunk_starts=starts)
    fast = make_engine(draft_tokens=2, chunk_starts=starts)
    params = Params(20, GREEDY)
    want, got = _run(plain, ids, params), _run(fast, ids, params)
    assert [(g["tokens"], g["text"]) for g in got] == [(w["tokens"], w["text"]) for w in want]


def oracle_drafts(monkeypatch, truth: dict[tuple, list[int]], draft_tokens: int) -> None:
    """After the engine drafts, replace a greedy row's drafts by its plain greedy continuation: every
    round then keeps all D drafts, so that ends fall inside rounds."""

    def fix(request):
        if request._drafts is not None and request.finish_reason is None:
            tokens = truth[tuple(request.prompt_ids)]
            n = request.completion_tokens
            ahead = (tokens[n : n + draft_tokens] + [0] * draft_tokens)[:draft_tokens]
            request._drafts = torch.tensor(ahead)

    join, emit = SpeculativeBatchEngine._join, SpeculativeBatchEngine._emit
    monkeypatch.setattr(SpeculativeBatchEngine, "_join", lambda self, r: (join(self, r), fix(r))[0])
    monkeypatch.setattr(SpeculativeBatchEngine, "_emit", lambda self, r, *a: (emit(self, r, *a), fix(r))[0])


def test_ends_inside_a_round_and_at_the_end_of_the_context(make_engine, monkeypatch):
    """With every draft right a round gives D + 1 tokens: max_tokens, the end of text, a stop token and a
    stop string each end a row inside one, as in plain serving; and a prompt that leaves the context room
    for max_tokens alone verifies drafts past the context's end (the model's, 256 positions)."""
    D = 3
    plain, fast = make_engine(speculative=False), make_engine(draft_tokens=D)
    prompts = PROMPTS[:3]
    long = plain.encode("The quick brown fox jumps over the lazy dog. " * 40)[: 256 - 7]
    everything = [*[plain.encode(p) for p in prompts], long]
    free = _run(plain, everything, [Params(30, GREEDY)] * 3 + [Params(7, GREEDY)])
    truth = {tuple(p): r["tokens"] for p, r in zip(everything, free)}
    oracle_drafts(monkeypatch, truth, D)
    # token 0 comes from the prefill, rounds give tokens 1-4, 5-8, ...: an end at token j is inside a round
    # unless j % 4 == 0; pick tokens whose first occurrence is inside one
    inside = [
        (t, j)
        for j, t in enumerate(free[1]["tokens"])
        if j > 1 and j % (D + 1) and free[1]["tokens"].index(t) == j
    ]
    (eos, _), (stop_id, _) = inside[0], inside[-1]
    stop = free[2]["text"][10:13]
    cases = [
        (prompts[0], Params(10, GREEDY), None, "length"),  # 1 + 4 + 4 + 1
        (prompts[1], Params(30, GREEDY), eos, "eos"),
        (prompts[1], Params(30, GREEDY, stop_token_ids=[stop_id]), None, "eos"),
        (prompts[2], Params(30, GREEDY, stop=[stop]), None, "stop"),
    ]
    for prompt, params, eos_id, reason in cases:
        plain.eos_token_id = fast.eos_token_id = eos_id
        want, got = _run(plain, [prompt], params)[0], _run(fast, [prompt], params)[0]
        assert (got["tokens"], got["text"], got["reason"]) == (want["tokens"], want["text"], reason)
        assert all(kept == D for _, kept in got["rounds"])
    plain.eos_token_id = fast.eos_token_id = None
    got = _collect(fast.submit(long, Params(7, GREEDY)))
    assert got["tokens"] == free[3]["tokens"] and got["reason"] == "length"


def test_cancelled_request_leaves_at_the_round_boundary(make_engine, monkeypatch):
    engine = make_engine(max_batch_size=1, max_queue=1)
    round_ = engine._decode_step
    monkeypatch.setattr(engine, "_decode_step", lambda: time.sleep(0.01) or round_())  # a long request lasts
    long = engine.submit(engine.encode("The"), Params(200, GREEDY))
    events = long.events(timeout=60)
    next(events)
    waiting = engine.submit(engine.encode("A"), Params(3, GREEDY))
    long.cancel()
    assert _collect(waiting)["reason"] == "length"  # it got the only slot
    assert long.finish_reason == "cancelled" and long.completion_tokens < 200
    assert engine.stats() == dict(waiting=0, prefilling=0, running=0)


def test_unsupported_settings_are_one_line_errors(checkpoint):
    plain_model = get_model(DeepSeekConfig.from_preset("tiny"))
    with pytest.raises(UserError, match=r"num_nextn_predict_layers=0.*without --speculative"):
        SpeculativeBatchEngine(plain_model, None)
    with pytest.raises(UserError, match="--compile is not supported with --speculative"):
        SpeculativeBatchEngine(checkpoint.model, checkpoint.tokenizer, compile=True)
    with pytest.raises(UserError, match="draft_tokens must be at least 1"):
        SpeculativeBatchEngine(checkpoint.model, checkpoint.tokenizer, draft_tokens=0)
