"""Where a prompt's prefill chunks end: a function of the prompt's own tokens.

The batching engine prefills a prompt chunk by chunk, each chunk one forward over the latents of the chunks
before it. A chunk's numbers depend on where it starts and ends (its products' kernels and the routing's
vector tails change with its length), so a prompt's latents are reproducible bitwise only when it is cut
the same way; the prefix cache (prefix_cache.py) reuses a chunk only for a prompt cut the same way up to
its end. The rule below reads nothing but the prompt's tokens: a prompt is cut the same way whatever the
cache holds, whatever else is queued, and whether or not the cache is on.

The rule: a chunk starts at position 0 and before every `starts` token (a chat template's user-turn
token, `<|user|>` for ours), and a chunk longer than `limit` tokens (`--prefill-chunk`) is cut every
`limit` tokens from its start. A prompt without such a token (a completion prompt, an evaluation
harness's few-shot prefix) is cut at fixed offsets `limit` apart, as the engine always did.

Why before a user turn: a conversation re-sends its history every turn, and turn k's prompt is turn
k-1's, then the previous answer and the new question:

    <|system|>S<|end|> | <|user|>Q1<|end|><|assistant|>A1<|end|> | <|user|>Q2<|end|><|assistant|>

Every chunk but the last then ends where a later turn's prompt has a chunk end too, so the next turn
finds its whole history in the cache once the previous answer's chunk is there (the engine prefills
it right after the answer, batching.py), and computes only its new question. A system message shared
by many conversations is a chunk of its own. The price is one forward per turn for a prompt the cache
has never seen (figures: README, Serve).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def chunk_ends(ids: Sequence[int], limit: int, starts: Collection[int] = ()) -> list[int]:
    """The end of each prefill chunk of the prompt `ids`, increasing, the last one len(ids): a chunk starts
    before each token in `starts` (not at position 0, where one starts anyway) and is at most `limit`
    tokens long."""
    turns = [i for i, token in enumerate(ids) if i > 0 and token in starts] if starts else []
    ends, start = [], 0
    for cut in (*turns, len(ids)):
        ends.extend(range(start + limit, cut, limit))  # a long run: every `limit` tokens from its start
        ends.append(cut)
        start = cut
    return ends
