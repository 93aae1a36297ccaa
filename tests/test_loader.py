import numpy as np
import pytest
import torch

from deepseek_lm.data import DataError
from deepseek_lm.data.loader import TokenLoader, eval_batches

T = 4  # seq_len


def arange_tokens(n_windows: int, extra: int = 1) -> np.ndarray:
    # token value = its position, so a window's first token / T is its index
    return np.arange(n_windows * T + extra, dtype=np.uint16)


def window_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // T).tolist()


def test_windows_are_shifted_pairs():
    tokens = arange_tokens(10)
    x, y = next(TokenLoader(tokens, T, batch_size=3, seed=1))
    assert x.shape == y.shape == (3, T) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    for row in x:  # each row is a whole window: it starts on a window boundary
        assert row[0] % T == 0 and torch.equal(row, torch.arange(int(row[0]), int(row[0]) + T))


def test_exact_resume_across_epoch_boundary():
    tokens = arange_tokens(23)
    a = TokenLoader(tokens, T, batch_size=2, seed=7)
    assert a.batches_per_epoch == 11
    for _ in range(9):
        next(a)
    state = a.state_dict()
    b = TokenLoader(tokens, T, batch_size=2, seed=7)
    b.load_state_dict(state)
    for _ in range(15):  # crosses into epoch 1 and beyond
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == b.epoch == 2


def test_epoch_boundaries_and_reshuffling():
    tokens = arange_tokens(12)
    loader = TokenLoader(tokens, T, batch_size=3, seed=0)
    assert loader.batches_per_epoch == 4 and loader.epoch == 0
    epochs = []
    for _ in range(3):
        seen = []
        for _ in range(loader.batches_per_epoch):
            assert loader.epoch == len(epochs), "epoch counts completed epochs"
            seen += window_ids(next(loader)[0])
        epochs.append(seen)
        assert sorted(seen) == list(range(12))  # each window exactly once per epoch
    assert loader.epoch == 3
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch, deterministically from the seed
    again = TokenLoader(tokens, T, batch_size=3, seed=0)
    assert [w for _ in range(4) for w in window_ids(next(again)[0])] == epochs[0]
    plain = TokenLoader(tokens, T, batch_size=3, shuffle=False)
    assert [w for _ in range(4) for w in window_ids(next(plain)[0])] == list(range(12))


def test_rank_shards_are_disjoint_equal_and_cover_the_epoch():
    tokens = arange_tokens(26)  # 26 windows, B=2, W=3: 4 batches per rank, 24 windows used, 2 skipped
    loaders = [TokenLoader(tokens, T, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    assert {ld.batches_per_epoch for ld in loaders} == {4}
    shards = [[w for _ in range(4) for w in window_ids(next(ld)[0])] for ld in loaders]
    assert all(len(s) == 8 for s in shards)
    union = set().union(*shards)
    assert len(union) == 24 and union <= set(range(26))  # disjoint, and all but the remainder
    # the global batch of each step is the same as one rank with batch B x W would see
    single = TokenLoader(tokens, T, batch_size=6, seed=3)
    for step in range(4):
        assert sorted(window_ids(next(single)[0])) == sorted(
            w for s in shards for w in s[2 * step : 2 * step + 2]
        )


def test_resume_with_a_different_split_of_the_same_global_batch():
    tokens = arange_tokens(30)
    one = TokenLoader(tokens, T, batch_size=4, seed=5)
    next(one)
    two = [TokenLoader(tokens, T, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    for ld in two:
        ld.load_state_dict(one.state_dict())
    expected = sorted(window_ids(next(one)[0]))
    assert sorted(window_ids(next(two[0])[0]) + window_ids(next(two[1])[0])) == expected


def test_resume_with_other_settings_is_refused():
    tokens = arange_tokens(30)
    state = TokenLoader(tokens, T, batch_size=4).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(tokens, T + 1, batch_size=4).load_state_dict(state)
    with pytest.raises(DataError, match="num_tokens"):
        TokenLoader(tokens[:-5], T, batch_size=4).load_state_dict(state)


def test_too_few_windows_for_one_batch():
    with pytest.raises(DataError, match="too short"):
        TokenLoader(arange_tokens(5), T, batch_size=3, world_size=2)


def test_eval_batches_in_order_and_bounded():
    tokens = arange_tokens(7)
    batches = list(eval_batches(tokens, T, batch_size=3))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    assert [w for x, _ in batches for w in window_ids(x)] == list(range(7))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(eval_batches(tokens, T, batch_size=3, max_batches=2))) == 2


def test_eval_batches_on_a_split_shorter_than_one_window():
    ((x, y),) = list(eval_batches(np.arange(3, dtype=np.uint16), seq_len=8, batch_size=4))
    assert x.tolist() == [[0, 1]] and y.tolist() == [[1, 2]]
