"""MLA: the absorbed path over the latent cache equals the naive path (prefill, decode, per-row positions)."""

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import get_model
from deepseek_lm.model.layers import apply_rope, rope_inv_freq, yarn_softmax_scale

ATOL = 1e-5


def _model(config: DeepSeekConfig):
    return get_model(config).eval()


@pytest.fixture
def model(tiny_config):
    return _model(tiny_config)


def test_cache_holds_only_latent_and_rope_key(model, tiny_config):
    cache = model.new_cache(batch_size=3, max_len=40)
    r, dr, L = tiny_config.kv_lora_rank, tiny_config.qk_rope_head_dim, tiny_config.num_hidden_layers
    assert len(cache.c_kv) == len(cache.k_pe) == L
    assert cache.c_kv[0].shape == (3, 40, r) and cache.k_pe[0].shape == (3, 40, dr)
    assert cache.bytes_per_token() == L * (r + dr) * 4  # fp32


def test_prefill_with_cache_equals_naive(model):
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        naive = model(ids).logits
        absorbed = model(ids, cache=model.new_cache(2, 32), start_pos=0).logits
    torch.testing.assert_close(absorbed, naive, atol=ATOL, rtol=0)


def test_token_by_token_decode_equals_naive(model):
    ids = torch.randint(0, 512, (2, 20))
    cache = model.new_cache(2, 20)
    with torch.no_grad():
        naive = model(ids).logits
        steps = [model(ids[:, t : t + 1], cache=cache, start_pos=t).logits for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), naive, atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode_equals_naive(model):
    """A chunk of several tokens at an offset: the causal mask is aligned to absolute positions."""
    ids = torch.randint(0, 512, (1, 16))
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        naive = model(ids).logits
        a = model(ids[:, :5], cache=cache, start_pos=0).logits
        b = model(ids[:, 5:12], cache=cache, start_pos=torch.tensor(5)).logits
        c = model(ids[:, 12:], cache=cache, start_pos=12, last_logits_only=True).logits
    torch.testing.assert_close(torch.cat([a, b], 1), naive[:, :12], atol=ATOL, rtol=0)
    torch.testing.assert_close(c, naive[:, -1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("start", ["none", 0, 5, "per row"])
def test_last_logits_only_runs_the_last_layer_for_the_last_token_alone(model, start):
    """The last layer's queries and FFN run for each row's last token only: the same last logits and the same
    cache as the full forward, with and without a cache, from 0 (naive), at an offset (absorbed), per row."""
    ids = torch.randint(0, 512, (2, 12))
    rows_in = []
    hook = model.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows_in.append(args[0].shape[1]))
    with torch.no_grad():
        if start == "none":
            full, last = model(ids).logits, model(ids, last_logits_only=True).logits
            kv_full = kv_last = []
        else:
            at = {0: 0, 5: 5, "per row": torch.tensor([5, 3])}[start]
            caches = [model.new_cache(2, 20) for _ in range(2)]
            for cache in caches:  # the same earlier positions in both caches (each row's own offset)
                model(ids[:, :5], cache=cache)
            rows_in.clear()
            full = model(ids, cache=caches[0], start_pos=at).logits
            last = model(ids, cache=caches[1], start_pos=at, last_logits_only=True).logits
            kv_full, kv_last = caches[0].kv, caches[1].kv
    hook.remove()
    assert rows_in == [12, 1]  # the last layer's FFN saw one token per row
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)
    for a, b in zip(kv_full, kv_last):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_last_logits_only_of_packed_sequences(model):
    """doc_ids: the last token attends within its own sequence only."""
    ids, doc = torch.randint(0, 512, (1, 10)), torch.tensor([[0] * 6 + [1] * 4])
    with torch.no_grad():
        full = model(ids, doc_ids=doc).logits
        last = model(ids, doc_ids=doc, last_logits_only=True).logits
        alone = model(ids[:, 6:]).logits
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(last, alone[:, -1:], atol=ATOL, rtol=0)


def test_per_row_start_pos_with_right_padded_prompts(model):
    """Rows of different lengths: right-pad, prefill at 0, decode each row at its own length."""
    lengths, pad = [5, 9, 7], 0
    rows = [torch.randint(1, 512, (n + 3,)) for n in lengths]  # prompt + 3 tokens to decode
    prompt = torch.full((3, max(lengths)), pad)
    for b, n in enumerate(lengths):
        prompt[b, :n] = rows[b][:n]
    cache = model.new_cache(3, 16)
    with torch.no_grad():
        model(prompt, cache=cache, start_pos=0)
        pos = torch.tensor(lengths)
        for step in range(3):
            tok = torch.stack([rows[b][lengths[b] + step] for b in range(3)])[:, None]
            got = model(tok, cache=cache, start_pos=pos + step).logits[:, 0]
            for b, n in enumerate(lengths):
                want = model(rows[b][None, : n + step + 1]).logits[0, -1]
                torch.testing.assert_close(got[b], want, atol=ATOL, rtol=0)


def test_per_row_start_pos_with_several_new_tokens(model):
    """Rows at different offsets take a chunk of 3 tokens each: the mask is per row and per query."""
    ids = torch.randint(0, 512, (2, 12))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(ids[:, :9], cache=cache)  # row 1 then continues at 4 (its later slots are overwritten)
        got = model(
            torch.stack([ids[0, 9:12], ids[1, 4:7]]), cache=cache, start_pos=torch.tensor([9, 4])
        ).logits
        want0 = model(ids[:1, :12]).logits[0, 9:12]
        want1 = model(ids[1:, :7]).logits[0, 4:7]
    torch.testing.assert_close(got[0], want0, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], want1, atol=ATOL, rtol=0)


def test_absorbed_equals_naive_with_yarn_and_no_q_lora(tiny_config):
    rope = dict(factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707)
    config = DeepSeekConfig.from_preset("tiny", rope_scaling=rope, q_lora_rank=0, v_head_dim=24)
    model = _model(config)
    ids = torch.randint(0, 512, (2, 12))
    cache = model.new_cache(2, 12)
    with torch.no_grad():
        naive = model(ids).logits
        model(ids[:, :6], cache=cache)
        steps = [model(ids[:, t : t + 1], cache=cache, start_pos=t).logits for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), naive[:, 6:], atol=ATOL, rtol=0)


def test_positions_beyond_cache_or_context_raise(model):
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="does not fit the cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache, start_pos=6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="start_pos must be >= 0"):
        model(
            torch.zeros(2, 1, dtype=torch.long), cache=model.new_cache(2, 8), start_pos=torch.tensor([0, -1])
        )


def test_rope_rotates_interleaved_pairs():
    """Pair (x0, x1) turns by angle pos·θ_0 like the complex number x0 + i·x1 (DeepSeek / V2 layout)."""
    config = DeepSeekConfig.from_preset("tiny")
    model = _model(config)
    x = torch.randn(1, 5, 1, config.qk_rope_head_dim)
    cos, sin = model.rope[:, :5, None]
    got = apply_rope(x, cos, sin)
    inv_freq, _ = rope_inv_freq(config)
    angles = torch.arange(5.0)[:, None] * inv_freq  # (T, dr/2)
    want = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        * torch.polar(torch.ones_like(angles), angles)[:, None]
    )
    torch.testing.assert_close(got, want.flatten(-2), atol=1e-6, rtol=0)


def test_yarn_scale_and_frequencies():
    config = DeepSeekConfig.from_preset("tiny", rope_scaling=dict(factor=4.0, mscale_all_dim=1.0))
    assert yarn_softmax_scale(config) == pytest.approx(
        config.qk_head_dim**-0.5 * (0.1 * torch.log(torch.tensor(4.0)).item() + 1) ** 2
    )
    plain, _ = rope_inv_freq(DeepSeekConfig.from_preset("tiny"))
    yarn, _ = rope_inv_freq(config)
    assert yarn[0] == plain[0]  # fast-rotating dims are kept ...
    assert yarn[-1] == pytest.approx(plain[-1] / 4)  # ... slow ones interpolated by the factor
