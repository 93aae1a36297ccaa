"""The bench's table: its rows (FIGURES, also the JSON keys of each implementation) and how they print."""

from __future__ import annotations

from typing import Any

from deepseek_lm.config import DeepSeekConfig

FIGURES = (  # (key, label, format, better): the table's rows and the JSON keys of each implementation
    ("train_tokens_per_s", "train tokens/s", "{:,.0f}", "higher"),
    ("train_forward_ms", "  forward ms/step", "{:.1f}", "lower"),
    ("train_backward_ms", "  backward ms/step", "{:.1f}", "lower"),
    ("train_optimizer_ms", "  optimizer ms/step", "{:.1f}", "lower"),
    ("mfu", "train MFU", "{:.1%}", "higher"),
    ("train_peak_mem_mb", "train peak memory MB", "{:,.0f}", "lower"),
    ("train_peak_rss_mb", "  peak RSS of the process MB", "{:,.0f}", "lower"),
    ("decode_tokens_per_s_b1", "decode tokens/s, b1, prompt {prompt}", "{:,.0f}", "higher"),
    ("decode_tokens_per_s_b8", "decode tokens/s, b8, prompt {prompt}", "{:,.0f}", "higher"),
    ("decode_tokens_per_s_b1_ctx2k", "decode tokens/s, b1, context {ctx}", "{:,.0f}", "higher"),
    ("prefill_ms_ctx2k", "  prefill {ctx_prompt} tokens ms", "{:,.1f}", "lower"),
    ("kv_cache_bytes_per_token", "KV cache bytes/token (all layers)", "{:,.0f}", "lower"),
)


def format_table(result: dict[str, Any]) -> str:
    s, m, ours, hf, ratio = (result[k] for k in ("settings", "machine", "ours", "hf", "ratio"))
    model = DeepSeekConfig.from_dict(s["model"])
    ctx_prompt = min(s["ctx_len"], model.max_position_embeddings) - s["ctx_new_tokens"]
    names = dict(prompt=s["prompt_len"], ctx=ctx_prompt + s["ctx_new_tokens"], ctx_prompt=ctx_prompt)
    lines = [
        f"deepseek-lm bench: preset {s['preset']}, {s['dtype']}, train batch {s['batch_size']} × {s['seq_len']}"
        + (f" × {s['grad_accum']} micro-batches" if s.get("grad_accum", 1) > 1 else "")
        + (", torch.compile" if s.get("compile") else ", eager"),
        f"machine: {m['cpu']} ({m['cores']} cores), device {m['device']}, torch {m['torch']}, "
        f"commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, {m['date']}",
        f"matmul peak {s['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s; load average {m['load_avg_1m']:.1f} → "
        f"{m['load_avg_1m_end']:.1f}; {s['rounds']} rounds, medians",
        "",
    ]
    header = f"{'':<38}{'ours':>12}" + (f"{'transformers':>14}{'ours/hf':>10}" if hf else "")
    lines += [header, "-" * len(header)]
    for key, label, fmt, _ in FIGURES:
        row = f"{label.format(**names):<38}{fmt.format(ours[key]):>12}"
        if hf:
            row += f"{fmt.format(hf[key]):>14}" + (f"{ratio[key]:>9.2f}×" if key in ratio else f"{'':>10}")
        lines.append(row)
    values = model.kv_lora_rank + model.qk_rope_head_dim
    lines.append(f"(KV cache: kv_lora_rank + qk_rope_head_dim = {values} values per token per layer)")
    if m["device"] == "cpu" and m["torch_threads"] > 1 and max(m["load_avg_1m"], m["load_avg_1m_end"]) > 0.5:
        lines.append(
            "note: other work was running. A multi-threaded op waits for its slowest thread, and a thread whose "
            "core is busy can wait a whole scheduler slice: such timings swing widely. --threads 1 is steadier."
        )
    return "\n".join(lines)
