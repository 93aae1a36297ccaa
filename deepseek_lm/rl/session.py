"""A whole RL run as one library call: the prompts into RUN/data, then the trainer of `train` and `finetune`
with GRPO as its objective (objective.py).

    from deepseek_lm.rl import RL_DEFAULTS, RLConfig, rl
    cfg = RLConfig.from_dict({**RLConfig().to_dict(), **RL_DEFAULTS, "max_steps": 100})
    rl("runs/chat", cfg, "runs/rl")                                          # the built-in tasks
    rl("runs/chat", cfg, "runs/arith", tasks=["arithmetic"])
    rl("runs/chat", cfg, "runs/mine", prompts="prompts.jsonl", reward="my_rewards:score")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.errors import UserError
from deepseek_lm.rl.config import RLConfig
from deepseek_lm.rl.data import PromptData, prepare_prompts, read_manifest
from deepseek_lm.rl.rewards import load_reward
from deepseek_lm.train.finetune import chat_base
from deepseek_lm.train.session import TrainResult, train


def rl(
    checkpoint: str | Path | None,
    cfg: RLConfig,
    out_dir: str | Path,
    *,
    tasks: list[str] | None = None,
    prompts: str | Path | None = None,
    reward: str | None = None,
    val_fraction: float = 0.05,
    split_seed: int = 0,
    resume: bool = False,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train `checkpoint` (a checkpoint or run directory, ideally fine-tuned on the tasks' answer format)
    with GRPO in `out_dir`, on the built-in `tasks` (default: all of them) or the user's `prompts` JSONL
    scored by `reward` (`module:function`; it may also replace the tasks' built-in rewards). With `resume`
    the run continues from its latest checkpoint with its own prompts; a user reward must be named again
    (rewards are code, never taken from a run directory)."""
    out = Path(out_dir)
    latest = ckpt.latest_checkpoint(out, training=True) if resume else None
    if latest is not None:
        config, saved_cfg = ckpt.read_config_json(latest)
        tokenizer, template, state = ckpt.load_tokenizer_file(latest), ckpt.read_chat_template(latest), None
        cfg = replace(cfg, data_dir=cfg.data_dir or (saved_cfg or {}).get("data_dir") or str(out / "data"))
        saved = read_manifest(cfg.data_dir).get("reward")
        if saved != reward:
            raise UserError(
                f"{out} was trained with --reward {saved}: resume with the same reward"
                if saved
                else f"{out} was trained with the tasks' built-in rewards: resume without --reward"
            )
    else:
        if tasks is None and prompts is None and reward is not None:
            raise UserError("--reward scores --prompts FILE.jsonl or a --task: give one of them")
        config, tokenizer, template, state = chat_base(checkpoint, cfg.vocab_multiple)
        data_dir = out / "data"
        if ckpt.list_checkpoints(out):  # before anything is written there
            raise UserError(f"{out} already holds checkpoints of another run (pass --resume to continue)")
        prepare_prompts(
            data_dir,
            tasks=tasks,
            prompts=prompts,
            reward=reward,
            val_fraction=val_fraction,
            split_seed=split_seed,
        )
        cfg = replace(cfg, data_dir=str(data_dir))
    if cfg.seq_len > config.max_position_embeddings:
        raise UserError(
            f"--train.seq_len {cfg.seq_len} exceeds the model's context ({config.max_position_embeddings})"
        )
    user_reward = (reward, load_reward(reward)) if reward else None

    def open_prompts(cfg: RLConfig, dist: object) -> PromptData:
        return PromptData(cfg.data_dir, tokenizer, template, cfg)

    def make_objective(t):
        from deepseek_lm.rl.objective import GRPO

        return GRPO(t, user_reward)

    return train(
        config, cfg, out, resume=resume, preset="rl", stop_at_step=stop_at_step, data_source=open_prompts,
        initial_state=state, eval_first=True, make_objective=make_objective,
    )  # fmt: skip
