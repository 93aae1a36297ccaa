"""Which constrained-decoding library: the per-token cost of a grammar's mask at our vocabularies, for
llguidance (what the server uses), xgrammar and outlines-core, on one JSON schema (SPEC §8: a benchmark).

    python benchmarks/structured_masks.py --tokenizer runs/demo --text data_cache/builtin/val.txt

Vocabularies: the checkpoint's tokenizer (the demo's 4,096) and a byte-level BPE of --bpe-vocab tokens (default
8,192, the default vocabulary) trained here on --text. For each library: the time to build its tokenizer
view and compile the schema, then random walks through the grammar (--walks of up to --steps tokens: the
mask, then a token drawn among the allowed ones), each step's mask timed, including the unpacking to a
(V,) bool array the engine applies. A library that is not installed is skipped (xgrammar, outlines-core:
`pip install --no-deps xgrammar apache-tvm-ffi outlines-core`; xgrammar's own requirements pull triton).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "module": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["function", "class", "method", "module"]},
        "arguments": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "returns": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "module", "kind", "arguments", "returns"],
    "additionalProperties": False,
}


def _token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes (byte-level BPE: GPT-2's printable stand-ins mapped back; specials as text)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    to_byte, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            to_byte[chr(256 + extra)] = b
            extra += 1
    vocab = {i: s for s, i in tokenizer.get_vocab().items()}
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    return [
        s.encode() if s in special else bytes(to_byte[c] for c in s)
        for s in (vocab[i] for i in range(len(vocab)))
    ]


def _walk(start, mask, consume, walks: int, steps: int, rng) -> list[float]:
    times = []
    for _ in range(walks):
        state = start()
        for _ in range(steps):
            t0 = time.perf_counter()
            allowed = mask(state)
            times.append(time.perf_counter() - t0)
            ids = np.flatnonzero(allowed)
            if len(ids) == 0 or not consume(state, int(rng.choice(ids))):
                break
    return times


def _llguidance(tokenizer, V, eos):
    import llguidance

    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=V, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), {"whitespace_flexible": False}
    )
    first = llguidance.LLMatcher(tok, grammar)
    ready = time.perf_counter() - t0

    def mask(m):
        return np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")[:V]

    def consume(m, t):
        m.consume_token(t)
        return not m.is_stopped()

    return ready, first.deep_copy, mask, consume


def _xgrammar(tokenizer, V, eos):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(
        _token_bytes(tokenizer), vocab_type=xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[eos]
    )
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False
    )
    ready = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, V)

    def mask(m):
        m.fill_next_token_bitmask(bitmask)
        return np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:V]

    def consume(m, t):
        return m.accept_token(t) and not m.is_terminated()

    return ready, lambda: xgr.GrammarMatcher(compiled), mask, consume


def _outlines_core(tokenizer, V, eos):
    import outlines_core

    t0 = time.perf_counter()
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(_token_bytes(tokenizer)):
        if i != eos:
            by_bytes.setdefault(b, []).append(i)
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = outlines_core.Index(regex, outlines_core.Vocabulary(eos, by_bytes))
    ready = time.perf_counter() - t0

    def mask(guide):
        allowed = np.zeros(V, dtype=np.uint8)
        allowed[guide.get_tokens()] = 1
        return allowed

    def consume(guide, t):
        guide.advance(t)
        return not guide.is_finished()

    return ready, lambda: outlines_core.Guide(index), mask, consume


LIBRARIES = {"llguidance": _llguidance, "xgrammar": _xgrammar, "outlines-core": _outlines_core}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="runs/demo", help="a checkpoint directory or tokenizer.json")
    p.add_argument("--text", default="data_cache/builtin/val.txt", help="text to train the larger BPE on")
    p.add_argument("--bpe-vocab", type=int, default=8192)
    p.add_argument("--walks", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from deepseek_lm.data.tokenizer import load_tokenizer, train_bpe

    info = dict(commit=_commit(), date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.processor() or "?",
                cpus=os.cpu_count(), load_before=os.getloadavg())  # fmt: skip
    print(" · ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    text = Path(args.text).read_text(encoding="utf-8")
    tokenizers = {
        "checkpoint": load_tokenizer(args.tokenizer),
        "bpe": train_bpe((text[i : i + 4000] for i in range(0, len(text), 4000)), args.bpe_vocab),
    }
    rows = []
    for tok in tokenizers.values():
        V, eos = tok.get_vocab_size(), tok.token_to_id("<|endoftext|>")
        for name, build in LIBRARIES.items():
            try:
                ready, start, mask, consume = build(tok, V, eos)
            except ImportError:
                print(f"{name}: not installed, skipped")
                continue
            times = _walk(start, mask, consume, args.walks, args.steps, np.random.default_rng(0))
            rows.append(dict(library=name, vocab=V, ready_ms=1e3 * ready, steps=len(times),
                             mean_us=1e6 * statistics.mean(times), p50_us=1e6 * statistics.median(times),
                             p95_us=1e6 * float(np.percentile(times, 95)), max_us=1e6 * max(times)))  # fmt: skip
    info["load_after"] = os.getloadavg()
    print(
        f"\n{'library':<15}{'vocab':>7}{'ready ms':>10}{'steps':>7}{'mean µs':>9}{'p50':>7}{'p95':>7}{'max':>8}"
    )
    for r in rows:
        print(f"{r['library']:<15}{r['vocab']:>7}{r['ready_ms']:>10.1f}{r['steps']:>7}{r['mean_us']:>9.1f}"
              f"{r['p50_us']:>7.1f}{r['p95_us']:>7.1f}{r['max_us']:>8.0f}")  # fmt: skip
    print(f"load average before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}")
    out = Path(
        args.json or f"benchmarks/results/{time.strftime('%Y-%m-%d')}-structured-masks-{info['commit']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(info=info, rows=rows, schema=SCHEMA), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
