"""Our engine and server beside llama.cpp's on the same weights and threads (SPEC §11: llama.cpp is the CPU
yardstick), in one command; a benchmark, never a test.

    python benchmarks/llama_cpp_compare.py --checkpoint runs/demo              # everything, ~10 minutes
    python benchmarks/llama_cpp_compare.py --checkpoint runs/demo --skip-serve --rounds 3

What it does:
1. builds llama.cpp once from the source vendored in the pinned llama-cpp-python sdist (deepseek_lm/bench/llama_cpp.py,
   cached under ~/.cache/deepseek-lm/llama.cpp);
2. converts the checkpoint with our own GGUF export (`deepseek-lm export --format gguf`, f32: the same
   weights; `--gguf FILE` takes a file made elsewhere instead);
3. decode at batch 1: llama-bench's tg (`-p 0 -n N -r 3`) against our `Engine` on its default path (greedy,
   a one-token prompt, tokens/s = (N - 1) / (t(N) - t(1)), so the prefill stays out; the median of three),
   at each `--threads`;
4. prefill: llama-bench's pp (`-p 512 -n 0`) against our `Engine` filling a 512-token prompt (and taking
   its first token), at each `--threads`;
5. serving: `llama-server` (`-np 16`, continuous batching) against `deepseek-lm serve` (16 slots), both
   with `--serve-threads` threads, for 1, 4 and 16 concurrent streaming greedy completions of 64 tokens
   (benchmarks/serve_load.py's client: tokens/s, time to first token, inter-token gaps).
Rounds alternate llama.cpp and ours for every figure; each figure is the median over rounds. The load
average is printed before and after; the table and JSON (benchmarks/results/) give ours / llama.cpp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepseek_lm.bench import llama_cpp
from deepseek_lm.generate.engine import Engine
from deepseek_lm.generate.sampling import SamplingConfig

sys.path.insert(0, str(Path(__file__).parent))
import serve_load

GREEDY = SamplingConfig(temperature=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint or run directory")
    p.add_argument(
        "--gguf", type=Path, default=None, help="an f32 GGUF of the checkpoint (default: export one)"
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="decode and prefill thread counts")
    p.add_argument("--serve-threads", type=int, default=2, help="threads of both servers")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per decode figure")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per streamed completion")
    p.add_argument("--skip-serve", action="store_true", help="decode and prefill only")
    p.add_argument("--cache", type=Path, default=None, help="llama.cpp's build cache directory")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/DATE-llama-cpp-...")
    args = p.parse_args()
    info = dict(
        commit=serve_load._commit(), date=time.strftime("%Y-%m-%d %H:%M"), cpus=os.cpu_count(),
        machine=platform.processor() or platform.machine(), torch=torch.__version__,
        llama_cpp_python=llama_cpp.VERSION, checkpoint=args.checkpoint, rounds=args.rounds,
        load_before=os.getloadavg(),
    )  # fmt: skip
    print(" · ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    bin_dir = llama_cpp.ensure_built(args.cache)
    _build_libraries(args.checkpoint, max(args.clients))
    with tempfile.TemporaryDirectory(prefix="llama-cpp-compare-") as tmp:
        gguf = args.gguf or _export_gguf(args.checkpoint, Path(tmp))
        table = _decode_and_prefill(args, bin_dir, gguf)
        if not args.skip_serve:
            table.update(_serving(args, bin_dir, gguf))
    info["load_after"] = os.getloadavg()
    _print(table, info)
    out = (
        args.json
        or Path(__file__).parent
        / "results"
        / f"{time.strftime('%Y-%m-%d')}-llama-cpp-compare-{info['commit']}.json"
    )
    out.write_text(json.dumps(dict(info=info, results=table), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _build_libraries(checkpoint: str, slots: int) -> None:
    """Our compiled steps (model/aot.py) built into their disk cache by another process, once: the measured
    processes (this one, the server) only load them, and no compile's leftovers share their heap."""
    code = (
        "import sys\n"
        "from deepseek_lm.checkpoint import load_checkpoint\n"
        "from deepseek_lm.generate.batching import BatchEngine\n"
        "from deepseek_lm.generate.engine import Engine\n"
        "ckpt = load_checkpoint(sys.argv[1])\n"
        "Engine(ckpt.model, ckpt.tokenizer).generate_ids([[0, 1, 2]], 2)  # one row, a short prompt\n"
        "BatchEngine(ckpt.model, ckpt.tokenizer, max_batch_size=int(sys.argv[2])).start().close()\n"
    )
    print("building (or finding) our compiled decode steps", flush=True)
    result = subprocess.run(
        [sys.executable, "-c", code, checkpoint, str(slots)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"building our compiled steps failed: {result.stderr.strip()[-800:]}")


def _export_gguf(checkpoint: str, tmp: Path) -> Path:
    out = tmp / "model-f32.gguf"
    cmd = [sys.executable, "-m", "deepseek_lm", "export", "--checkpoint", checkpoint, "--format", "gguf", "--dtype", "f32",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"deepseek-lm export --format gguf failed: {result.stderr.strip()[-500:]}")
    return out


# decode and prefill ----------------------------------------------------------------------------------------


def _decode_and_prefill(args, bin_dir: Path, gguf: Path) -> dict[str, dict]:
    """-> {figure: {llama.cpp, ours, ratio}} for decode and prefill at each thread count."""
    engine = Engine.from_checkpoint(args.checkpoint)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.model.config.vocab_size, (args.prefill_tokens,), generator=gen).tolist()
    rows: dict[str, dict[str, list[float]]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        engine = Engine.from_checkpoint(args.checkpoint)  # a fresh engine: its steps built for these threads
        _ours_decode(engine, 8)  # compile or load its step, warm the caches
        _ours_prefill(engine, prompt)
        decode, prefill = (
            f"decode b1, {threads} thread(s), tokens/s",
            f"prefill {len(prompt)}, {threads} thread(s), tokens/s",
        )
        for r in range(args.rounds):
            ours_first = r % 2 == 1  # who goes first alternates
            for who in ("ours", "llama.cpp") if ours_first else ("llama.cpp", "ours"):
                if who == "ours":  # as llama-bench's -r 3: three runs each
                    d = statistics.median(_ours_decode(engine, args.decode_tokens) for _ in range(3))
                    pf = statistics.median(_ours_prefill(engine, prompt) for _ in range(3))
                else:
                    d = _llama_bench(bin_dir, gguf, threads, 0, args.decode_tokens)
                    pf = _llama_bench(bin_dir, gguf, threads, len(prompt), 0)
                rows.setdefault(decode, {}).setdefault(who, []).append(d)
                rows.setdefault(prefill, {}).setdefault(who, []).append(pf)
            print(
                f"{threads} thread(s), round {r + 1}/{args.rounds} · load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    torch.set_num_threads(max(args.threads))
    return {k: _ratio(v) for k, v in rows.items()}


def _ours_decode(engine: Engine, n: int) -> float:
    """Tokens/s of greedy decoding at batch 1 after a one-token prompt, the prefill left out. The end of
    text does not stop it (llama-bench's tg decodes its n tokens whatever they are)."""
    prompt, eos = [[engine.eos_token_id or 0]], engine.eos_token_id
    engine.eos_token_id = None
    try:
        t = time.perf_counter()
        engine.generate_ids(prompt, 1, sampling=GREEDY)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        engine.generate_ids(prompt, n, sampling=GREEDY)
        tn = time.perf_counter() - t
    finally:
        engine.eos_token_id = eos
    return (n - 1) / (tn - t1)


def _ours_prefill(engine: Engine, prompt: list[int]) -> float:
    t = time.perf_counter()
    engine.generate_ids([prompt], 1, sampling=GREEDY)
    return len(prompt) / (time.perf_counter() - t)


def _llama_bench(bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int) -> float:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", "3", "-o", "json"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"llama-bench failed: {result.stderr.strip()[-800:]}")
    return float(json.loads(result.stdout)[0]["avg_ts"])


def _ratio(values: dict[str, list[float]]) -> dict:
    ours, theirs = statistics.median(values["ours"]), statistics.median(values["llama.cpp"])
    return {"llama.cpp": theirs, "ours": ours, "ours / llama.cpp": ours / theirs, "rounds": values}


# serving ---------------------------------------------------------------------------------------------------


def _serving(args, bin_dir: Path, gguf: Path) -> dict[str, dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.serve_threads))
    slots = max(args.clients)
    ours_args = argparse.Namespace(
        checkpoint=args.checkpoint, max_batch_size=slots, compile=False, prefill_chunk=256
    )
    servers = [serve_load._start_ours(ours_args, env), _start_llama_server(bin_dir, gguf, args, slots, env)]
    prompts = (serve_load.PROMPTS * (slots // len(serve_load.PROMPTS) + 1))[:slots]
    results: dict[str, list[dict]] = {}
    try:
        for s in servers:
            asyncio.run(serve_load._concurrent(s, prompts[:2], 8))
        for r in range(args.rounds):
            for n in args.clients:
                for s in servers if r % 2 == 0 else servers[::-1]:
                    out = asyncio.run(serve_load._concurrent(s, prompts[:n], args.max_tokens))
                    results.setdefault(f"{s.name} | {n} clients", []).append(serve_load._summary(out))
            print(f"serving, round {r + 1}/{args.rounds} · load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for s in servers:
            s.stop()
    table = {}
    for n in args.clients:
        ours = serve_load._median(results[f"deepseek-lm serve | {n} clients"])
        theirs = serve_load._median(results[f"llama-server | {n} clients"])
        table[f"serve {n} client(s), tokens/s"] = {
            "llama.cpp": theirs["tokens_per_s"], "ours": ours["tokens_per_s"],
            "ours / llama.cpp": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "ttft_p50_ms": {"llama.cpp": theirs["ttft_p50"] * 1e3, "ours": ours["ttft_p50"] * 1e3},
            "ttft_p95_ms": {"llama.cpp": theirs["ttft_p95"] * 1e3, "ours": ours["ttft_p95"] * 1e3},
            "itl_p50_ms": {"llama.cpp": theirs["itl_p50"] * 1e3, "ours": ours["itl_p50"] * 1e3},
        }  # fmt: skip
    return table


def _start_llama_server(bin_dir: Path, gguf: Path, args, slots: int, env: dict) -> serve_load.Server:
    port = serve_load._free_port()
    ctx = slots * 256  # each slot holds a prompt and its 64 new tokens with room to spare
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(args.serve_threads), "-tb", str(args.serve_threads), "-np", str(slots), "-c", str(ctx),
           "-cb", "--no-webui", "-a", "llama"]  # fmt: skip
    return serve_load.Server("llama-server", cmd, f"http://127.0.0.1:{port}", "llama", env, "/health")


def _print(table: dict, info: dict) -> None:
    print(f"\n{'figure':<44}{'llama.cpp':>12}{'ours':>12}{'ours / llama.cpp':>20}")
    for k, v in table.items():
        print(f"{k:<44}{v['llama.cpp']:>12,.0f}{v['ours']:>12,.0f}{v['ours / llama.cpp']:>19.2f}×")
        if "ttft_p50_ms" in v:
            t50, t95 = v["ttft_p50_ms"], v["ttft_p95_ms"]
            print(f"{'  time to first token p50 / p95 ms':<44}{t50['llama.cpp']:>6.0f} /{t95['llama.cpp']:>4.0f}"
                  f"{t50['ours']:>6.0f} /{t95['ours']:>4.0f}")  # fmt: skip
    print(f"load average before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
