"""`deepseek-lm bench`: training and decoding speed, MFU, peak memory and KV-cache size of a preset, optionally
side by side with transformers' `DeepseekV3ForCausalLM` of the same configuration and the same weights.

    deepseek-lm bench                                        the seed preset, ours only
    deepseek-lm bench --compare-hf --json benchmarks/seed-cpu.json
    deepseek-lm bench --preset 100m --compile --batch-size 16 --seq-len 1024    (on a GPU)
    deepseek-lm bench --checkpoint runs/mtp --speculative     MTP self-speculative decoding (bench/speculative.py)

How each figure is measured (SPEC §8; the history of results is in benchmarks/README.md):
- training: one micro-batch step as the trainer runs it (forward with CE + aux loss, backward, gradient
  clipping, fused AdamW, zero_grad, router-bias update), timed per phase. Each implementation lives in its
  own freshly spawned process, so its peak memory is its own: on CPU the RSS high-water mark (reset once the
  libraries are imported) above the RSS at that moment, on CUDA `torch.cuda.max_memory_allocated`. The two
  processes take steps in turn (ours, hf, ours, hf, ...) and each figure is the median over the steps.
- MFU: `flops_per_token(seq_len)` × tokens/s over the matmul peak the bench measures at start.
- decode: greedy generation through each library's own API (our `Engine`, transformers' `generate`).
  t(1) is the prefill plus the first token; decode tokens/s = B·(n − 1) / (t(n) − t(1)), so the prefill is
  reported apart. Ours and transformers alternate per figure and round. With --compile, both decode through
  their compiled paths, each compiled for every figure's shapes before the timed rounds.
- KV cache: bytes per token over all layers; ours from `LatentCache`, transformers' from the tensors its
  `DynamicCache` holds after a prefill.
Ratios are ours / transformers: above 1 is better for speeds, below 1 for memory.

One module per measurement: training.py (throughput, MFU's tokens, peak memory), decoding.py (decode speed,
prefill, KV cache), speculative.py (`--speculative`); machine.py (what is recorded about the machine, the
matmul peak); the other engines beside ours as peers: hf.py (transformers) and llama_cpp.py (llama.cpp,
built from source for benchmarks/llama_cpp_compare.py); config.py, run.py, report.py and cli.py are the
command's settings, run, table and entry point.
"""

from deepseek_lm.bench.cli import main
from deepseek_lm.bench.config import BenchConfig, parse

__all__ = ["BenchConfig", "main", "parse"]
