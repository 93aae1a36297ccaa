"""How often a chat checkpoint's greedy answer is exactly the reference, by kind of question.

    python benchmarks/chat_answers.py --checkpoint runs/chat                 # the built-in set, both splits
    python benchmarks/chat_answers.py --checkpoint runs/chat --n 500 --show 5

Asks the last question of `--n` conversations of each split of a prepared chat directory (its earlier turns as
history), greedily, through the checkpoint's chat template, and compares the reply with the reference answer
(exact match after stripping spaces). The built-in set's conversation ids name the kind of question
(`json.dumps:do`, `:args`, `:where`, `:module`, `:functions`, `:methods`, `:do+args`).
"""

from __future__ import annotations

import argparse
import collections
import json
import random

from deepseek_lm.checkpoint import load_checkpoint
from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.data.chat_data import ChatDir, default_chat_dir
from deepseek_lm.generate import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default=str(default_chat_dir()))
    p.add_argument("--n", type=int, default=300, help="conversations per split (a seeded sample)")
    p.add_argument("--show", type=int, default=3, help="examples printed per split")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    fmt = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template)
    engine, chat = Engine(ckpt.model, ckpt.tokenizer), ChatDir.open(args.data_dir)
    report = {}
    for split in ("train", "val"):
        convs = random.Random(0).sample(chat.conversations(split), args.n)
        prompts = [fmt.render(c["messages"][:-1]) for c in convs]
        outs = []
        for i in range(0, len(prompts), 32):
            outs += engine.generate(
                prompts[i : i + 32], max_new_tokens=96, temperature=0, stop=list(fmt.stop),
                stop_token_ids=fmt.stop_token_ids,
            )  # fmt: skip
        hits, totals = collections.Counter(), collections.Counter()
        for conv, out in zip(convs, outs):
            kind = conv.get("id", ":other").rsplit(":", 1)[-1]
            totals[kind] += 1
            hits[kind] += out.text.strip() == conv["messages"][-1]["content"].strip()
        report[split] = {k: (hits[k], totals[k]) for k in sorted(totals)}
        exact = sum(hits.values()) / len(convs)
        kinds = ", ".join(f"{k} {h}/{t}" for k, (h, t) in report[split].items())
        print(f"{split}: {exact:.1%} exact ({kinds})")
        for conv, out in list(zip(convs, outs))[: args.show]:
            print(
                f"  > {conv['messages'][-2]['content']}\n    {out.text.strip()}\n    (reference: {conv['messages'][-1]['content']})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
