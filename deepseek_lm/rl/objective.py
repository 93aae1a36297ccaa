"""GRPO as the trainer's objective (train/loop.py `NextTokenPrediction`'s interface): one step samples
`prompts_per_step` × G completions through the batch engine, rewards them, and updates the policy
`updates_per_batch` times on GRPO's loss (grpo.py); evaluation is the greedy reward on held-out prompts.

A step's numbers, logged per window: reward mean and spread (over all completions, and the share of groups
whose rewards were all equal, which teach nothing), KL to the reference, the clipped share of tokens,
completion length, the policy's entropy, completions and tokens per second. Legend: N completions, L tokens
of the padded prompt + completion rows, V vocabulary.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.errors import UserError
from deepseek_lm.rl import grpo
from deepseek_lm.rl.data import USER_TASK
from deepseek_lm.rl.evaluate import score
from deepseek_lm.rl.rewards import BUILTIN_REWARDS, RewardError, RewardFn, call_reward
from deepseek_lm.rl.rollout import Completion, Rollouts, completion_seed
from deepseek_lm.train.loop import StepResult, apply_gradients
from deepseek_lm.train.trainer import Trainer, save

REFERENCE_DIR = "reference"  # the frozen reference, a checkpoint of the run's starting weights


class GRPO:
    """Built once the trainer is up (`train(..., make_objective=lambda t: GRPO(t, reward))`); `reward`: the
    user's (name, function) replacing every task's built-in one, or None."""

    def __init__(self, t: Trainer, reward: tuple[str, RewardFn] | None) -> None:
        if t.dist.world_size > 1 or t.sharded:
            raise UserError("rl runs in one process: start it without torchrun")
        self.cfg, self.data, self.user_reward = t.cfg, t.data, reward
        if reward is None and USER_TASK in t.data.by_task["train"]:
            raise UserError("these prompts have no built-in reward: give --reward module:function")
        self.reference = reference_model(t) if t.cfg.kl_weight > 0 else None
        self.rollouts = Rollouts(
            t.raw_model, t.data.tokenizer, t.data.format, t.cfg.completions_per_step, t.cfg.seq_len
        )

    # rewards ------------------------------------------------------------------------------------------

    def reward_of(self, row: dict[str, Any]) -> tuple[str, RewardFn]:
        if self.user_reward is not None:
            return self.user_reward
        return f"{row['task']} (built-in)", BUILTIN_REWARDS[row["task"]]

    def score(self, rows: list[dict[str, Any]], completions: list[Completion]) -> list[float]:
        return [call_reward(*self.reward_of(row), row, c.text) for row, c in zip(rows, completions)]

    # one step ---------------------------------------------------------------------------------------------

    def step(self, t: Trainer, stop_requested: bool) -> StepResult:
        cfg, G = self.cfg, self.cfg.group_size
        before = t.loader.state_dict()
        rows = [self.data.rows["train"][i] for i in next(t.loader) for _ in range(G)]  # each prompt G times
        start = time.perf_counter()
        seeds = [completion_seed(cfg.seed, t.state.step, i) for i in range(len(rows))]
        completions = self.rollouts.sample(
            [r["ids"] for r in rows], cfg.max_new_tokens, cfg.temperature, seeds
        )
        try:
            rewards = torch.tensor(self.score(rows, completions))
        except RewardError as e:
            t.loader.load_state_dict(before)  # resume draws this batch again
            raise stopped(t, e) from None
        rollout_s = time.perf_counter() - start
        advantages = grpo.group_advantages(rewards, G)
        batch = Batch.of(completions, advantages, t.device)
        lr = t.optimizer.param_groups[0]["lr"]
        result = self.update(t, batch, stop_requested, lr)
        groups = rewards.view(-1, G)
        result.metrics = {
            **result.metrics, "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
            "flat_groups": (groups.std(dim=1) == 0).float().mean().item(),
            "length": batch.lengths.float().mean().item(), "completions": float(len(rows)),
            "step_tokens": float(batch.tokens), "rollout_s": rollout_s,
        }  # fmt: skip
        if not result.skipped:
            t.state.step += 1
            t.state.tokens_seen += batch.tokens
        return result

    def update(self, t: Trainer, batch: Batch, stop: bool, lr: float) -> StepResult:
        """`updates_per_batch` optimizer updates on the batch, then one step of the schedule."""
        cfg, model = self.cfg, t.raw_model
        start = time.perf_counter()
        with torch.no_grad():
            ref = self.logprobs(self.reference, batch, t)[0] if self.reference is not None else None
            old = self.logprobs(model, batch, t)[0] if cfg.updates_per_batch > 1 else None
        for _ in range(cfg.updates_per_batch):
            losses, stats = self.backward(t, batch, old, ref)
            if not math.isfinite(losses[0]):
                t.optimizer.zero_grad(set_to_none=True)
                return StepResult(losses[0], losses[1], math.nan, lr, True, stop, None, None, None)
            norm = apply_gradients(t)
            if norm is None:
                return StepResult(losses[0], losses[1], math.nan, lr, True, stop, None, None, None)
            if stats["counts_LE"] is not None:
                update_router_biases(model, stats["counts_LE"].to(t.device))
        t.scheduler.step()
        metrics = {k: stats[k] for k in ("kl", "clipped", "entropy")} | {
            "update_s": time.perf_counter() - start
        }
        moe = (stats["counts_LE"], stats["dropped_L"], stats["entropy_L"])
        return StepResult(*losses, norm, lr, False, stop, *moe, metrics=metrics)

    def backward(
        self, t: Trainer, batch: Batch, old: torch.Tensor | None, ref: torch.Tensor | None
    ) -> tuple[tuple[float, float], dict[str, Any]]:
        """Forward + backward of GRPO's loss over micro-batches of the completions."""
        cfg, n = self.cfg, batch.ids.shape[0]
        loss_sum = aux_sum = kl = clipped = ent = 0.0
        counts, dropped, router_entropy = None, None, None
        for rows in torch.arange(n).split(cfg.micro_batch_size):
            part, share = batch.rows(rows), len(rows) / n
            logp, entropy_NT, out = self.logprobs(t.raw_model, part, t, with_entropy=True)
            terms = grpo.grpo_loss(
                logp, (old[rows] if old is not None else logp.detach()), (ref[rows] if ref is not None else None),
                part.advantages, part.mask, cfg.clip_range, cfg.kl_weight,
            )  # fmt: skip
            # no MoE auxiliary loss: a batch whose groups are all flat has no gradient but its tiny one, which
            # Adam's normalisation would blow up to full-size steps; the router biases keep the balance
            t.scaler.scale(terms.loss * share).backward()
            loss_sum, aux_sum = loss_sum + terms.loss.item() * share, aux_sum + out.aux_loss.item() * share
            kl, clipped = kl + terms.kl.item() * share, clipped + terms.clipped.item() * share
            ent += ((entropy_NT * part.mask).sum() / part.mask.sum().clamp(min=1)).item() * share
            if out.router_stats:
                c = torch.stack([s.counts for s in out.router_stats]).double()
                d = torch.stack([s.dropped_frac for s in out.router_stats]).float() * share
                e = torch.stack([s.entropy for s in out.router_stats]).float().cpu() * share
                counts = c if counts is None else counts + c
                dropped, router_entropy = (d, e) if dropped is None else (dropped + d, router_entropy + e)
        stats = dict(
            kl=kl, clipped=clipped, entropy=ent, counts_LE=counts, dropped_L=dropped, entropy_L=router_entropy
        )
        return (loss_sum, aux_sum), stats

    def logprobs(
        self, model: torch.nn.Module, batch: Batch, t: Trainer, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """(N, L-1) log π(next token) at the sampling temperature on the completions' tokens, 0 elsewhere (and
        the entropy of π there). The head runs on the M completion positions alone: the prompts' and the
        padding's logits would be half of the (·, V) work for nothing."""
        with t.precision.autocast():
            out = model(batch.ids, return_hidden=True)
            logits_MV = model.lm_head(out.hidden[:, :-1][batch.mask])  # (M, V)
        targets_M = batch.ids[:, 1:][batch.mask]
        logp_M, entropy_M = grpo.token_logprobs(logits_MV, targets_M, self.cfg.temperature, with_entropy)
        logp = torch.zeros(batch.mask.shape, device=logp_M.device).masked_scatter(batch.mask, logp_M)
        entropy = None
        if entropy_M is not None:
            entropy = torch.zeros(batch.mask.shape, device=logp_M.device).masked_scatter(
                batch.mask, entropy_M
            )
        return logp, entropy, out

    # evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, t: Trainer, max_batches: int | None) -> dict[str, float]:
        """Greedy replies to held-out prompts: the mean reward and exact-match share per task (rows with an
        `answer` field), their means over tasks, and selection_loss = -reward (the best checkpoint has the
        highest held-out reward). Periodic evaluations ask each task's first `eval_prompts`, the final all."""
        limit = None if max_batches is None else self.cfg.eval_prompts
        val = self.data.rows["val"]
        picked = {task: [val[i] for i in idx[:limit]] for task, idx in self.data.by_task["val"].items()}
        try:
            metrics = score(self.rollouts, picked, self.reward_of, self.cfg.max_new_tokens)
        except RewardError as e:
            raise stopped(t, e) from None
        return metrics | {"selection_loss": -metrics["reward"]}

    # reporting ---------------------------------------------------------------------------------------------

    def train_record(self, t: Trainer, record: dict[str, Any]) -> dict[str, Any]:
        """Completions and tokens (prompt + completion) per second; no MFU (the window's is per `seq_len`
        windows of `micro_batch_size` rows, not what a step computes)."""
        step_s = max(record["step_time_s"], 1e-9)
        rates = {
            "completions_per_s": record["completions"] / step_s,
            "tokens_per_s": record["step_tokens"] / step_s,
        }
        return {k: v for k, v in record.items() if k != "mfu"} | rates

    def train_line(self, t: Trainer, r: dict[str, Any]) -> str:
        return " | ".join([
            f"step {r['step']:>{len(str(t.total_steps))}}/{t.total_steps}",
            f"reward {r['reward']:.3f} ± {r['reward_std']:.3f} ({r['flat_groups']:.0%} flat groups)",
            f"kl {r['kl']:.4f}", f"clipped {r['clipped']:.1%}", f"length {r['length']:.1f}",
            f"entropy {r['entropy']:.2f}", f"lr {r['lr']:.2e}", f"{r['completions_per_s']:.1f} completions/s",
        ])  # fmt: skip

    def eval_line(self, t: Trainer, m: dict[str, Any]) -> str:
        return f"eval step {t.state.step}: held-out {_per_task(m)}"

    def describe(self, t: Trainer) -> list[str]:
        cfg, data = self.cfg, self.data
        splits = data.manifest["splits"]
        reward = self.user_reward[0] if self.user_reward else "each task's built-in"
        return [
            f"rollouts: {cfg.prompts_per_step} prompts × {cfg.group_size} completions = {cfg.completions_per_step} "
            f"per step (temperature {cfg.temperature:g}, at most {cfg.max_new_tokens} tokens, the batch engine); "
            f"{cfg.updates_per_batch} update(s) per batch, clip ε {cfg.clip_range:g}, KL β {cfg.kl_weight:g} "
            "to the starting weights",
            f"prompts {data.path} ({data.manifest['source']}): {splits['train']['prompts']:,} train / "
            f"{splits['val']['prompts']:,} held out · reward: {reward}",
        ]

    def final_lines(self, t: Trainer, val: dict[str, Any]) -> list[str]:
        return [f"final held-out {_per_task(val)}"]

    def plot(self, t: Trainer) -> list[Path]:
        from deepseek_lm.rl.plots import plot_rl

        return plot_rl(t.run_dir)

    def close(self) -> None:
        self.rollouts.close()


def _per_task(m: dict[str, Any]) -> str:
    tasks = [k[len("reward_") :] for k in m if k.startswith("reward_")]

    def one(k: str) -> str:
        exact = f" ({m[f'exact_{k}']:.1%} exact)" if f"exact_{k}" in m else ""
        return f"{k} {m[f'reward_{k}']:.3f}{exact}"

    overall = f"reward {m['reward']:.3f}" + (f" ({m['exact']:.1%} exact)" if "exact" in m else "")
    return overall + (" | " + " | ".join(one(k) for k in tasks) if len(tasks) > 1 else "")


class Batch:
    """A rollout batch as tensors: prompt + completion rows right-padded (N, L), the completion's targets
    marked in `mask` (N, L-1) (targets are ids[:, 1:]), each completion's advantage (N,)."""

    def __init__(
        self, ids: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor
    ):
        self.ids, self.mask, self.advantages, self.lengths = ids, mask, advantages, lengths
        self.tokens = 0  # prompt and completion tokens, padding excluded

    @classmethod
    def of(cls, completions: list[Completion], advantages: torch.Tensor, device: torch.device) -> Batch:
        L = max(len(c.prompt_ids) + len(c.token_ids) for c in completions)
        ids = torch.zeros(len(completions), L, dtype=torch.long)
        mask = torch.zeros(len(completions), L - 1, dtype=torch.bool)
        for i, c in enumerate(completions):
            p, n = len(c.prompt_ids), len(c.token_ids)
            ids[i, : p + n] = torch.tensor(c.prompt_ids + c.token_ids)
            mask[i, p - 1 : p - 1 + n] = True  # position p - 1 predicts the first completion token
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        batch = cls(ids.to(device), mask.to(device), advantages.to(device), lengths)
        batch.tokens = sum(len(c.prompt_ids) + len(c.token_ids) for c in completions)
        return batch

    def rows(self, index: torch.Tensor) -> Batch:
        return Batch(self.ids[index], self.mask[index], self.advantages[index], self.lengths[index])


def stopped(t: Trainer, e: RewardError) -> RewardError:
    """A broken reward stops the run; the weights are those of the last finished step: saved first."""
    path = save(t) if t.state.step > 0 else None
    return RewardError(f"{e}; {f'saved {path}' if path else 'nothing trained yet'}")


def update_router_biases(model: torch.nn.Module, counts_LE: torch.Tensor) -> None:
    """Auxiliary-loss-free balancing from the update's routing counts, as pretraining does after each step.
    The MTP modules' MoE layers saw no tokens (RL leaves them alone): zero counts move no bias."""
    missing = len(model.moe_layers()) - counts_LE.shape[0]
    model.update_router_biases([*counts_LE, *counts_LE.new_zeros(missing, counts_LE.shape[1])])


def reference_model(t: Trainer) -> torch.nn.Module:
    """The frozen reference: the starting weights, saved as RUN/reference when the run starts and read back
    on resume, in eval mode and without gradients."""
    path = t.run_dir / REFERENCE_DIR
    if t.resumed_from is None:
        ckpt.save_model_dir(path, t.raw_model, t.data.tokenizer, chat_template=t.data.chat_template)
    elif not ckpt.is_checkpoint_dir(path):
        raise UserError(
            f"{path}: missing; the run's KL reference is gone, so it cannot resume with train.kl_weight > 0"
        )
    return ckpt.load_checkpoint(path, device=t.device).model.requires_grad_(False)
