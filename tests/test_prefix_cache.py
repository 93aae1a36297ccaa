"""Prefix caching: a prompt that starts as a recent one did reuses its chunks' latents, its output bitwise
what it is without the cache, alone or in a full batch; a chat is cut into chunks at its user turns and the
previous answer is prefilled once the turn ends, so the next turn computes only its new question; the
cache keeps to its memory bound, least recently used out first, and forgets everything when the weights
change; the server reports hits in each response's usage and in /metrics."""

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from _trained_tiny import PROMPTS, trained_tiny_checkpoint, trained_tiny_run
from serve_helpers import LiveServer, metric

from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.generate.batching import BatchEngine, Params
from deepseek_lm.generate.chunking import chunk_ends
from deepseek_lm.generate.prefix_cache import PrefixCache, chunk_keys
from deepseek_lm.generate.sampling import SamplingConfig
from deepseek_lm.model.transformer import DeepSeekLM
from deepseek_lm.train.finetune import chat_base

CHUNK = 8  # small chunks: the test's prompts span several
SYSTEM = "A class of the file object, and the method returns the string value of the module."
CHATS = [  # words the tiny tokenizer knows (tests/train_helpers.py)
    ["what does the module return?", "and the class?", "what is the error?", "the method?"],
    ["what is the class?", "what does it return?", "the value of the data?", "and then?"],
    ["what does the method do?", "the list?", "the number of the file?", "what is it?"],
    ["what is the error?", "the string value?", "what does the object do?", "the file?"],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The tiny model with the role tokens of the chat template added, as `finetune` starts from (not
    fine-tuned: the properties tested need no skill)."""
    config, tokenizer, template, state = chat_base(
        trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run"), 8
    )
    model = DeepSeekLM(config)
    model.load_state_dict(state)
    fmt = ChatFormat.for_tokenizer(tokenizer, template)
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, chat_template=template, fmt=fmt)


def _engines(model, tokenizer, **options):
    made = [
        BatchEngine(model, tokenizer, max_batch_size=4, prefill_chunk=CHUNK, **options, **cache)
        for cache in ({}, {"prefix_cache_bytes": 1 << 20})
    ]
    for engine in made:
        engine.eos_token_id = None
        engine.start()
    return made


@pytest.fixture
def engines(checkpoint):
    made = _engines(checkpoint.model, checkpoint.tokenizer)
    yield made
    for engine in made:
        engine.close()


@pytest.fixture
def chat_engines(chat):
    made = _engines(chat.model, chat.tokenizer, chunk_starts=chat.fmt.user_turn_ids(chat.tokenizer))
    yield made
    for engine in made:
        engine.close()


def _output(request) -> tuple:
    """A finished request's text, tokens and logits (bytes)."""
    events = list(request.events(timeout=60))
    logits = torch.stack([e.logits for e in events]).numpy().tobytes()
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], logits


def _turns(engine, params) -> list:
    """A 4-turn conversation in plain text (no role tokens: chunks at fixed offsets) sent as growing
    prompts (each turn's prompt: the last one, its answer and a new question): every output with its
    logits, and the tokens the cache gave it."""
    history, outputs = "", []
    for question in PROMPTS[:4]:
        history += f"User: {question}\nAssistant:"
        request = engine.submit(engine.encode(history), params)
        outputs.append((*_output(request), request.cached_tokens))
        history += outputs[-1][0] + "\n"
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
    assert stats["ahead_tokens"] == 0  # no chat turn (no end-of-turn token): nothing prefilled ahead
    assert plain.prefix_cache is None and all(o[3] == 0 for o in without)


def test_plain_prompts_with_a_shared_prefix_are_the_same_alone_and_in_a_full_batch(engines):
    plain, cached = engines
    shots = "".join(f"Q: {p}\nA: {p[::-1]}\n" for p in PROMPTS[4:])  # a few-shot prefix, as harnesses send
    prompts = [cached.encode(f"{shots}Q: {p}\nA:") for p in PROMPTS[:4]]
    params = Params(max_tokens=8, sampling=SamplingConfig(0), output_logits=True)
    alone = [_output(plain.submit(ids, params)) for ids in prompts]
    batch = cached.submit_all([(ids, params, None) for ids in prompts])  # 4 rows: the full batch
    assert [_output(r) for r in batch] == alone
    again = cached.submit_all([(ids, params, None) for ids in prompts])  # now from the cache
    assert [_output(r) for r in again] == alone
    assert all(r.cached_tokens >= len(cached.encode(shots)) - CHUNK for r in again)


def test_a_scored_prompt_neither_uses_nor_fills_the_cache(engines):
    """Prompt log-probabilities need every position's state: the prompt is prefilled whole, and its chunks,
    which a prefill asked for every state may compute on another path, are not kept."""
    cached = engines[1]
    ids = cached.encode(PROMPTS[3])  # several chunks
    for params in (Params(max_tokens=0, prompt_logprobs=1), Params(max_tokens=2)):
        request = cached.submit(ids, params)
        list(request.events(timeout=60))
        assert request.cached_tokens == 0
    assert cached.prefix_cache.stats()["queries"] == 1  # the plain prompt's look-up found nothing


def test_chunks_end_at_fixed_offsets_and_start_at_each_user_turn():
    U = 9  # the user-turn token
    assert chunk_ends(list(range(20)), 8) == [8, 16, 20]
    assert chunk_ends(list(range(16)), 8) == [8, 16]
    assert chunk_ends([1, 2, 3, U, 4, 5, U, 6], 8, {U}) == [3, 6, 8]
    assert chunk_ends([U, 1, 2, U, U, 3], 8, {U}) == [3, 4, 6]  # none empty; a start at 0 is no cut
    assert chunk_ends([*range(1, 12), U, *range(12, 30)], 8, {U}) == [8, 11, 19, 27, 30]  # long runs
    assert chunk_ends([1, 2, 3], 8, {U}) == [3]  # no user turn: one chunk, as without the rule


def _conversation(engine, chat, questions, params, think: bool) -> list[dict]:
    """One chat, turn by turn through the template, each turn re-sending the history as an API client does:
    per turn the output, the prompt's length, the tokens the cache gave it and those of its last user turn.
    `think`: wait, as a person reading the answer would, until the engine has prefilled the turn ahead."""
    messages, turns = [{"role": "system", "content": SYSTEM}], []
    user = chat.fmt.user_turn_ids(chat.tokenizer)[0]
    for question in questions:
        messages.append({"role": "user", "content": question})
        ids = engine.encode(chat.fmt.render(messages))
        request = engine.submit(ids, params)
        output = _output(request)
        last_turn = len(ids) - max(i for i, t in enumerate(ids) if t == user)
        turns.append(dict(output=output, ids=ids, cached=request.cached_tokens, last_turn=last_turn))
        messages.append({"role": "assistant", "content": output[0]})
        deadline = time.monotonic() + 30
        while think and engine.ahead and time.monotonic() < deadline:
            time.sleep(0.005)
    return turns


def _chat_params(chat, sampling) -> Params:
    return Params(
        max_tokens=12, sampling=sampling, seed=5, stop_token_ids=chat.fmt.stop_token_ids, output_logits=True
    )


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(0), SamplingConfig(1.0, None)], ids=["greedy", "sampled"]
)
def test_a_chat_turn_computes_only_its_new_question_and_its_output_is_bitwise_the_same(
    chat, chat_engines, sampling
):
    plain, cached = chat_engines
    params = _chat_params(chat, sampling)
    without = _conversation(plain, chat, CHATS[0], params, think=False)
    with_ = _conversation(cached, chat, CHATS[0], params, think=True)
    assert [t["output"] for t in with_] == [t["output"] for t in without]
    # from the second turn on the whole history comes from the cache, the previous answer prefilled once
    # that turn ended (as its text encodes, which sampling's splits of words need not): only the new user
    # turn is computed
    assert [t["cached"] for t in with_[1:]] == [len(t["ids"]) - t["last_turn"] for t in with_[1:]]
    assert cached.prefix_cache.stats()["ahead_tokens"] > 0 and plain.prefix_cache is None


def test_chats_in_a_full_batch_are_bitwise_what_they_are_alone(chat, chat_engines):
    """Four conversations at once, each next turn sent as soon as the last one ended (no time to prefill
    ahead: whatever the race, the numbers are the same), against each alone without the cache."""
    plain, cached = chat_engines
    params = _chat_params(chat, SamplingConfig(0))
    alone = [_conversation(plain, chat, questions, params, think=False) for questions in CHATS]
    together: list = [None] * len(CHATS)

    def run(i: int) -> None:
        together[i] = _conversation(cached, chat, CHATS[i], params, think=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CHATS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [[t["output"] for t in c] for c in together] == [[t["output"] for t in c] for c in alone]
    assert all(t["cached"] > 0 for c in together for t in c[1:])


def test_the_cache_keeps_to_its_bound_least_recently_used_out_first():
    layers = [torch.randn(64, 6) for _ in range(2)]  # one prompt's staged latents: 2 layers, 64 positions
    block_bytes = 2 * CHUNK * 6 * 4
    cache = PrefixCache(max_bytes=3 * block_bytes)
    a, b = list(range(40)), [7, *range(1, 40)]
    ends = chunk_ends(a, CHUNK)  # 8, 16, 24, 32, 40
    keys_a, keys_b = chunk_keys(a, ends), chunk_keys(b, ends)
    for i in range(4):
        cache.store(keys_a[i], ends[i] - CHUNK, ends[i], layers)
    assert cache.stats()["blocks"] == 3 and cache.bytes == 3 * block_bytes  # a's first chunk went
    target = [torch.zeros(64, 6) for _ in range(2)]
    assert cache.restore(keys_a, ends, target) == 0  # its chain starts at the evicted chunk
    cache.store(keys_a[0], 0, 8, layers)  # back in; a's chunk 2 (least recently used) goes
    assert cache.restore(keys_a, ends, target) == 8 and torch.equal(target[0][:8], layers[0][:8])
    assert cache.restore(keys_b, ends, target) == 0  # another first token: another chain
    # a chunk's key holds its boundaries: the same tokens cut elsewhere are another chunk
    assert cache.restore(chunk_keys(a, [4, 8]), [4, 8], target) == 0
    assert cache.restore(chunk_keys(a[:8], [8]), [8], target) == 8


def test_the_cache_forgets_everything_when_the_weights_change(checkpoint):
    engine = BatchEngine(
        checkpoint.model,
        checkpoint.tokenizer,
        max_batch_size=2,
        prefill_chunk=CHUNK,
        prefix_cache_bytes=1 << 20,
    ).start()
    try:
        ids, params = engine.encode(PROMPTS[3]), Params(max_tokens=2)
        cached = []
        for change in (False, False, True):
            if change:
                with torch.no_grad():
                    checkpoint.model.norm.weight.mul_(1.0)  # a write: the weights' stamp changes
            request = engine.submit(ids, params)
            list(request.events(timeout=60))
            cached.append(request.cached_tokens)
        assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0
    finally:
        engine.close()


def test_the_server_reports_cached_tokens_and_prefills_the_answer_ahead(chat):
    ckpt = SimpleNamespace(model=chat.model, tokenizer=chat.tokenizer, chat_template=chat.chat_template)
    starts = chat.fmt.user_turn_ids(chat.tokenizer)
    live = LiveServer(
        ckpt, max_batch_size=2, prefill_chunk=CHUNK, prefix_cache_bytes=1 << 20, chunk_starts=starts
    )
    try:
        client = live.client()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": CHATS[1][0]}]
        first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": CHATS[1][1]},
        ]
        deadline = time.monotonic() + 30
        while live.engine.ahead and time.monotonic() < deadline:
            time.sleep(0.005)
        second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        new_turn = len(chat.tokenizer.encode(chat.fmt.render(messages[-1:]), add_special_tokens=False).ids)
        assert cached == second.usage.prompt_tokens - new_turn
        page = httpx.get(f"{live.url}/metrics").text
        assert metric(page, "deepseek_lm_prefix_cache_hit_tokens_total") == cached
        assert metric(page, "deepseek_lm_prefix_cache_hits_total") == 1
        assert metric(page, "deepseek_lm_prefix_cache_ahead_tokens_total") > 0
        assert metric(page, "deepseek_lm_prefix_cache_bytes") > 0
    finally:
        live.stop()


def test_a_turn_that_ends_at_the_context_is_not_prefilled_ahead(chat, capfd):
    fmt = chat.fmt
    messages = [{"role": "user", "content": CHATS[2][0]}]
    ids = chat.tokenizer.encode(fmt.render(messages), add_special_tokens=False).ids
    engine = BatchEngine(
        chat.model, chat.tokenizer, max_batch_size=1, prefill_chunk=CHUNK, prefix_cache_bytes=1 << 20,
        context_length=len(ids) + 6, chunk_starts=fmt.user_turn_ids(chat.tokenizer),
    ).start()  # fmt: skip
    try:
        engine.eos_token_id = None
        request = engine.submit(ids, Params(max_tokens=6, stop_token_ids=fmt.stop_token_ids))
        assert [e.finish_reason for e in request.events(timeout=60)][-1] == "length"
        deadline = time.monotonic() + 30
        while engine.ahead and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        engine.close()
    assert engine.prefix_cache.stats()["ahead_tokens"] == 0 and "Traceback" not in capfd.readouterr().err
