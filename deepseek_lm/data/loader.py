"""Batches from a split's token array: the resumable, sharded training loader and evaluation windows.

Windows: a split of L tokens holds N = (L - 1) // T non-overlapping windows of T + 1 tokens (T = seq_len),
window i = tokens[i*T : i*T + T + 1]; neighbours share one token, so every token is a target once per epoch.

Epoch e visits the windows in the order P_e = permutation(N) seeded by (seed, e). Rank r of W takes
P_e[r], P_e[r + W], P_e[r + 2W], ...: its batch b holds P_e[W*(b*B + j) + r] for j < B. So the global batch
of step b is P_e[b*B*W : (b+1)*B*W] whatever W is; ranks are disjoint and equal in size, and the last
N mod (B*W) windows of each epoch's order are skipped (a different few each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from deepseek_lm.data import DataError


class TokenLoader:
    """Endless iterator of (x, y) int64 batches (B, T), y = x shifted by one token.

    `epoch` is the number of completed epochs (the epoch the next batch comes from); `state_dict()` taken
    after k batches makes a new loader continue with batch k + 1 exactly.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need seq_len, batch_size >= 1 and 0 <= rank < world_size; got {seq_len}, {batch_size}, {rank}, {world_size}"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        self.batches_per_epoch = self.num_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training split is too short: {len(tokens)} tokens make {self.num_windows} windows of "
                f"seq_len + 1 = {seq_len + 1}, fewer than one batch of {batch_size} x {world_size} rank(s); "
                "use more data, a shorter seq_len or a smaller batch"
            )
        self.epoch = 0
        self._batch = 0  # index within the epoch of the next batch
        self._shard_epoch, self._shard = -1, np.empty(0, dtype=np.int64)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        idx = self._windows_of(self.epoch)[self._batch * B : (self._batch + 1) * B]  # (B,)
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self.epoch, self._batch = self.epoch + 1, 0
        return _windows(self.tokens, idx, self.seq_len)

    def _windows_of(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`, in visiting order: (batches_per_epoch * B,)."""
        if self._shard_epoch != epoch:
            n = self.num_windows
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            used = self.batches_per_epoch * self.batch_size * self.world_size
            self._shard_epoch, self._shard = epoch, order[self.rank : used : self.world_size]
        return self._shard

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "global_batch_size": self.batch_size * self.world_size,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The data, seed, seq_len and global batch (B x W) must match;
        the split of the global batch across ranks may change (see the module docstring)."""
        mine = self.state_dict()
        changed = [
            k
            for k in ("seed", "shuffle", "seq_len", "global_batch_size", "num_tokens")
            if state.get(k) != mine[k]
        ]
        if changed:
            diffs = ", ".join(f"{k} {state.get(k)} -> {mine[k]}" for k in changed)
            raise DataError(
                f"cannot resume the data loader exactly: {diffs}; resume with the same data and settings"
            )
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's windows in order, (x, y) batches of up to `batch_size` rows (the last may be smaller).

    A split shorter than one window gives a single window of all of it (T = len - 1), so a short
    validation text can still be scored.
    """
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        if len(tokens) < 2:
            raise DataError(f"the split holds {len(tokens)} token(s): too few to evaluate")
        seq_len, n = len(tokens) - 1, 1
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _windows(tokens, np.arange(start, min(start + batch_size, n)), seq_len)


def _windows(tokens: np.ndarray, idx: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in idx.tolist()])  # (B, T+1)
    w = torch.from_numpy(rows.astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) each
