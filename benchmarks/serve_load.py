"""Load test of `deepseek-lm serve`, optionally against `transformers serve` on the HF export of the same
checkpoint, in one run (SPEC §8: a benchmark, never a test).

    python benchmarks/serve_load.py --checkpoint runs/demo                       # ours: 1, 4, 16 clients
    python benchmarks/serve_load.py --checkpoint runs/demo --compare-hf --json benchmarks/results/X.json
    python benchmarks/serve_load.py --checkpoint runs/demo --compare-hf continuous-batching   # one mode
    python benchmarks/serve_load.py --checkpoint runs/mtp --speculative          # also ours --speculative
    python benchmarks/serve_load.py --checkpoint runs/chat --workload chat       # 4-turn chats, prefix cache

`--compare-hf` runs `transformers serve` (needs `accelerate`) in its default mode (one request at a time) and
with `--continuous-batching` (paged attention), each on the same export. `--speculative` also runs our
server with `--speculative --draft-tokens D` on the same checkpoint (it needs MTP modules), and reports the
acceptance rate of its drafts from the responses' usage.

For each number of clients N, N streaming /v1/completions requests (greedy, `--max-tokens` new tokens, each
its own prompt) start at once; per request the time to first token (TTFT: from sending to the first text)
and the gaps between its text chunks (inter-token latency, ITL); aggregate tokens/s = all completion tokens
over the wall time from the first send to the last end. The same N requests are also sent one at a time to
our server (the batching gain). Servers run as subprocesses on 127.0.0.1, one measured at a time (the other
idles); rounds alternate the servers and each figure is the median over rounds. The load average is printed
before and after: figures taken on a busy machine say so.

`--workload chat`: each client holds a --turns-turn conversation (/v1/chat/completions, streamed, greedy,
--max-tokens per answer; a system message, then one question per turn, each turn re-sending the history
with the answers so far, `--think-ms` after the answer: 0, a program that asks at once; a person reads
first), the N clients at once; the same against our server with its prefix cache (the default) and with
`--prefix-cache-mb 0`, rounds alternating. Reported: the time to first token of each turn (median over
clients and rounds), for the later turns with the cache over without, and the cache's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# prompts in the style of the built-in corpus (Python docstrings), 6-40 tokens each
PROMPTS = [
    "Return the number of items in a container.",
    "This module provides access to the mathematical functions defined by the C standard.",
    "The following functions are provided:",
    "Open a file and return a stream. Raise OSError upon failure.",
    "A class that represents a thread of control.",
    "Convert a string to a floating point number, if possible.",
    "def get(self, key, default=None):",
    "Encode the object as an enumerated type.",
    "This method is called when the iterator is exhausted.",
    "Create a new dictionary with keys from iterable and values set to value.",
    "Support for regular expressions (RE). This module provides regular expression matching operations",
    "Return a new set with elements common to the set and all others.",
    "The socket module exports the following constants:",
    "Read and return up to n bytes. If the argument is omitted, None, or negative, reads and",
    "Wait until the thread terminates.",
    "Raised when an operation or function is applied to an object of inappropriate type.",
]


# a chat's system message and each conversation's questions (the instruction set's kind)
SYSTEM = (
    "You answer questions about the Python standard library: what a module, a class or a function is for, "
    "what arguments it takes and what it returns. Answer in one or two sentences, name the module, and say "
    "when a function is deprecated or has a faster alternative."
)
CHAT_TURNS = [
    ["What is the `json` module for?", "What does `json.dumps` do?", "What arguments does it take?",
     "Which module provides `loads`?"],
    ["What is `collections.deque`?", "Which methods does it have?", "What does `appendleft` do?",
     "What is the `collections` module for?"],
    ["What does `os.path.join` do?", "What is its signature?", "What does `os.path.exists` do?",
     "Which module provides `getcwd`?"],
    ["What is the `re` module for?", "What does `re.compile` do?", "How do I call `re.sub`?",
     "What is `re.Match`?"],
]  # fmt: skip


class Server:
    def __init__(self, name: str, cmd: list[str], url: str, model: str, env: dict, ready: str) -> None:
        self.name, self.url, self.model = name, url, model
        fd, self.log = tempfile.mkstemp(prefix=f"serve-load-{name.replace(' ', '-')}-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, env=env, text=True)
        os.close(fd)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited at start: {Path(self.log).read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{name} did not start in 300 s (log: {self.log})")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _one(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> dict:
    body = dict(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    body["stream_options"] = {"include_usage": True}
    sent, times, usage, text = time.perf_counter(), [], None, []
    async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            piece = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
    tokens = usage["completion_tokens"] if usage else len(times)
    spec = (usage or {}).get("speculative") or {}
    return dict(sent=sent, end=time.perf_counter(), times=times, tokens=tokens, text="".join(text),
                drafted=spec.get("drafted_tokens", 0), accepted=spec.get("accepted_tokens", 0))  # fmt: skip


async def _concurrent(server: Server, prompts: list[str], max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(_one(client, server, p, max_tokens) for p in prompts))


async def _sequential(server: Server, prompts: list[str], max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=600) as client:
        return [await _one(client, server, p, max_tokens) for p in prompts]


async def _conversation(
    client: httpx.AsyncClient, server: Server, questions: list[str], max_tokens: int, think: float
):
    """One client's chat, turn by turn, `think` seconds between an answer and the next question -> per turn
    the time to first token (s) and the tokens generated."""
    messages, turns = [{"role": "system", "content": SYSTEM}], []
    for i, question in enumerate(questions):
        if i:
            await asyncio.sleep(think)
        messages.append({"role": "user", "content": question})
        body = dict(model=server.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})  # fmt: skip
        sent, first, text, usage = time.perf_counter(), None, [], {}
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise SystemExit(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                piece = "".join(
                    (c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or []
                )
                if piece and first is None:
                    first = time.perf_counter()
                text.append(piece)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        turns.append(dict(ttft=(first or time.perf_counter()) - sent, tokens=usage.get("completion_tokens", 0),
                          prompt=usage.get("prompt_tokens", 0), cached=cached))  # fmt: skip
        messages.append({"role": "assistant", "content": "".join(text)})
    return turns


async def _chats(
    server: Server, n: int, turns: int, max_tokens: int, tag: str, think: float = 0.0
) -> list[list[dict]]:
    talks = [CHAT_TURNS[i % len(CHAT_TURNS)][:turns] for i in range(n)]
    # each conversation its own history (nothing cached from another round or client): the first question
    # is tagged with the round and the client
    talks = [[f"({tag}.{i + 1}) {t[0]}", *t[1:]] for i, t in enumerate(talks)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 4)) as client:
        return await asyncio.gather(*(_conversation(client, server, t, max_tokens, think) for t in talks))


def _chat_workload(args, env) -> int:
    info = _info(args)
    servers = [_start_ours(args, env), _start_ours(args, env, extra=["--prefix-cache-mb", "0"])]
    servers[1].name = "deepseek-lm serve --prefix-cache-mb 0"
    results: dict[str, list] = {}
    try:
        for s in servers:
            asyncio.run(_chats(s, 2, 1, 8, "warm-up"))
        for r in range(args.rounds):
            for n in args.clients:
                for s in servers:
                    talks = asyncio.run(
                        _chats(s, n, args.turns, args.max_tokens, f"{r}.{n}", args.think_ms / 1e3)
                    )
                    results.setdefault(f"{s.name} | {n}", []).extend(talks)
            print(f"round {r + 1}/{args.rounds} done · load {os.getloadavg()[0]:.1f}", flush=True)
        counters = _prefix_cache_counters(servers[0])
    finally:
        for s in servers:
            s.stop()
    info["load_after"] = os.getloadavg()
    table = {
        key: [dict(ttft_p50=statistics.median(t[k]["ttft"] for t in talks),
                   prompt=statistics.median(t[k]["prompt"] for t in talks),
                   cached=statistics.median(t[k]["cached"] for t in talks)) for k in range(args.turns)]
        for key, talks in results.items()
    }  # fmt: skip
    print(f"\n{'server | clients':<48}" + "".join(f"{'turn ' + str(k + 1):>22}" for k in range(args.turns)))
    print(f"{'':<48}" + "".join(f"{'TTFT ms (prompt/cached)':>22}" for _ in range(args.turns)))
    for key, turns in table.items():
        cells = [f"{1e3 * t['ttft_p50']:.1f} ({t['prompt']:.0f}/{t['cached']:.0f})" for t in turns]
        print(f"{key:<48}" + "".join(f"{c:>22}" for c in cells))
    for n in args.clients:
        on, off = table[f"{servers[0].name} | {n}"], table[f"{servers[1].name} | {n}"]
        ratios = [a["ttft_p50"] / b["ttft_p50"] for a, b in zip(on[1:], off[1:])]
        print(f"{n} clients, turns 2-{args.turns}: TTFT with the prefix cache / without: "
              + ", ".join(f"{x:.2f}x" for x in ratios))  # fmt: skip
    print(
        "prefix cache (the run, warm-up included): " + ", ".join(f"{k} {v:.0f}" for k, v in counters.items())
    )
    print(f"load average before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}")
    if args.json:
        out = dict(info=info, results=table, prefix_cache=counters, raw=results)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _prefix_cache_counters(server: Server) -> dict[str, float]:
    """The server's prefix-cache series from /metrics: prompts and tokens looked up and reused, tokens
    prefilled ahead of a next turn."""
    page = httpx.get(f"{server.url}/metrics", timeout=30).text
    prefix = "deepseek_lm_prefix_cache_"
    return {
        line.split()[0].removeprefix(prefix).removesuffix("_total"): float(line.split()[1])
        for line in page.splitlines()
        if line.startswith(prefix) and not line.split()[0].endswith("_created")
    }


def _summary(results: list[dict]) -> dict:
    start, end = min(r["sent"] for r in results), max(r["end"] for r in results)
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    drafted, accepted = sum(r["drafted"] for r in results), sum(r["accepted"] for r in results)
    return dict(
        tokens=tokens, seconds=end - start, tokens_per_s=tokens / (end - start),
        ttft_p50=_pct(ttft, 50), ttft_p95=_pct(ttft, 95), itl_p50=_pct(itl, 50), itl_p95=_pct(itl, 95),
        acceptance=accepted / drafted if drafted else float("nan"),
    )  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _median(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DEEPSEEK_LM_COMMIT", "unknown")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ours(args, env, speculative: bool = False, extra: list[str] = ()) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "deepseek_lm", "serve", "--checkpoint", args.checkpoint, "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--model-name", "ours", "--max-queue", "256",
           "--prefill-chunk", str(args.prefill_chunk), *extra]  # fmt: skip
    name = "deepseek-lm serve"
    if args.compile:
        cmd.append("--compile")
    if speculative:
        cmd += ["--speculative", "--draft-tokens", str(args.draft_tokens)]
        name += " --speculative"
    return Server(name, cmd, f"http://127.0.0.1:{port}", "ours", env, "/health")


def _start_transformers(mode: str, env, export_dir: Path) -> Server:
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    port = _free_port()
    cmd = [exe, "serve", str(export_dir), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
           "--dtype", "float32", "--log-level", "warning"]  # fmt: skip
    name = "transformers serve"
    if mode == "continuous-batching":
        cmd.append("--continuous-batching")
        name += " --continuous-batching"
    return Server(name, cmd, f"http://127.0.0.1:{port}", str(export_dir), env, "/health")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint or run directory")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=16, help="our server's slots")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both servers")
    p.add_argument("--compile", action="store_true", help="our server with --compile")
    p.add_argument("--speculative", action="store_true", help="also our server with --speculative")
    p.add_argument("--draft-tokens", type=int, default=1, help="with --speculative: drafts per round")
    p.add_argument(
        "--compare-hf", nargs="*", choices=["default", "continuous-batching"], default=None,
        help="also `transformers serve` on our HF export, in these modes (none given: both)",
    )  # fmt: skip
    p.add_argument("--prefill-chunk", type=int, default=256, help="our servers' --prefill-chunk")
    p.add_argument("--workload", choices=["completions", "chat"], default="completions")
    p.add_argument("--turns", type=int, default=4, help="--workload chat: turns per conversation")
    p.add_argument(
        "--think-ms",
        type=float,
        default=0,
        help="--workload chat: pause between an answer and the next question",
    )
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.workload == "chat":
        return _chat_workload(args, env)
    prompts = (PROMPTS * (max(args.clients) // len(PROMPTS) + 1))[: max(args.clients)]
    info = _info(args)
    servers = [_start_ours(args, env)]
    if args.speculative:
        servers.append(_start_ours(args, env, speculative=True))
    tmp = None
    if args.compare_hf is not None:
        tmp = Path(tempfile.mkdtemp(prefix="serve-load-hf-"))
        export = [sys.executable, "-m", "deepseek_lm", "export", "--checkpoint", args.checkpoint, "--format",
                  "hf", "--out", str(tmp / "hf")]  # fmt: skip
        subprocess.run(export, check=True, env=env, stdout=subprocess.DEVNULL)
        for mode in args.compare_hf or ["default", "continuous-batching"]:
            servers.append(_start_transformers(mode, env, tmp / "hf"))
    results: dict[str, list[dict]] = {}
    texts: dict[str, list[str]] = {}
    try:
        for s in servers:  # warm-up: first requests pay one-off costs (primitives, caches)
            asyncio.run(_concurrent(s, prompts[:2], 8))
        for r in range(args.rounds):
            for n in args.clients:
                for s in servers:
                    out = asyncio.run(_concurrent(s, prompts[:n], args.max_tokens))
                    results.setdefault(f"{s.name} | {n} concurrent", []).append(_summary(out))
                    texts[f"{s.name} | {n}"] = [o["text"] for o in out]
            n = max(args.clients)
            out = asyncio.run(_sequential(servers[0], prompts[:n], args.max_tokens))
            results.setdefault(f"{servers[0].name} | {n} one at a time", []).append(_summary(out))
            print(f"round {r + 1}/{args.rounds} done · load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for s in servers:
            s.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = {k: _median(v) for k, v in results.items()}
    info["load_after"] = os.getloadavg()
    _print(table, info, args)
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(info=info, results=table, rounds=results), indent=2) + "\n"
        )
    return 0


def _info(args) -> dict:
    info = dict(
        commit=_commit(), date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(), threads=args.threads or "default", load_before=os.getloadavg(),
        max_tokens=args.max_tokens, rounds=args.rounds, checkpoint=args.checkpoint, workload=args.workload,
        prefill_chunk=args.prefill_chunk, draft_tokens=args.draft_tokens if args.speculative else None,
        think_ms=args.think_ms if args.workload == "chat" else None,
    )  # fmt: skip
    print(" · ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    return info


def _print(table: dict, info: dict, args) -> None:
    print(
        f"\n{'server | clients':<44}{'tokens/s':>10}{'TTFT p50':>10}{'p95':>8}{'ITL p50':>10}{'p95':>8}  ms"
    )
    for k, v in table.items():
        accepted = "" if v["acceptance"] != v["acceptance"] else f"  {100 * v['acceptance']:.1f} % accepted"
        print(f"{k:<44}{v['tokens_per_s']:>10.0f}{v['ttft_p50'] * 1e3:>10.0f}{v['ttft_p95'] * 1e3:>8.0f}"
              f"{v['itl_p50'] * 1e3:>10.1f}{v['itl_p95'] * 1e3:>8.1f}{accepted}")  # fmt: skip
    for c in args.clients:
        if (spec := table.get(f"deepseek-lm serve --speculative | {c} concurrent")) is not None:
            plain = table[f"deepseek-lm serve | {c} concurrent"]
            print(f"{c} concurrent, --speculative / plain: {spec['tokens_per_s'] / plain['tokens_per_s']:.2f}× "
                  f"tokens/s, time to first token p50 {spec['ttft_p50'] / plain['ttft_p50']:.2f}×")  # fmt: skip
    n = max(args.clients)
    ours = table[f"deepseek-lm serve | {n} concurrent"]["tokens_per_s"]
    alone = table[f"deepseek-lm serve | {n} one at a time"]["tokens_per_s"]
    print(f"\n{n} concurrent / one at a time (ours): {ours / alone:.2f}×")
    for name in ("transformers serve", "transformers serve --continuous-batching"):
        if (hf := table.get(f"{name} | {n} concurrent")) is not None:
            print(f"{n} concurrent, ours / {name}: {ours / hf['tokens_per_s']:.2f}×")
    print(f"load average before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
