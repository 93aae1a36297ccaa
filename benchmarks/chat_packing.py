"""Packed or padded conversations for fine-tuning: wasted compute and training tokens/s on the built-in set.

    python benchmarks/chat_packing.py                          # seed architecture, the built-in instruction set
    python benchmarks/chat_packing.py --steps 20 --threads 1   # steadier on a busy machine

Both layouts go through the real loader (data/chat_data.py): `pack` fills windows of --seq-len with several
conversations (block-diagonal causal attention, `doc_ids`); `pad` puts one conversation per row, padded to the
batch's longest. The padded layout runs at the finetune micro-batch and at a micro-batch of about the same
positions per step as the packed one. Wasted compute = padding positions / positions computed, over a whole
epoch of the loader. Tokens/s counts the conversations' real tokens (padding excluded), from training steps
(forward, backward, AdamW) timed in rounds that alternate the layouts, so machine load hits each alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.data.chat import ROLE_TOKENS
from deepseek_lm.data.chat_data import ChatData, ChatDir, ChatPrepareConfig, prepare_chat
from deepseek_lm.data.preparation import prepare_builtin
from deepseek_lm.model import get_model
from deepseek_lm.train.config import padded_vocab


def layouts(data: ChatData, seq_len: int, batch: int) -> dict[str, object]:
    mean = np.mean([len(e.x) for e in data.examples["train"]])
    matched = max(batch, round(batch * seq_len / mean))  # about the packed layout's positions per step
    data.packing = True
    out = {f"pack B={batch}": data.train_loader(seq_len, batch, seed=0)}
    data.packing = False
    out[f"pad B={batch}"] = data.train_loader(seq_len, batch, seed=0)
    out[f"pad B={matched}"] = data.train_loader(seq_len, matched, seed=0)
    return out


def epoch_stats(loader) -> tuple[float, float]:
    """(wasted fraction, real tokens per step) of one epoch of `loader` (its windows, not its batches' order)."""
    used = loader.batches_per_epoch * loader.batch_size
    order = np.random.default_rng([loader.seed, 0]).permutation(len(loader.windows))[:used]
    real = computed = 0
    for b in range(loader.batches_per_epoch):
        rows = [loader.windows[w] for w in order[b * loader.batch_size : (b + 1) * loader.batch_size]]
        lengths = [sum(len(loader.examples[i].x) for i in w) for w in rows]
        real += sum(lengths)
        computed += len(rows) * (loader.seq_len if loader.packing else max(lengths))
    return 1 - real / computed, real / loader.batches_per_epoch


def step(model, optimizer, batch) -> None:
    x, y, *rest = batch
    out = model(x, targets=y, **(rest[0] if rest else {}))
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per layout and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = prepare_builtin(xz_baseline=False).tokenizer
    tokenizer.add_special_tokens(list(ROLE_TOKENS))
    data = ChatData(ChatDir.open(prepare_chat(ChatPrepareConfig()).path), tokenizer, None)
    config = DeepSeekConfig(vocab_size=padded_vocab(tokenizer.get_vocab_size(), 64))
    torch.manual_seed(0)
    model = get_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loaders = layouts(data, args.seq_len, args.batch_size)
    results = {
        name: dict(zip(("wasted", "real_tokens_per_step"), epoch_stats(ld))) for name, ld in loaders.items()
    }
    for loader in loaders.values():  # warm up each shape family once
        step(model, optimizer, next(loader))
    seconds = {name: 0.0 for name in loaders}
    tokens = {name: 0 for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            for _ in range(args.steps):
                batch = next(loader)
                real = int((batch[0] != data.pad_id).sum())  # no conversation holds the pad token
                start = time.perf_counter()
                step(model, optimizer, batch)
                seconds[name] += time.perf_counter() - start
                tokens[name] += real
    base = tokens[next(iter(loaders))] / seconds[next(iter(loaders))]
    print(
        f"seed architecture, vocabulary {config.vocab_size}, windows of {args.seq_len}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'layout':<12} {'wasted':>8} {'real tokens/step':>17} {'real tokens/s':>14} {'vs packed':>10}")
    for name in loaders:
        r = results[name]
        r["real_tokens_per_s"] = tokens[name] / seconds[name]
        print(
            f"{name:<12} {r['wasted']:>7.1%} {r['real_tokens_per_step']:>17,.0f} "
            f"{r['real_tokens_per_s']:>14,.0f} {r['real_tokens_per_s'] / base:>9.2f}×"
        )
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
