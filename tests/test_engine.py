import pytest
import torch
from _trained_tiny import trained_tiny_run
from tokenizers import pre_tokenizers

from deepseek_lm.data import train_bpe
from deepseek_lm.errors import UserError
from deepseek_lm.generate import Engine, PromptTruncatedWarning, SamplingConfig
from deepseek_lm.generate.streaming import TextStream
from deepseek_lm.model import get_model
from deepseek_lm.model.decode import Decoder

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Héllo wörld — naïve café, 日本語のテキスト, emoji 🙂 too.\n"
    "Once upon a time there was a model that decoded its own latent cache. THE END.\n"
] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 400)


def _stream_all(tok, ids, stop=(), prompt_ids=()):
    s = TextStream(tok, stop, prompt_ids)
    pieces = [s.push(i) for i in ids]
    pieces.append(s.finish())
    return s, pieces


def test_stream_pieces_join_to_the_decoded_text_multibyte_included(bpe):
    text = "Héllo wörld — 日本語 🙂 café"
    ids = bpe.encode(text).ids
    s, pieces = _stream_all(bpe, ids)
    assert "".join(pieces) == text == s.text == bpe.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_split_character_is_held_until_complete(bpe):
    # the 4 bytes of an emoji as 4 single-byte tokens: nothing is shown until the last one arrives
    ((mapped, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str("🙂")
    byte_ids = [bpe.token_to_id(ch) for ch in mapped]
    assert len(byte_ids) == 4 and None not in byte_ids
    s = TextStream(bpe)
    assert [s.push(i) for i in byte_ids] == ["", "", "", "🙂"]


def test_stop_string_is_cut_and_never_shown(bpe):
    text = "Once upon a time there was a model. THE END. more text"
    ids = bpe.encode(text).ids
    s, pieces = _stream_all(bpe, ids, stop=["THE END"])
    assert s.stopped
    assert s.text == "Once upon a time there was a model. "
    assert "".join(pieces) == s.text
    assert not any("THE" in p for p in pieces)


def test_stop_string_spanning_tokens_and_held_back_prefix(bpe):
    text = "a model that decoded"
    ids = bpe.encode(text).ids
    s = TextStream(bpe, stop=["that dec"])
    shown = ""
    for i in ids:
        shown += s.push(i)
        assert "that" not in shown  # a possible start of the stop string is held back
    assert s.stopped and s.text == "a model " and shown + s.finish() == "a model "


def test_held_back_text_is_released_when_it_is_not_a_stop(bpe):
    ids = bpe.encode("the lazy dog").ids
    s, pieces = _stream_all(bpe, ids, stop=["the lazy cat"])
    assert not s.stopped and "".join(pieces) == "the lazy dog"
    # a text that ends while it still looks like the start of a stop string comes out at finish()
    s, pieces = _stream_all(bpe, bpe.encode("the lazy").ids, stop=["the lazy cat"])
    assert pieces[-1] == "the lazy" and not any(pieces[:-1])


def test_special_tokens_are_not_shown_and_prompt_context_is_used(bpe):
    eot = bpe.token_to_id("<|endoftext|>")
    prompt = bpe.encode("Once upon").ids
    cont = bpe.encode("Once upon a time").ids[len(prompt) :]
    s, pieces = _stream_all(bpe, [*cont, eot], prompt_ids=prompt)
    assert "".join(pieces) == s.text
    assert s.text == bpe.decode(prompt + cont)[len(bpe.decode(prompt)) :]
    assert "<|endoftext|>" not in s.text


# ---------------------------------------------------------------------------------------------------------
# the engine, on a trained tiny checkpoint


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return Engine.from_checkpoint(trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run"))


@pytest.fixture
def engine(trained):
    trained.eos_token_id = trained.model.config.eos_token_id  # tests below may switch EOS off
    return trained


GREEDY = SamplingConfig(temperature=0.0)


@torch.no_grad()
def _uncached_greedy(model, prompt, n):
    """Re-run the full forward (naive attention, no cache) on the growing sequence."""
    seq, logits = list(prompt), []
    for _ in range(n):
        last = model(torch.tensor([seq])).logits[0, -1]
        logits.append(last)
        seq.append(int(last.argmax()))
    return seq[len(prompt) :], torch.stack(logits)


def test_cached_greedy_equals_uncached_forward(engine):
    engine.eos_token_id = None  # 64 tokens whatever the model says
    prompt = engine.encode("The import statement")
    out = engine.generate_ids([prompt], 64, sampling=GREEDY, output_logits=True)[0]
    ref_tokens, ref_logits = _uncached_greedy(engine.model, prompt, 64)
    assert out.token_ids == ref_tokens and len(out.token_ids) == 64
    assert out.logits.shape == ref_logits.shape
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=0)
    assert (ref_logits[1:] - ref_logits[:-1]).abs().max() > 1e-2  # the growing context changes the logits


@torch.no_grad()
def test_cached_sampled_decode_logits_equal_uncached_forward(engine):
    # a sampled continuation visits more varied contexts than a greedy loop does
    engine.eos_token_id = None
    prompt = engine.encode("The import statement")
    out = engine.generate_ids(
        [prompt], 48, sampling=SamplingConfig(temperature=1.0, top_k=None), seed=0, output_logits=True
    )[0]
    assert len(set(out.token_ids)) > 10
    full = engine.model(torch.tensor([prompt + out.token_ids])).logits[0]  # (T, V)
    ref = full[len(prompt) - 1 : len(prompt) - 1 + 48]
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)


def test_batched_prompts_of_different_lengths_equal_solo_generation(engine):
    prompts = [engine.encode(t) for t in ["The", "A function that returns the value of", "x = 1\n"]]
    assert len({len(p) for p in prompts}) == 3
    engine.eos_token_id = None
    batched = engine.generate_ids(prompts, 24, sampling=GREEDY, output_logits=True)
    for prompt, got in zip(prompts, batched):
        solo = engine.generate_ids([prompt], 24, sampling=GREEDY, output_logits=True)[0]
        assert got.token_ids == solo.token_ids
        torch.testing.assert_close(got.logits, solo.logits, atol=1e-5, rtol=0)


def test_batch_rows_stop_independently_at_eos(engine):
    prompts = [engine.encode("The"), engine.encode("A function that")]
    engine.eos_token_id = None
    free = engine.generate_ids(prompts, 12, sampling=GREEDY)
    engine.eos_token_id = free[0].token_ids[4]  # row 0 "ends" at its 5th token (or earlier)
    first = free[0].token_ids.index(engine.eos_token_id)
    out = engine.generate_ids(prompts, 12, sampling=GREEDY)
    assert out[0].finish_reason == "eos" and out[0].token_ids == free[0].token_ids[:first]
    cut = free[1].token_ids
    expected = cut[: cut.index(engine.eos_token_id)] if engine.eos_token_id in cut else cut
    assert out[1].token_ids == expected


def test_same_seed_same_sample_different_seed_different_sample(engine):
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=None)
    a = engine.generate("The", seed=1, **kw)
    b = engine.generate("The", seed=1, **kw)
    c = engine.generate("The", seed=2, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_cache_holds_latent_and_rope_key_only(engine):
    cfg = engine.model.config
    made = []
    original = engine.model.new_cache

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    engine.model.new_cache = spy
    try:
        engine.generate(["The", "A function"], max_new_tokens=5, temperature=0)
    finally:
        del engine.model.new_cache
    (cache,) = made
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert len(cache.kv) == cfg.num_hidden_layers
    for kv, c_kv, k_pe in zip(cache.kv, cache.c_kv, cache.k_pe):
        assert kv.shape[0] == 2 and kv.shape[-1] == per_token
        assert c_kv.shape == (*kv.shape[:2], cfg.kv_lora_rank)
        assert k_pe.shape == (*kv.shape[:2], cfg.qk_rope_head_dim)
    # nothing else is stored: the distinct storages hold exactly B × S × L × (r + dr) numbers
    tensors = [t for v in vars(cache).values() for t in (v if isinstance(v, list) else [v])]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    batch, slots = cache.kv[0].shape[:2]
    assert sum(storages.values()) == batch * slots * cfg.num_hidden_layers * per_token * 4
    assert cache.bytes_per_token() == cfg.num_hidden_layers * per_token * 4


def test_stream_callback_receives_text_before_generation_ends(engine, monkeypatch):
    from deepseek_lm.model import decode

    engine.eos_token_id = None
    steps = []
    step = decode.decode_step  # every decode step after the prefill runs through it

    def counted(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_step", counted)
    seen_at = []
    out = engine.generate(
        "The", max_new_tokens=30, temperature=0, stream=lambda i, piece: seen_at.append((len(steps), piece))
    )
    assert len(steps) == 29  # the first token comes from the prefill
    assert seen_at and seen_at[0][0] < len(steps) // 2  # first text after a few of the steps
    assert "".join(p for _, p in seen_at) == out.text


def test_stream_iterator_matches_generate(engine):
    pieces = list(engine.stream("The", max_new_tokens=20, temperature=1.0, seed=3))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate("The", max_new_tokens=20, temperature=1.0, seed=3).text


def test_text_is_the_decoded_tokens(engine):
    out = engine.generate("The", max_new_tokens=20, temperature=0)
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.finish_reason in ("length", "eos")


def test_stop_string_cuts_text_and_tokens(engine):
    engine.eos_token_id = None
    free = engine.generate("The", max_new_tokens=40, temperature=0)
    stop = free.text[10:13]
    assert stop and stop in free.text
    out = engine.generate("The", max_new_tokens=40, temperature=0, stop=[stop, "never appears ¤"])
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    n = len(out.token_ids)
    assert out.token_ids == free.token_ids[:n]
    assert (
        stop in engine.tokenizer.decode(free.token_ids[:n])
        and stop not in engine.tokenizer.decode(free.token_ids[: n - 1])[len(out.text) :]
    )


def test_long_prompt_is_left_truncated_with_a_warning(engine):
    ctx = engine.context_length
    prompt = (engine.encode("The quick brown fox. ") * ctx)[: ctx + 40]
    engine.eos_token_id = None
    with pytest.warns(PromptTruncatedWarning, match=r"keeping its last 246"):
        out = engine.generate_ids([prompt], 10, sampling=GREEDY)[0]
    assert out.prompt_tokens == ctx - 10 == 246
    assert out.token_ids == engine.generate_ids([prompt[-246:]], 10, sampling=GREEDY)[0].token_ids


def test_generation_stops_at_the_end_of_the_context(engine):
    ctx = engine.context_length
    prompt = (engine.encode("The quick brown fox. ") * ctx)[:120]
    engine.eos_token_id = None
    out = engine.generate_ids([prompt], 200, sampling=GREEDY)[0]  # 120 + 200 > 256, but 120 <= 256 / 2
    assert out.finish_reason == "context" and len(out.token_ids) == ctx - 120
    assert out.prompt_tokens == 120


def test_empty_prompt_starts_a_document_and_bad_settings_are_user_errors(engine):
    assert engine.encode("") == [engine.eos_token_id]
    assert engine.generate("", max_new_tokens=3, temperature=0).finish_reason in ("length", "eos")
    with pytest.raises(UserError, match="temperature"):
        engine.generate("The", temperature=-1)
    with pytest.raises(UserError, match="top_p"):
        engine.generate("The", top_p=0)
    assert engine.generate("The", max_new_tokens=0).token_ids == []


def test_repetition_penalty_breaks_greedy_loops(engine):
    engine.eos_token_id = None
    plain = engine.generate("The", max_new_tokens=40, temperature=0)
    penalised = engine.generate("The", max_new_tokens=40, temperature=0, repetition_penalty=3.0)
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))
    # the prompt counts as seen: its tokens are penalised from the first step
    prompt = engine.encode("The")
    first = engine.generate_ids([prompt], 1, sampling=SamplingConfig(temperature=0, repetition_penalty=1e6))
    assert first[0].token_ids[0] not in prompt


def test_engine_keeps_its_decoder_until_the_weights_change(tiny_config):
    """The decode steps' rearranged weights are kept between calls and rebuilt after any in-place change of
    the weights (an optimizer step, load_state_dict): the output always follows the weights."""
    torch.manual_seed(0)
    model = get_model(tiny_config)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    engine, prompt = Engine(model), [[5, 6, 7, 8]]

    def logits() -> torch.Tensor:
        return engine.generate_ids(prompt, 6, sampling=GREEDY, output_logits=True)[0].logits

    before = logits()
    decoder = engine.fast_path(Decoder, 1, compile=False)
    assert engine.fast_path(Decoder, 1, compile=False) is decoder  # kept between calls
    model.train()
    model(torch.randint(0, 512, (2, 16)), targets=torch.randint(0, 512, (2, 16))).loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    model.eval()
    trained = logits()
    assert engine.fast_path(Decoder, 1, compile=False) is not decoder
    assert (trained - before).abs().max() > 1e-3
    fresh = Engine(model).generate_ids(prompt, 6, sampling=GREEDY, output_logits=True)[0].logits
    torch.testing.assert_close(trained, fresh, atol=0, rtol=0)
    model.load_state_dict(saved)
    torch.testing.assert_close(logits(), before, atol=0, rtol=0)
