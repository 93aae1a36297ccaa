import math

import pytest
import torch

from deepseek_lm.errors import UserError
from deepseek_lm.generate.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    argmax,
    make_generator,
    sample,
    top_k_filter,
    top_p_filter,
)


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, 50)
    got = sample(logits, SamplingConfig(temperature=0.0), make_generator(0))
    assert torch.equal(got, logits.argmax(-1))


@pytest.mark.parametrize("vocab", [49152, 320, 64, 50])  # blocks of 1024, of 64, one block, none
def test_blocked_argmax_is_torchs_argmax(vocab):
    logits = torch.randn(5, vocab)
    logits[1] = 0.0  # all tied: the first index
    logits[2, [3, vocab - 1]] = 100.0  # tied maxima in different blocks: the first one
    logits[3, vocab // 2] = math.nan  # NaN is argmax's maximum
    logits[4, [vocab // 3, vocab - 2]] = math.nan  # the first NaN
    assert torch.equal(argmax(logits), logits.argmax(-1))
    assert torch.equal(argmax(logits[:1]), logits[:1].argmax(-1))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(repetition_penalty=0.0),
    ],
)
def test_invalid_settings_are_user_errors(kwargs):
    with pytest.raises(UserError) as e:
        SamplingConfig(**kwargs)
    assert next(iter(kwargs)) in str(e.value)


def test_top_k_keeps_k_and_clamps_to_vocab():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 1000), logits)  # above the vocabulary: everything stays
    assert torch.equal(top_k_filter(logits, None), logits)
    # and sampling with a huge top_k works
    assert sample(logits, SamplingConfig(temperature=1.0, top_k=10**6), make_generator(0)).shape == (1,)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7 so the second token is needed; 0.5 + 0.3 >= 0.7 so the third is not
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    # the most likely token survives however small p is
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum() == 1
    # works on unsorted rows too
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.7)).tolist() == [[False, True, False, True]]


def test_sampling_never_picks_filtered_tokens():
    logits = torch.randn(4, 100)
    config = SamplingConfig(temperature=1.5, top_k=5)
    allowed = torch.topk(logits, 5, dim=-1).indices
    gen = make_generator(1)
    for _ in range(50):
        picked = sample(logits, config, gen)
        assert (allowed == picked[:, None]).any(-1).all()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    picked = sample(logits, SamplingConfig(temperature=1.0, top_k=None), make_generator(0))
    freq = torch.bincount(picked, minlength=3).float() / picked.numel()
    assert torch.allclose(freq, probs, atol=0.02)


def test_seed_fixes_the_sample():
    logits = torch.randn(2, 1000)
    config = SamplingConfig(temperature=1.0, top_k=None)

    def draws(seed):
        gen = make_generator(seed)
        return torch.stack([sample(logits, config, gen) for _ in range(20)])

    assert torch.equal(draws(7), draws(7))
    assert not torch.equal(draws(7), draws(8))


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    # greedy with a strong penalty moves off the seen argmax
    picked = sample(logits, SamplingConfig(temperature=0.0, repetition_penalty=10.0), None, seen)
    assert picked.item() == 2


@pytest.mark.parametrize("kwargs", [dict(top_k=2), dict(top_k=None, top_p=0.7), dict(top_k=3, top_p=0.7)])
def test_filtered_sampling_follows_the_renormalised_distribution(kwargs):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # unsorted on purpose
    logits = probs.log().expand(20000, 4)
    picked = sample(logits, SamplingConfig(temperature=1.0, **kwargs), make_generator(0))
    freq = torch.bincount(picked, minlength=4).float() / picked.numel()
    assert torch.allclose(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.02)


def test_sampling_never_picks_zero_probability_tokens():
    logits = torch.full((5000, 6), float("-inf"))
    logits[:, 2] = 0.0
    logits[:, 4] = -1.0
    for kwargs in [dict(top_k=None), dict(top_k=4), dict(top_k=None, top_p=0.99)]:
        picked = sample(logits, SamplingConfig(temperature=1.0, **kwargs), make_generator(1))
        assert set(picked.tolist()) <= {2, 4}
