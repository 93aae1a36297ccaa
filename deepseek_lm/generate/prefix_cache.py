"""Prefix caching: the latent cache of prompt chunks seen recently, reused by prompts that start the same way.

The engine prefills a prompt in chunks whose ends are a function of the prompt's tokens (chunking.py), so
a chunk's latents depend only on the tokens up to its end and on where the chunks before it end. Each
chunk's latents (per layer (T, r + dr): 96 values per token on the demo) are kept under a key that hashes
every token up to its end and every chunk boundary before it; a prompt whose first chunks have keys here
gets them copied into its staging cache and is prefilled from its first missing chunk on. Its numbers are
those of prefilling it whole, bitwise: the same chunks at the same places, computed once
(tests/test_prefix_cache.py).

Bounded by `max_bytes`; the least recently used chunk goes first. Counters (`stats`): prompts looked up,
prompts with a hit, prompt tokens looked up and reused, tokens prefilled ahead of a conversation's next
turn (the engine's); /metrics shows them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch


def chunk_keys(ids: Sequence[int], ends: Sequence[int]) -> list[bytes]:
    """One key per chunk (ends: chunking.chunk_ends): key k hashes every token up to ends[k] and every
    chunk boundary before it."""
    tokens = np.asarray(ids, dtype=np.int64)
    h, keys, start = hashlib.blake2b(digest_size=16), [], 0
    for end in ends:
        h.update(np.int64(end - start).tobytes())  # the chunk's length: its boundaries are in the key
        h.update(tokens[start:end].tobytes())
        keys.append(h.copy().digest())
        start = end
    return keys


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[bytes, list[torch.Tensor]] = OrderedDict()  # key -> per layer (T, r+dr)
        self.bytes = 0
        self.queries = self.hits = self.query_tokens = self.hit_tokens = self.ahead_tokens = 0

    def restore(self, keys: Sequence[bytes], ends: Sequence[int], kvs: list[torch.Tensor]) -> int:
        """Copy the longest run of leading chunks held (keys and ends of the chunks that may come from the
        cache) into kvs (per layer (S, r + dr), positions from 0) -> the tokens restored: 0 or an end."""
        n = 0
        for key, end in zip(keys, ends):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            for kv, rows in zip(kvs, block):
                kv[n:end] = rows
            n = end
        return n

    def count(self, prompt_tokens: int, restored: int) -> None:
        """A prompt looked up: its length and the tokens the cache gave it."""
        self.queries += 1
        self.query_tokens += prompt_tokens
        if restored:
            self.hits += 1
            self.hit_tokens += restored

    def store(self, key: bytes, start: int, end: int, kvs: list[torch.Tensor]) -> None:
        """Keep the chunk start..end - 1 of a prompt just prefilled into kvs, under its key."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        block = [kv[start:end].clone() for kv in kvs]
        size = sum(b.numel() * b.element_size() for b in block)
        if size > self.max_bytes:
            return
        self._blocks[key] = block
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= sum(b.numel() * b.element_size() for b in old)

    def clear(self) -> None:
        """Forget every chunk (the model's weights changed: the latents are another model's)."""
        self._blocks.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return dict(
            queries=self.queries, hits=self.hits, query_tokens=self.query_tokens, hit_tokens=self.hit_tokens,
            ahead_tokens=self.ahead_tokens, blocks=len(self._blocks), bytes=self.bytes,
        )  # fmt: skip
