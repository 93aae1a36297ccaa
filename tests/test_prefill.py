"""The oneDNN prefill (model/prefill.py) equals the model's forward with a cache: the states it returns and the
latents it writes, from position 0 (naive attention) and after earlier tokens (absorbed), for every layer kind."""

import pytest
import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.generate import Engine, SamplingConfig
from deepseek_lm.model import get_model, onednn
from deepseek_lm.model import prefill as prefill_module
from deepseek_lm.model.prefill import Prefill, fill

ATOL = 1e-5
YARN = dict(factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707)
CONFIGS = {
    "tiny": {},
    "dense first layer, no q lora, no shared experts": dict(
        first_k_dense_replace=1, q_lora_rank=0, n_shared_experts=0
    ),
    "softmax routing in groups, yarn": dict(
        scoring_func="softmax", n_group=2, topk_group=1, rope_scaling=YARN, routed_scaling_factor=2.5
    ),
}

pytestmark = pytest.mark.skipif(
    not Prefill.supports(get_model(DeepSeekConfig.from_preset("tiny"))), reason="a torch without oneDNN"
)


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return get_model(DeepSeekConfig.from_preset("tiny", **CONFIGS[request.param])).eval()


@torch.no_grad()
@pytest.mark.parametrize("every_state", [False, True], ids=["last state", "every state"])
def test_prefill_equals_the_model_forward(model, every_state):
    prefill, ids = Prefill(model), torch.randint(0, 512, (2, 40))
    ours, theirs = model.new_cache(2, 64), model.new_cache(2, 64)
    for start, chunk in ((0, ids[:, :30]), (30, ids[:, 30:])):  # from 0, then after earlier tokens
        got = prefill(chunk, ours, start, every_state=every_state)
        out = model(
            chunk, cache=theirs, start_pos=start, last_logits_only=not every_state, return_hidden=True
        )
        want = out.hidden if every_state else out.hidden[:, -1]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        for a, b in zip(ours.kv, theirs.kv):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@torch.no_grad()
def test_fill_falls_back_to_the_model_where_the_prefill_does_not_apply(tiny_config):
    model = get_model(tiny_config).eval()
    assert not Prefill.supports(get_model(tiny_config).to(torch.bfloat16))
    ids, pos = torch.randint(0, 512, (2, 6)), torch.tensor([3, 5])  # rows at their own positions
    ours, theirs = model.new_cache(2, 16), model.new_cache(2, 16)
    got = fill(model, Prefill(model), ids, ours, pos)
    want = model(ids, cache=theirs, start_pos=pos, last_logits_only=True, return_hidden=True).hidden[:, -1]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert ids.numel() < prefill_module.MIN_TOKENS  # too few tokens for it to pay: the model's forward
    got = fill(model, Prefill(model), ids, ours, 0)
    want = model(ids, cache=theirs, start_pos=0, last_logits_only=True, return_hidden=True).hidden[:, -1]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_engine_prefills_through_it_with_the_models_greedy_output(tiny_config, monkeypatch):
    torch.manual_seed(0)
    model, greedy = get_model(tiny_config), SamplingConfig(temperature=0.0)
    monkeypatch.setattr(prefill_module, "MIN_TOKENS", 1)  # these short prompts through it too
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # ragged: the columns before the last through it too
    original, prefilled = Prefill.__call__, []

    def counted(self, ids, *args, **kwargs):
        prefilled.append(tuple(ids.shape))
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(Prefill, "__call__", counted)
    fast = [c.token_ids for c in Engine(model).generate_ids(prompts, 12, sampling=greedy)]
    assert prefilled == [(2, 5)]
    monkeypatch.setattr(Prefill, "supports", staticmethod(lambda model, tokens=None: False))
    assert [c.token_ids for c in Engine(model).generate_ids(prompts, 12, sampling=greedy)] == fast


def test_without_working_onednn_ops_the_engine_prefills_through_the_model(tiny_config, monkeypatch):
    def missing(*args):
        raise RuntimeError("no such op")

    torch.manual_seed(0)
    model, greedy, prompt = get_model(tiny_config), SamplingConfig(temperature=0.0), [list(range(1, 200))]
    want = Engine(model).generate_ids(prompt, 4, sampling=greedy)[0].token_ids
    monkeypatch.setattr(onednn, "swiglu", missing)
    onednn.available.cache_clear()
    try:
        assert not Prefill.supports(model)
        assert Engine(model).generate_ids(prompt, 4, sampling=greedy)[0].token_ids == want
    finally:
        onednn.available.cache_clear()
