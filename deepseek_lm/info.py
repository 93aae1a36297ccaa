"""`deepseek-lm info [--preset NAME | --checkpoint DIR]`: parameter counts and FLOPs per token.

The model is built on the meta device (no memory, no initialisation), so even the 1b preset answers at once;
a checkpoint is described from its config.json alone, without reading the weights.
"""

from __future__ import annotations

import json

import torch
from jsonargparse import ArgumentParser

from deepseek_lm.cli import parse_args
from deepseek_lm.config import PRESETS, DeepSeekConfig
from deepseek_lm.errors import UserError


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="deepseek-lm info",
        exit_on_error=False,
        description="Parameter counts (total, activated per token, embedding; multi-token-prediction modules "
        "apart) and training FLOPs per token of a model preset (default: seed) or of a checkpoint.",
    )
    p.add_argument("--preset", type=str | None, default=None, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--checkpoint", type=str | None, default=None, help="a checkpoint or run directory")
    p.add_argument("--seq-len", type=int | None, default=None, help="for FLOPs (default: the context length)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def describe(config: DeepSeekConfig, seq_len: int | None = None) -> dict:
    """Counts and FLOPs of `config`, from a model built on the meta device."""
    from deepseek_lm.model import DeepSeekLM

    with torch.device("meta"):
        model = DeepSeekLM(config)
    seq_len = seq_len or config.max_position_embeddings
    counts = model.param_counts()
    cache_bytes = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    mtp = config.num_nextn_predict_layers
    return dict(
        **counts,
        non_embedding=counts["total"] - counts["embedding"],
        seq_len=seq_len,
        flops_per_token=model.flops_per_token(seq_len),
        kv_cache_bytes_per_token_bf16=cache_bytes,
        mtp_modules=mtp,
        mtp_cache_bytes_per_token_bf16=(config.kv_lora_rank + config.qk_rope_head_dim) * 2 if mtp else 0,
    )


def _table(title: str, config: DeepSeekConfig, info: dict) -> str:
    c = config
    dense, moe = c.first_k_dense_replace, c.n_moe_layers
    rows = [
        ("total parameters", f"{info['total']:,}"),
        ("activated per token", f"{info['activated']:,}  ({100 * info['activated'] / info['total']:.1f} %)"),
        ("embedding", f"{info['embedding']:,}"),
        ("non-embedding", f"{info['non_embedding']:,}"),
        ("training FLOPs per token", f"{info['flops_per_token']:,}  (6 × active matmul weights + attention, seq_len {info['seq_len']})"),
        ("KV cache per token", f"{info['kv_cache_bytes_per_token_bf16']:,} bytes in bf16 (latent c_kv + k_pe)"),
        ("layers", f"{c.num_hidden_layers} ({dense} dense + {moe} MoE), hidden {c.hidden_size}, {c.num_attention_heads} heads"),
        ("MLA", f"q rank {c.q_lora_rank}, kv rank {c.kv_lora_rank}, head dims nope {c.qk_nope_head_dim} / rope {c.qk_rope_head_dim} / v {c.v_head_dim}"),
        ("MoE", f"{c.n_shared_experts} shared + {c.n_routed_experts} routed experts of {c.moe_intermediate_size}, top-{c.num_experts_per_tok}, {c.scoring_func}"),
        ("vocabulary, context", f"{c.vocab_size:,}, {c.max_position_embeddings:,}"),
    ]  # fmt: skip
    if info["mtp_modules"]:
        rows += [
            ("MTP modules", f"{info['mtp_modules']}: {info['mtp']:,} parameters ({info['mtp_activated']:,} activated per token), "
             "used only by training and speculative decoding; not in the counts above"),
            ("", f"share the embedding and head; FLOPs above include them; drafting caches "
             f"{info['mtp_cache_bytes_per_token_bf16']:,} more bytes per token"),
        ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _load(preset: str | None, checkpoint: str | None) -> tuple[str, DeepSeekConfig]:
    if preset and checkpoint:
        raise UserError("give either --preset or --checkpoint, not both")
    if checkpoint:
        from deepseek_lm.checkpoint import read_config_json, resolve_checkpoint

        path = resolve_checkpoint(checkpoint)
        return f"checkpoint {path}", read_config_json(path)[0]
    name = preset or "seed"
    return f"preset {name}", DeepSeekConfig.from_preset(name)


def main(argv: list[str]) -> int:
    args = parse_args(_parser(), argv)
    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError(f"--seq-len must be > 0, got {args.seq_len}")
    title, config = _load(args.preset, args.checkpoint)
    info = describe(config, args.seq_len)
    print(json.dumps({"model": title, **info}) if args.json else _table(title, config, info))
    return 0
