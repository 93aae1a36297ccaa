"""`deepseek-lm bench --checkpoint DIR --speculative`: self-speculative decoding against plain decoding on a
trained checkpoint with an MTP module (acceptance on random weights means nothing).

    deepseek-lm bench --checkpoint runs/mtp --speculative                      greedy, batch 1 and 8, eager
    deepseek-lm bench --checkpoint runs/mtp --speculative --draft-tokens 2 --threads 1 --json spec.json
    deepseek-lm bench --checkpoint runs/mtp --speculative --compile

Prompts are windows of `--prompt-len` tokens from the validation split of the data the checkpoint was trained
on (or `--data-dir`), at evenly spaced offsets: natural text, which the acceptance rate depends on. Each
figure decodes `--new-tokens` tokens with the end of text switched off, through `Engine.generate_ids`, plain
and speculative in turn (same prompts, same round); decode tokens/s = B·(n − 1) / (t(n) − t(1)) as the main
bench's, so the prefill is left out. Figures are medians over `--rounds` rounds, each round on other prompts.
Acceptance = drafts accepted / drafts proposed over the timed rounds; tokens per round = the tokens a row
gets per verification forward (1 + accepted drafts).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.errors import UserError

FIGURES = [  # (name, batch size of the figure: 1 or the decode batch, sampling)
    ("b1_greedy", 1, dict(temperature=0.0)),
    ("b8_greedy", 8, dict(temperature=0.0)),
    ("b1_sampled", 1, dict(temperature=0.8, top_k=200)),
]


def run(cfg: Any, log) -> dict[str, Any]:
    """cfg: the bench's `BenchConfig` (checkpoint, draft_tokens, data_dir, prompt_len, new_tokens,
    decode_batch, rounds, compile, threads, seed)."""
    from deepseek_lm.bench.machine import machine_info
    from deepseek_lm.checkpoint import load_checkpoint
    from deepseek_lm.generate import Engine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(cfg.checkpoint)
    if not ckpt.config.num_nextn_predict_layers:
        raise UserError(
            f"--speculative: {ckpt.path} has no MTP modules (num_nextn_predict_layers=0); train one with "
            "--model.num_nextn_predict_layers 1"
        )
    machine = machine_info(torch.device("cpu"))
    plain, fast = Engine(ckpt.model, compile=cfg.compile), Engine(ckpt.model, compile=cfg.compile, speculative=True,
                                                                  draft_tokens=cfg.draft_tokens)  # fmt: skip
    for engine in (plain, fast):
        engine.eos_token_id = None  # decode exactly n tokens
    prompts = _prompts(ckpt, cfg)
    figures = {name: (cfg.decode_batch if batch == 8 else 1, sampling) for name, batch, sampling in FIGURES}
    _warm_up(plain, fast, prompts, figures, cfg)
    samples = {name: {"plain": [], "speculative": []} for name in figures}
    stats = {name: [0, 0, 0] for name in figures}  # drafts proposed, accepted, row-rounds
    for r in range(cfg.rounds):
        for name, (batch, sampling) in figures.items():
            rows = [prompts[(r * batch + i) % len(prompts)] for i in range(batch)]
            samples[name]["plain"].append(_tokens_per_s(plain, rows, cfg.new_tokens, sampling, cfg.seed))
            samples[name]["speculative"].append(_tokens_per_s(fast, rows, cfg.new_tokens, sampling, cfg.seed))
            s = fast.speculative_stats
            stats[name] = [a + b for a, b in zip(stats[name], [s.drafted, s.accepted, sum(s.histogram)])]
        log(f"round {r + 1}/{cfg.rounds}: " + ", ".join(
            f"{name} {samples[name]['plain'][-1]:,.0f} → {samples[name]['speculative'][-1]:,.0f} tok/s"
            for name in figures))  # fmt: skip
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    result: dict[str, Any] = {"figures": {}, "machine": machine}
    for name, (batch, sampling) in figures.items():
        p, s = (statistics.median(samples[name][k]) for k in ("plain", "speculative"))
        drafted, accepted, row_rounds = stats[name]
        result["figures"][name] = {
            "batch": batch, "sampling": sampling, "plain_tokens_per_s": p, "speculative_tokens_per_s": s,
            "ratio": s / p, "acceptance": accepted / max(drafted, 1),
            "tokens_per_round": (row_rounds + accepted) / max(row_rounds, 1),
        }  # fmt: skip
    result["settings"] = {
        "checkpoint": str(ckpt.path), "draft_tokens": cfg.draft_tokens, "compile": cfg.compile,
        "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "rounds": cfg.rounds, "prompts": len(prompts),
        "model": ckpt.config.to_dict(),
    }  # fmt: skip
    return result


def _prompts(ckpt: Any, cfg: Any) -> list[list[int]]:
    """Windows of the validation split, evenly spaced (as many as the figures' rows over all rounds)."""
    from deepseek_lm.data import PreparedData
    from deepseek_lm.generate.evaluate import _check_same_tokenizer, _data_dir

    data_dir = _data_dir(ckpt, cfg.data_dir)
    if not (Path(data_dir) / "manifest.json").is_file():
        raise UserError(
            f"{data_dir}: no prepared data to take prompts from (the checkpoint's training data); "
            "pass --data-dir DIR, a directory written by `deepseek-lm prepare` with its tokenizer"
        )
    data = PreparedData.open(data_dir)
    _check_same_tokenizer(ckpt, data)
    tokens = data.tokens("val")
    n = cfg.rounds * cfg.decode_batch
    if len(tokens) < cfg.prompt_len * n:
        raise UserError(
            f"{data_dir}: the validation split is too short for {n} prompts of {cfg.prompt_len} tokens"
        )
    step = len(tokens) // n
    return [tokens[i * step : i * step + cfg.prompt_len].astype("int64").tolist() for i in range(n)]


def _warm_up(plain, fast, prompts, figures, cfg) -> None:
    """First calls pay for allocations; compiled ones for each shape (and cache length) they meet."""
    from deepseek_lm.generate import SamplingConfig

    for batch, sampling in figures.values():
        for engine in (plain, fast):
            engine.generate_ids(prompts[:batch], cfg.new_tokens, sampling=SamplingConfig(**sampling), seed=0)


def _tokens_per_s(engine, rows: list[list[int]], n: int, sampling: dict, seed: int) -> float:
    from deepseek_lm.generate import SamplingConfig

    config = SamplingConfig(**sampling)

    def timed(n_tokens: int) -> float:
        start = time.perf_counter()
        engine.generate_ids(rows, n_tokens, sampling=config, seed=seed)
        return time.perf_counter() - start

    t1 = timed(1)
    tn = timed(n)  # last: the engine's speculative_stats are this call's
    return len(rows) * (n - 1) / max(tn - t1, 1e-9)


def format_table(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"deepseek-lm bench --speculative: {s['checkpoint']}, {s['draft_tokens']} draft token(s) per round, "
        f"{'torch.compile' if s['compile'] else 'eager'}; {s['prompt_len']}-token prompts from the validation "
        f"split, {s['new_tokens']} new tokens, {s['rounds']} rounds, medians",
        f"machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}, "
        f"commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, {m['date']}; load average "
        f"{m['load_avg_1m']:.1f} → {m['load_avg_1m_end']:.1f}",
        "",
    ]
    header = f"{'decode tokens/s':<34}{'plain':>10}{'speculative':>13}{'ratio':>8}{'acceptance':>12}{'tokens/round':>14}"
    lines += [header, "-" * len(header)]
    for f in result["figures"].values():
        kind = (
            "greedy" if f["sampling"]["temperature"] == 0 else f"sampled T={f['sampling']['temperature']:g}"
        )
        label = f"batch {f['batch']}, {kind}"
        lines.append(
            f"{label:<34}{f['plain_tokens_per_s']:>10,.0f}{f['speculative_tokens_per_s']:>13,.0f}"
            f"{f['ratio']:>7.2f}×{100 * f['acceptance']:>11.1f}%{f['tokens_per_round']:>14.2f}"
        )
    return "\n".join(lines)
