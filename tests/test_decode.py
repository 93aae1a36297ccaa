"""The decoder's rearranged weights give the model's own cached forward: logits and the cache it writes."""

import dataclasses

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import get_model
from deepseek_lm.model.decode import Decoder, _rms_norm

ATOL = 1e-5

VARIANTS = {
    "tiny": {},
    "softmax+groups": dict(scoring_func="softmax", n_group=2, topk_group=1, norm_topk_prob=False),
    "dense first layer, scaled": dict(
        num_hidden_layers=3, first_k_dense_replace=1, routed_scaling_factor=2.5
    ),
    "no q lora, yarn": dict(
        q_lora_rank=0, rope_scaling=dict(factor=4.0, original_max_position_embeddings=64, mscale_all_dim=1.0)
    ),
    "no shared experts": dict(n_shared_experts=0),
    "two shared experts": dict(n_shared_experts=2),
    "many experts (sparse at batch 1)": dict(
        n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2
    ),
}


def _model(**overrides):
    model = get_model(dataclasses.replace(DeepSeekConfig.from_preset("tiny"), **overrides)).eval()
    with torch.no_grad():  # a non-zero selection bias, so that biased routing is exercised
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def _decode_both(model, prompts, steps, **decoder_options):
    """Prefill each row's prompt through the model, then decode `steps` tokens through the decoder and
    through model(...) side by side, each with its own cache; -> max logit difference, the two caches."""
    B, lengths = len(prompts), [len(p) for p in prompts]
    ours, ref = (model.new_cache(B, max(lengths) + steps) for _ in range(2))
    prompt = torch.zeros(B, max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        prompt[b, : len(p)] = torch.tensor(p)
    decoder, worst = Decoder(model, B, **decoder_options), 0.0
    pos = torch.tensor(lengths) - 1  # each row's last prompt token runs as the first decode step
    with torch.no_grad():
        for cache in (ours, ref):
            model(prompt, cache=cache, start_pos=0)
        ids = prompt.gather(1, pos[:, None])
        for _ in range(steps):
            logits = decoder(ids, ours, pos)
            expected = model(ids, cache=ref, start_pos=pos).logits[:, -1]
            worst = max(worst, (logits - expected).abs().max().item())
            ids, pos = expected.argmax(-1, keepdim=True), pos + 1
    return worst, ours, ref


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch, invariant", [(1, False), (3, False), (2, True)])
def test_decode_steps_equal_the_model(variant, batch, invariant):
    model = _model(**VARIANTS[variant])
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 9, 2)[:batch]]
    worst, ours, ref = _decode_both(model, prompts, steps=6, batch_invariant=invariant)
    assert worst < ATOL
    for a, b in zip(ours.kv, ref.kv):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# the seed's shapes at a small vocabulary: one-row oneDNN products differ from several-row ones at K >= 2048
# (its SwiGLUs' down-projection), MKL's 7-wide router product with a row's place
SEED_SHAPED = dict(DeepSeekConfig().to_dict(), vocab_size=1024, max_position_embeddings=1024)


@pytest.mark.parametrize("config", ["tiny", "seed-shaped", "many experts"])
def test_batch_invariant_rows_are_bitwise_their_own(config):
    """A batch-invariant decoder's logits for a row are bitwise the same whatever other rows share the step
    (1 to 8 rows, any order) and whatever attended length (in slices of `_KV_CHUNK`): what serve's
    continuous batching relies on for 'a request's output is the same alone or in a full batch'."""
    from deepseek_lm.model.decode import _KV_CHUNK

    overrides = {"tiny": dict(max_position_embeddings=1024), "seed-shaped": SEED_SHAPED}.get(config)
    model = _model(
        **(overrides or dict(VARIANTS["many experts (sparse at batch 1)"], max_position_embeddings=1024))
    )
    rows, length = 8, model.config.max_position_embeddings
    cache = model.new_cache(rows, length)
    for kv in cache.kv:
        kv.normal_()
    decoder = Decoder(model, rows, batch_invariant=True)
    ids, pos = torch.randint(0, 512, (rows, 1)), torch.randint(0, _KV_CHUNK - 1, (rows, 1))

    def step(which, attended):
        kvs = [kv[which].clone()[:, :attended] for kv in cache.kv]
        return decoder.step(ids[which], pos[which], kvs)

    everyone = step(torch.arange(rows), length)
    g = torch.Generator().manual_seed(0)
    for trial in range(16):
        which = torch.randperm(rows, generator=g)[: 1 + trial % rows]
        attended = _KV_CHUNK * (1 + trial % (length // _KV_CHUNK))
        assert torch.equal(step(which, attended), everyone[which]), (len(which), attended)
    assert not torch.equal(everyone[0], everyone[1])  # rows with their own inputs differ


def test_dense_experts_only_where_tokens_pick_most_experts():
    def dense(decoder):
        return [f.experts_gu is None for f in decoder.weights.ffn]

    few = _model()  # 4 experts, 2 per token: a single row already picks half
    assert dense(Decoder(few, 1)) == [True, True]
    many = _model(**VARIANTS["many experts (sparse at batch 1)"])  # 16 experts, 2 per token
    assert dense(Decoder(many, 1)) == [False, False]  # each token's experts gathered
    assert dense(Decoder(many, 4)) == [True, True]  # 4 rows · 2 ≥ 16 / 2
    # compiled, the gather reads the chosen experts in place: it runs while they are fewer than all
    assert dense(Decoder(few, 1, compile=True)) == [False, False]  # 1 · 2 < 4
    assert dense(Decoder(few, 2, compile=True)) == [True, True]
    assert dense(Decoder(many, 7, compile=True)) == [False, False]  # 7 · 2 < 16


def test_packed_head_only_for_cpu_batches_of_three_or_more():
    """So that test_decode_steps_equal_the_model at batch 3 holds the oneDNN head to the model's."""
    model = _model()
    if torch.backends.mkldnn.is_available():
        assert Decoder(model, 3).weights.head_packed is not None
    for decoder in (Decoder(model, 2), Decoder(_model().to(torch.bfloat16), 3)):
        assert decoder.weights.head_packed is None and decoder.weights.head_DV is not None


def test_several_tokens_per_row_equal_the_model():
    model = _model()
    prompt, more = torch.randint(0, 512, (2, 7)), torch.randint(0, 512, (2, 4))
    ours, ref = model.new_cache(2, 16), model.new_cache(2, 16)
    with torch.no_grad():
        for cache in (ours, ref):
            model(prompt, cache=cache, start_pos=0)
        logits = Decoder(model, 2)(more, ours, 7)
        expected = model(more, cache=ref, start_pos=7).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_decoder_reads_the_weights_it_was_built_with():
    model = _model()
    decoder = Decoder(model, 1)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    worst, _, _ = _decode_both(model, [[1, 2, 3]], steps=1)  # a new decoder follows the change
    assert worst < ATOL
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache, start_pos=0)
        stale = decoder(torch.tensor([[4]]), cache, 3)
        fresh = Decoder(model, 1)(torch.tensor([[4]]), cache, 3)
    torch.testing.assert_close(stale * 2, fresh, atol=ATOL, rtol=0)


def test_bf16_weights_decode_within_bf16_rounding():
    model = _model().to(torch.bfloat16)  # e.g. imported bf16 weights, generating on a CPU
    worst, ours, _ = _decode_both(model, [[1, 2, 3, 4, 5], [7, 8]], steps=4)
    assert ours.kv[0].dtype == torch.bfloat16
    assert worst < 2e-2  # the absorbed products are rounded to bf16 once, the model's per step


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])  # eps dominates the smallest
def test_light_rms_norm_is_torchs(scale):
    x, w = torch.randn(3, 5, 64) * scale, torch.randn(64)
    for weight in (None, w):
        expected = torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)
        torch.testing.assert_close(_rms_norm(x, weight, 1e-6), expected, atol=1e-6, rtol=1e-5)
    half, w = x.bfloat16(), w.bfloat16()  # half types are F.rms_norm's own result
    assert torch.equal(_rms_norm(half, w, 1e-6), torch.nn.functional.rms_norm(half, (64,), w, 1e-6))


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, batch", [("tiny", 2), ("many experts (sparse at batch 1)", 2), ("tiny", 3)]
)  # dense experts / gathered experts / the head through oneDNN (`_packed_head`)
def test_compiled_steps_equal_the_model_and_are_shared_by_decoders(variant, batch):
    """One torch.compile per configuration, batch size and cache length (~20 s on a CPU): a second decoder,
    over other weights of the same shapes, reuses the graph."""
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    for _ in range(2):  # two models: new weights, same shapes
        model = _model(**VARIANTS[variant])
        ours, ref = model.new_cache(batch, 256), model.new_cache(batch, 256)  # the engine's length for tiny
        prompt = torch.randint(0, 512, (batch, 6))
        decoder = Decoder(model, batch, compile=True)
        pos = torch.tensor([6, 4, 5][:batch])  # ragged rows: per-row positions, as the engine passes them
        with torch.no_grad():
            for cache in (ours, ref):
                model(prompt, cache=cache, start_pos=0)
            ids = prompt.gather(1, pos[:, None] - 1)
            for _ in range(4):
                got = decoder(ids, ours, pos)
                want = model(ids, cache=ref, start_pos=pos).logits[:, -1]
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
                ids, pos = want.argmax(-1, keepdim=True), pos + 1
        for a, b in zip(ours.kv, ref.kv):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1


@pytest.mark.slow
def test_compiled_engine_generates_what_the_eager_one_does():
    from deepseek_lm.generate.engine import Engine
    from deepseek_lm.generate.sampling import SamplingConfig

    model, greedy = _model(), SamplingConfig(temperature=0)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]  # ragged: the graph of the test above (batch 2, cache 256)
    eager = Engine(model).generate_ids(prompts, 8, sampling=greedy, output_logits=True)
    compiled = Engine(model, compile=True).generate_ids(prompts, 8, sampling=greedy, output_logits=True)
    for a, b in zip(eager, compiled):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
