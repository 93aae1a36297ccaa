"""The decode step compiled ahead of time (model/aot.py) against the model's own cached forward, and the
engine on it against the eager engine. Compiling costs ~1 min per library on 2 cores: every test here uses
the tiny config, whose two libraries (batch 1, gathered experts; batches of 2 and more, every expert) are
built once per machine into the disk cache and shared through the session's fixtures."""

import subprocess
import sys
import warnings

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.generate import Engine, SamplingConfig
from deepseek_lm.model import aot, get_model
from deepseek_lm.model.aot import AOTDecoder, CompileNotice
from deepseek_lm.model.decode import Decoder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not aot.available(), reason="no C++ compiler for inductor"),
]
ATOL = 1e-5
GREEDY = SamplingConfig(temperature=0)


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = get_model(DeepSeekConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # a non-zero selection bias, so that biased routing is exercised
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def decoders():
    """Decoders of one tiny model (their libraries compiled once, or loaded): batch 1; 3, which gathers
    each token's experts; 20, which runs every expert (the tiny preset's 4 experts read 10 times)."""
    model = _tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileNotice)
        return model, {b: AOTDecoder(model, b) for b in (1, 3, 20)}


def _compare(model, decoder, prompts, steps):
    """Prefill through the model, then decode through the compiled step and through model(...) with a
    cache each; -> max logit difference, whether argmax matched every step, the two caches."""
    B, lengths = len(prompts), [len(p) for p in prompts]
    ours, ref = (model.new_cache(B, max(lengths) + steps) for _ in range(2))
    prompt = torch.zeros(B, max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        prompt[b, : len(p)] = torch.tensor(p)
    worst, same_argmax = 0.0, True
    pos = torch.tensor(lengths) - 1
    with torch.no_grad():
        for cache in (ours, ref):
            model(prompt, cache=cache, start_pos=0)
        ids = prompt.gather(1, pos[:, None])
        for _ in range(steps):
            logits, greedy = decoder.with_argmax(ids, ours, pos)
            expected = model(ids, cache=ref, start_pos=pos).logits[:, -1]
            worst = max(worst, (logits - expected).abs().max().item())
            same_argmax &= bool((greedy == logits.argmax(-1)).all())
            ids, pos = expected.argmax(-1, keepdim=True), pos + 1
    return worst, same_argmax, ours, ref


@pytest.mark.parametrize("batch", [1, 3, 20])
def test_compiled_step_equals_the_models_forward(decoders, batch):
    model, decs = decoders
    assert decs[batch].dense == (batch == 20)
    prompts = [list(range(1, 2 + (5 * b) % 7)) for b in range(batch)]  # ragged: per-row positions
    worst, same_argmax, ours, ref = _compare(model, decs[batch], prompts, steps=6)
    assert worst < ATOL
    assert same_argmax
    for a, b in zip(ours.kv, ref.kv):  # the latents it wrote
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_one_library_serves_every_cache_length_and_batch_size_of_its_kind(decoders):
    model, decs = decoders
    key = decs[3].compiled.key  # experts gathered, the batch dynamic from 2
    assert AOTDecoder(model, 2).compiled.key == key == AOTDecoder(model, 19).compiled.key
    assert AOTDecoder(model, 64).compiled.key == decs[20].compiled.key != key  # every expert
    assert AOTDecoder(model, 1).compiled.key == decs[1].compiled.key != key
    for steps in (3, 40):  # cache lengths 8 and 45
        worst, _, _, _ = _compare(model, AOTDecoder(model, 2), [[1, 2, 3, 4, 5], [6]], steps)
        assert worst < ATOL


def test_weights_are_inputs_not_constants(decoders):
    """Another model of the same configuration runs on the same library with its own weights."""
    _, decs = decoders
    other = _tiny_model(seed=1)
    decoder = AOTDecoder(other, 1)
    assert decoder.compiled.runner is decs[1].compiled.runner
    worst, _, _, _ = _compare(other, decoder, [[3, 1, 4, 1, 5]], steps=4)
    assert worst < ATOL


def test_engine_greedy_tokens_equal_the_eager_engines(decoders):
    model, _ = decoders
    eager, compiled = Engine(model, aot=False), Engine(model, aot=True)
    for prompts in ([[5, 6, 7]], [[1, 2, 3, 4], [7, 8, 9, 10, 11, 12]]):  # ragged: per-row positions
        want = [c.token_ids for c in eager.generate_ids(prompts, 12, sampling=GREEDY)]
        assert [c.token_ids for c in compiled.generate_ids(prompts, 12, sampling=GREEDY)] == want
    sampled = [c.token_ids for c in eager.generate_ids([[5, 6, 7]], 12, seed=3)]
    assert [c.token_ids for c in compiled.generate_ids([[5, 6, 7]], 12, seed=3)] == sampled
    built = {type(d).__name__ for _, d in compiled._fast_paths.values()}
    assert {"AOTDecoder", "CompiledPrefill"} <= built
    compiled.generate_ids([[1, 2], [3, 4], [5, 6]], 2, sampling=GREEDY)  # 3 rows: the eager decoder's oneDNN
    assert "Decoder" in {type(d).__name__ for _, d in compiled._fast_paths.values()}


def test_engine_follows_weights_that_change_between_calls(decoders):
    model = _tiny_model(seed=2)
    engine, prompt = Engine(model, aot=True), [[5, 6, 7]]
    before = engine.generate_ids(prompt, 8, sampling=GREEDY, output_logits=True)[0].logits
    with torch.no_grad():
        model.layers[0].mlp.experts.down_proj.mul_(-3)  # in place: the weights' version stamp moves
    got = engine.generate_ids(prompt, 8, sampling=GREEDY, output_logits=True)[0].logits
    want = Engine(model, aot=False).generate_ids(prompt, 8, sampling=GREEDY, output_logits=True)[0].logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not torch.allclose(got[0], before[0])


def test_a_new_process_loads_the_library_from_disk(decoders):
    """The second start finds the compiled library: no CompileNotice (raised as an error here)."""
    code = (
        "import warnings, torch\n"
        "from deepseek_lm.model.aot import AOTDecoder, CompileNotice\n"
        "warnings.simplefilter('error', CompileNotice)\n"
        "torch.set_num_threads(1)\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_aot import _tiny_model\n"
        "AOTDecoder(_tiny_model(), 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_the_key_follows_what_the_library_depends_on(decoders, monkeypatch):
    _, decs = decoders
    w = decs[1].weights
    one = aot.Shapes(1)
    assert aot._key(w, one) == decs[1].compiled.key
    rows = aot.Shapes(2, dynamic_batch=True)
    assert aot._key(w, aot.Shapes(2)) != aot._key(w, one) != aot._key(w, rows)
    assert aot._key(w, rows) != aot._key(w, aot.Shapes(2, dynamic_batch=True, slot_positions=9))
    monkeypatch.setattr(torch, "__version__", "0.0")
    assert aot._key(w, one) != decs[1].compiled.key
    monkeypatch.undo()
    wider = get_model(DeepSeekConfig.from_preset("tiny", max_position_embeddings=512)).eval()
    assert aot._key(Decoder(wider, 1, compile=True).weights, one) != aot._key(w, one)


def test_engines_decode_eagerly_where_no_compiler_is(monkeypatch):
    monkeypatch.setattr(aot, "available", lambda: False)
    monkeypatch.setenv("DEEPSEEK_LM_AOT", "1")
    assert not Engine(_tiny_model()).aot
    monkeypatch.setattr(aot, "available", lambda: True)
    assert Engine(_tiny_model()).aot and not Engine(_tiny_model(), compile=True).aot


def test_batch_engine_serves_each_request_as_the_eager_engine_decodes_it_alone(decoders, tmp_path_factory):
    """Continuous batching on compiled steps (batch 1, then the library of 2 rows up, strided slots): every
    request's greedy tokens are the eager engine's for its prompt alone, whatever joined it."""
    from _trained_tiny import PROMPTS, trained_tiny_checkpoint

    from deepseek_lm.generate.batching import BatchEngine, Params

    model, _ = decoders
    tokenizer = trained_tiny_checkpoint(tmp_path_factory).tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileNotice)
        engine = BatchEngine(model, tokenizer, max_batch_size=4, prefill_chunk=8, aot=True).start()
    try:
        prompts = [engine.encode(p) for p in PROMPTS[:6]]
        requests = [engine.submit(p, Params(max_tokens=10, sampling=GREEDY)) for p in prompts]
        got = [[t for e in r.events(timeout=60) for t in e.token_ids] for r in requests]
    finally:
        engine.close()
    eager = Engine(model, tokenizer, aot=False)
    want = [eager.generate_ids([p], 10, sampling=GREEDY)[0] for p in prompts]
    assert got == [w.token_ids + ([eager.eos_token_id] if w.finish_reason == "eos" else []) for w in want]
    assert set(engine._aot_steps) == {1, aot.library_batch(model.config, 2)}


@pytest.mark.parametrize("start", [0, 5])
def test_compiled_prefill_equals_the_models_forward(decoders, start):
    """Short prompts of one row through the prompt library: the state after the last token and the latents
    it writes, from the start and after earlier tokens."""
    from deepseek_lm.model.aot import CompiledPrefill
    from deepseek_lm.model.prefill import fill

    model, _ = decoders
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileNotice)
        short = CompiledPrefill(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 17))
    ours, ref = model.new_cache(1, 40), model.new_cache(1, 40)
    with torch.no_grad():
        for cache in (ours, ref):
            if start:
                fill(model, None, ids[:, :start], cache, 0)
        got = fill(model, None, ids[:, start:], ours, start, short=short)
        want = fill(model, None, ids[:, start:], ref, start)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for a, b in zip(ours.kv, ref.kv):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
