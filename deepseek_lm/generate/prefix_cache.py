"""Prefix caching: the latent cache of prompt chunks seen recently, reused by prompts that start the same way.

A conversation re-sends its whole history every turn; the engine prefills prompts in chunks at fixed offsets
from their start (`prefill_chunk` tokens), so chunk k of a prompt depends only on its first (k + 1)·chunk
tokens. Each full chunk's latents (per layer (chunk, r + dr): 96 values per token on the demo) are kept
under a key that hashes every token up to its end; a prompt whose first chunks have keys here gets them
copied into its staging cache and is prefilled from the first missing chunk on. Its numbers are those of
prefilling it whole, bitwise: the same chunks at the same offsets, computed once (tests/test_prefix_cache.py).
The last chunk of a prompt is always computed (its state gives the first token).

Bounded by `max_bytes`; the least recently used chunk goes first. Counters (`stats`): prompts looked up,
prompts with a hit, prompt tokens looked up and reused; /metrics shows them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch


class PrefixCache:
    def __init__(self, chunk: int, max_bytes: int) -> None:
        self.chunk, self.max_bytes = chunk, max_bytes
        self._blocks: OrderedDict[bytes, list[torch.Tensor]] = OrderedDict()  # key -> per layer (chunk, r+dr)
        self.bytes = 0
        self.queries = self.hits = self.query_tokens = self.hit_tokens = 0

    def keys(self, prompt_ids: list[int]) -> list[bytes]:
        """The keys of the prompt's full chunks: key k hashes every token up to the end of chunk k."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        h, keys = hashlib.blake2b(digest_size=16), []
        for end in range(self.chunk, len(ids) + 1, self.chunk):
            h.update(ids[end - self.chunk : end].tobytes())
            keys.append(h.copy().digest())
        return keys

    def restore(self, prompt_ids: list[int], kvs: list[torch.Tensor]) -> int:
        """Copy the prompt's longest cached run of leading chunks into kvs (per layer (S, r + dr), positions
        from 0) -> tokens restored (a multiple of chunk, always short of the whole prompt)."""
        self.queries += 1
        self.query_tokens += len(prompt_ids)
        usable = (len(prompt_ids) - 1) // self.chunk  # the last token's chunk is always computed
        n = 0
        for key in self.keys(prompt_ids)[:usable]:
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            for kv, rows in zip(kvs, block):
                kv[n : n + self.chunk] = rows
            n += self.chunk
        if n:
            self.hits += 1
            self.hit_tokens += n
        return n

    def store(self, prompt_ids: list[int], end: int, kvs: list[torch.Tensor]) -> None:
        """Keep the chunk that ends at `end` (a multiple of chunk) of a prompt just prefilled into kvs."""
        if end % self.chunk or end > len(prompt_ids):
            return
        key = self.keys(prompt_ids[:end])[-1]
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        block = [kv[end - self.chunk : end].clone() for kv in kvs]
        size = sum(b.numel() * b.element_size() for b in block)
        if size > self.max_bytes:
            return
        self._blocks[key] = block
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= sum(b.numel() * b.element_size() for b in old)

    def stats(self) -> dict[str, int]:
        return dict(
            queries=self.queries, hits=self.hits, query_tokens=self.query_tokens, hit_tokens=self.hit_tokens,
            blocks=len(self._blocks), bytes=self.bytes,
        )  # fmt: skip
