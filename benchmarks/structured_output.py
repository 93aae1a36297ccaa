"""Structured output on a trained checkpoint: how many sampled answers validate against a JSON schema, and
what the grammar's mask costs per token against plain decoding (SPEC §8: a benchmark, never a test).

    python benchmarks/structured_output.py --checkpoint runs/chat            # 200 answers, table + JSON

The same N chat prompts (questions about the standard library, in the checkpoint's chat format) go through
one `BatchEngine` twice, sampled at temperature 1 with seed i: once under the schema (`response_format`
json_schema, through generate/grammar.py), once free. Reported: the share of constrained answers that parse
and validate (jsonschema) and that ended by themselves; decode time per generated token in both runs (wall
time over tokens, --max-batch-size rows at a time); and the mask's own cost per constrained token (llguidance
computing the allowed set, unpacking it, applying it; and advancing the matcher), timed inside the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jsonschema

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
QUESTIONS = [
    "What does `json.dumps` do?", "What arguments does `os.path.join` take?", "What is `collections.deque`?",
    "Which module provides `dumps`?", "What is the `re` module for?", "Describe the class `threading.Thread`.",
    "What does `str.split` do?", "How do I call `sorted`?", "What is `itertools.chain` for?",
    "What does `shutil.copy` do?", "What is the signature of `open`?", "Which methods does `list` have?",
    "What does `math.isclose` do?", "Explain what `functools.partial` does.", "What is `pathlib.Path`?",
    "What does `time.sleep` do?", "What is the `argparse` module for?", "What does `zip` do?",
    "Describe the class `dict`.", "What arguments does `subprocess.run` take?",
]  # fmt: skip


def _run(engine, prompts, params_for) -> tuple[list, float]:
    start = time.perf_counter()
    requests = [engine.submit(ids, params_for(i)) for i, ids in enumerate(prompts)]
    answers = []
    for r in requests:
        events = list(r.events(timeout=600))
        answers.append(("".join(e.text for e in events), r.finish_reason, r.completion_tokens))
    return answers, time.perf_counter() - start


def _timed_masks(totals: dict) -> None:
    """Time every mask and every accept of the grammar's matchers (the cost structured output adds)."""
    from deepseek_lm.generate import grammar

    for name in ("allowed", "accept"):
        real = getattr(grammar.Matcher, name)

        def timed(self, *args, _real=real, _name=name):
            start = time.perf_counter()
            try:
                return _real(self, *args)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - start
                totals[_name + "_calls"] = totals.get(_name + "_calls", 0) + 1

        setattr(grammar.Matcher, name, timed)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/chat")
    p.add_argument("--answers", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--json", default=None, help="default: benchmarks/results/DATE-structured-output-COMMIT.json"
    )
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from deepseek_lm.checkpoint import load_checkpoint
    from deepseek_lm.data.chat import ChatFormat
    from deepseek_lm.generate.batching import BatchEngine, Params
    from deepseek_lm.generate.grammar import Grammars
    from deepseek_lm.generate.sampling import SamplingConfig

    info = dict(
        commit=_commit(), date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(), threads=torch.get_num_threads(), load_before=os.getloadavg(),
        checkpoint=args.checkpoint, answers=args.answers, max_tokens=args.max_tokens,
    )  # fmt: skip
    print(" · ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    ckpt = load_checkpoint(args.checkpoint)
    chat = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template)
    engine = BatchEngine(
        ckpt.model, ckpt.tokenizer, max_batch_size=args.max_batch_size, max_queue=args.answers
    )
    engine.start()
    texts = [chat.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts = [engine.encode(texts[i % len(texts)]) for i in range(args.answers)]
    grammars = Grammars(ckpt.tokenizer, vocab_size=ckpt.config.vocab_size, eos_token_id=engine.eos_token_id)
    schema = grammars.json_schema(SCHEMA)
    sampling = SamplingConfig(temperature=1.0, top_k=None)

    def params(i: int, grammar=None) -> Params:
        return Params(
            max_tokens=args.max_tokens, sampling=sampling, seed=i, stop=chat.stop,
            stop_token_ids=chat.stop_token_ids, grammar=grammar,
        )  # fmt: skip

    try:
        _run(engine, prompts[:8], lambda i: params(i, schema))  # warm-up
        free, free_s = _run(engine, prompts, params)
        masks: dict = {}
        _timed_masks(masks)
        constrained, constrained_s = _run(engine, prompts, lambda i: params(i, schema))
    finally:
        engine.close()
    valid = sum(_valid(text) for text, _, _ in constrained)
    ended = sum(reason in ("eos", "stop") for _, reason, _ in constrained)
    c_tokens, f_tokens = sum(t for *_, t in constrained), sum(t for *_, t in free)
    result = dict(
        valid=valid, answers=len(constrained), ended_by_themselves=ended,
        constrained_tokens=c_tokens, free_tokens=f_tokens,
        constrained_ms_per_token=1e3 * constrained_s / c_tokens, free_ms_per_token=1e3 * free_s / f_tokens,
        mask_us_per_token=1e6 * masks.get("allowed", 0) / max(masks.get("allowed_calls", 1), 1),
        accept_us_per_token=1e6 * masks.get("accept", 0) / max(masks.get("accept_calls", 1), 1),
        examples=[text for text, _, _ in constrained[:5]],
    )  # fmt: skip
    info["load_after"] = os.getloadavg()
    _print(result, info)
    out = Path(
        args.json or f"benchmarks/results/{time.strftime('%Y-%m-%d')}-structured-output-{info['commit']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(info=info, result=result, schema=SCHEMA), indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if valid == len(constrained) else 1


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _print(r: dict, info: dict) -> None:
    print(f"\nvalid against the schema: {r['valid']} / {r['answers']} ({100 * r['valid'] / r['answers']:.1f} %), "
          f"ended by themselves: {r['ended_by_themselves']}")  # fmt: skip
    print(f"{'run':<14}{'tokens':>8}{'ms / token':>12}")
    print(f"{'free':<14}{r['free_tokens']:>8}{r['free_ms_per_token']:>12.3f}")
    print(f"{'constrained':<14}{r['constrained_tokens']:>8}{r['constrained_ms_per_token']:>12.3f}")
    print(
        f"mask {r['mask_us_per_token']:.1f} µs + matcher advance {r['accept_us_per_token']:.1f} µs per constrained token"
    )
    print("e.g.", r["examples"][0])
    print(f"load average before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}")


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
