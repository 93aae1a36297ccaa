"""How far llama.cpp's logits on our GGUF exports are from ours, per weight type and KV-cache type.

    python benchmarks/gguf_parity.py --checkpoint runs/demo          # the README's table
    python benchmarks/gguf_parity.py --checkpoint runs/chat --json benchmarks/results/gguf-parity-chat.json

Exports the checkpoint as f32, f16, bf16 and q8_0 GGUF files, runs them in llama.cpp (llama-cpp-python, which
`make test` installs; one thread) with its KV cache in f32 and in f16 (its default), and compares the logits
at every position of a few prompts with our fp32 model's: the largest absolute difference, and how often the
two argmaxes agree. Prints a table and writes JSON (machine, commit, load average).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from deepseek_lm.checkpoint import load_checkpoint
from deepseek_lm.interop import export_gguf

PROMPTS = [
    "The",
    "A function that returns the value of",
    "x = 1\nfor i in range(10):\n",
    "class Foo",
    "Return a list of all the names in the module, sorted by their position in the file and",
]
GGML_TYPES = {"f32": 0, "f16": 1}  # KV-cache types (ggml_type)


def llama_logits(path: Path, cache: str, prompts: list[list[int]]) -> list[np.ndarray]:
    import llama_cpp

    with contextlib.redirect_stderr(io.StringIO()):
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, n_threads_batch=1, logits_all=True,
                              type_k=GGML_TYPES[cache], type_v=GGML_TYPES[cache], verbose=False)  # fmt: skip
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()  # now: freed at interpreter exit, llama-cpp-python prints a traceback
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--json", default=None, help="default: benchmarks/results/<date>-gguf-parity-<commit>.json"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    prompts = [ckpt.tokenizer.encode(t, add_special_tokens=False).ids for t in PROMPTS]
    with torch.no_grad():
        ours = [ckpt.model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            path = export_gguf(ckpt.path, Path(tmp) / f"{dtype}.gguf", dtype=dtype).path
            for cache in GGML_TYPES:
                theirs = llama_logits(path, cache, prompts)
                diff = max(float(np.abs(a - b).max()) for a, b in zip(theirs, ours))
                agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(theirs, ours))
                rows.append(dict(dtype=dtype, kv_cache=cache, mb=round(path.stat().st_size / 1e6, 2),
                                 max_abs_logit_diff=diff, argmax_agree=agree))  # fmt: skip
    positions = sum(len(ids) for ids in prompts)
    print(f"{'dtype':6} {'KV cache':9} {'file MB':>8} {'max |Δ logit|':>14} {'same argmax':>12}")
    for r in rows:
        print(f"{r['dtype']:6} {r['kv_cache']:9} {r['mb']:8.2f} {r['max_abs_logit_diff']:14.2e} "
              f"{r['argmax_agree']:>7}/{positions}")  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = dict(checkpoint=str(ckpt.path), commit=commit, machine=platform.processor() or platform.machine(),
                  load_average=os.getloadavg(), positions=positions, rows=rows)  # fmt: skip
    out = Path(args.json or f"benchmarks/results/{datetime.date.today()}-gguf-parity-{commit}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
