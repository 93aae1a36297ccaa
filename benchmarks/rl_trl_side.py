"""TRL's side of benchmarks/rl_trl.py, run with the Python of TRL's own environment (never the project's):
GRPOTrainer on our Hugging Face export, the same task, group size, batch, settings and wall-clock budget.

    /work/venvs/trl/bin/python benchmarks/rl_trl_side.py --hf DIR --prompts train.jsonl --minutes 5 --out DIR

Writes OUT/final (the trained model, save_pretrained) and OUT/run.json (steps, completions, train seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def exact_answer(prompts, completions, answer, **_):
    """The built-in arithmetic reward: the reply, stripped and with runs of spaces as one, is the number."""
    return [float(" ".join(c[0]["content"].split()) == a) for c, a in zip(completions, answer)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True)
    p.add_argument("--prompts", required=True, help='JSONL of {"prompt": [messages], "answer": "..."}')
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl-weight", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    budget_s = args.minutes * 60

    class Budget(TrainerCallback):
        """Stops at the wall-clock budget, as `rl`'s train.max_time_minutes does."""

        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **__):
            self.seconds = time.perf_counter() - self.start
            if self.seconds > budget_s:
                control.should_training_stop = True

    # our defaults, in TRL's names: G completions of each of P prompts per step, one update per batch
    config = GRPOConfig(
        output_dir=str(Path(args.out) / "trainer"), per_device_train_batch_size=args.group_size * args.prompts_per_step,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0,
        beta=args.kl_weight, epsilon=0.2, num_iterations=1, loss_type="grpo", scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=5, weight_decay=0.0,
        adam_beta2=0.95, max_grad_norm=1.0, max_steps=1_000_000, use_cpu=True, bf16=False, logging_steps=5,
        save_strategy="no", report_to="none", seed=args.seed, disable_dropout=True, gradient_checkpointing=False,
    )  # fmt: skip
    budget = Budget()
    trainer = GRPOTrainer(
        model=model, reward_funcs=exact_answer, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[budget],
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(Path(args.out) / "final"))
    tokenizer.save_pretrained(str(Path(args.out) / "final"))
    steps = trainer.state.global_step
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    report = {
        "steps": steps, "completions": steps * args.group_size * args.prompts_per_step, "train_s": budget.seconds,
        "rewards": rewards, "threads": torch.get_num_threads(),
    }  # fmt: skip
    (Path(args.out) / "run.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
