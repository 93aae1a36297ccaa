"""Per-process training-state memory with and without expert parallelism (exact element counts), and the
bytes each process moves per MoE layer for its experts (arithmetic); no GPU needed.

    python benchmarks/expert_parallel_memory.py                      # 100m and 1b presets, 8 processes
    python benchmarks/expert_parallel_memory.py --presets 1b --world-sizes 8 16 32

Each layout is built the way `deepseek-lm train` builds it, on the meta device and over torch's fake process
group (rank 0 of W; nothing is allocated or sent): the model, `expert_parallel.shard_experts` for EP and
`distributed.wrap_model(fsdp=True)` for FSDP2. The counts are rank 0's local elements (FSDP2 gives rank 0
the ceil-sized dim-0 chunk, the largest). Bytes: fp32 weights + fp32 gradients + AdamW's two fp32 moments
= 16 B per element, what stays resident between steps (activations, FSDP2's transient unsharded bf16 copies
and DDP's gradient buckets — another 4 B per element DDP reduces — come on top).

Traffic per MoE layer and micro-batch (the preset's training micro-batch × sequence, bf16 compute, balanced
routing; the dense parameters' reductions are the same in every layout and left out), each process:
  FSDP2 over W     all-gathers the layer's E experts for the forward and again for the backward (bf16) and
                   reduce-scatters their gradients (fp32): (W-1)/W · P · (2 + 2 + 4) B, P = E·3·D·I
  EP over N        all-to-alls its T·K token rows out and the outputs back, in the forward and again in the
                   backward (and once more for the recomputed forward under gradient checkpointing), bf16:
                   (4 or 6) · T·K·D · 2 B · (N-1)/N; with FSDP2 also the first line's traffic for its E/N
                   experts over their W/N replicas
  DDP              nothing per micro-batch: the experts' gradients are all-reduced once per step (over all W
                   processes, or with EP over the W/N replicas of each shard)
EP moves less than FSDP2 once T·K < 2·E·I (3·E·I without checkpointing), roughly: many large experts, few
tokens per process.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model.transformer import DeepSeekLM
from deepseek_lm.train import distributed as D
from deepseek_lm.train import expert_parallel as EP
from deepseek_lm.train.config import TRAIN_PRESETS

BYTES_PER_ELEMENT = 4 + 4 + 8  # weight, gradient, AdamW exp_avg + exp_avg_sq (all fp32)


def local_elements(config: DeepSeekConfig, world_size: int, ep_size: int, fsdp: bool) -> tuple[int, int]:
    """(all, routed experts') elements rank 0 holds in this layout."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with torch.device("meta"):
            model = DeepSeekLM(config)
        ep = EP.setup(ep_size, world_size, config.n_routed_experts, len(model.moe_layers()), "bf16", 60)
        if ep is not None:
            EP.shard_experts(model, ep)
        if fsdp:
            info = D.DistInfo(0, world_size, 0, "fake")
            model = D.wrap_model(model, info, torch.device("cpu"), fsdp=True, ep=ep)
        routed = {id(p) for _, p in EP.routed_parameters(model)}
        count = [(p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()]
        routed_count = [n for n, p in zip(count, model.parameters()) if id(p) in routed]
        return sum(count), sum(routed_count)
    finally:
        dist.destroy_process_group()


def traffic_mb(config: DeepSeekConfig, tokens: int, world: int, ep_size: int, fsdp: bool, recompute: bool):
    """MB one process moves per MoE layer and micro-batch for the routed experts (see above); None for plain
    DDP, whose only expert traffic is the step's gradient all-reduce (as DDP + EP's over the replicas)."""
    E, D, K = config.n_routed_experts, config.hidden_size, config.num_experts_per_tok
    P = E * 3 * D * config.moe_intermediate_size
    replicas = world // ep_size  # FSDP2 shards the local experts over the processes that hold the same ones
    weights = (replicas - 1) / replicas * P / ep_size * (2 + 2 + 4) if fsdp else 0
    rows = (6 if recompute else 4) * tokens * K * D * 2 * (ep_size - 1) / ep_size
    return (weights + rows) / 1e6 if fsdp or ep_size > 1 else None


def layouts(world_size: int, n_experts: int) -> list[tuple[str, int, bool]]:
    sizes = [
        n for n in (2, 4, 8, 16, 32, 64) if n <= world_size and world_size % n == 0 and n_experts % n == 0
    ]
    return [("DDP", 1, False), *((f"DDP + EP {n}", n, False) for n in sizes), ("FSDP2", 1, True)] + [
        (f"FSDP2 + EP {n}", n, True) for n in sizes
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["100m", "1b"])
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[8])
    args = parser.parse_args()
    print(
        "| preset | processes | layout | elements / process | routed experts' | GiB / process | vs DDP "
        "| expert traffic / MoE layer / micro-batch |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        config = DeepSeekConfig.from_preset(preset)
        train = TRAIN_PRESETS[preset]
        tokens, recompute = (
            train["micro_batch_size"] * train["seq_len"],
            train.get("gradient_checkpointing", False),
        )
        for world_size in args.world_sizes:
            ddp = None
            for name, ep_size, fsdp in layouts(world_size, config.n_routed_experts):
                total, routed = local_elements(config, world_size, ep_size, fsdp)
                ddp = ddp or total
                gib = total * BYTES_PER_ELEMENT / 2**30
                moved = traffic_mb(config, tokens, world_size, ep_size, fsdp, recompute)
                moved = "–" if moved is None else f"{moved:,.0f} MB"
                print(
                    f"| {preset} | {world_size} | {name} | {total:,} | {routed:,} | {gib:.2f} | "
                    f"{total / ddp:.2f} | {moved} |"
                )


if __name__ == "__main__":
    main()
