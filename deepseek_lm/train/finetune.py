"""Supervised fine-tuning on conversations (`deepseek-lm finetune`): the pretraining trainer with a chat data
source, so checkpoints, exact resume, metrics.jsonl, samples, W&B and plots are the same code.

    from deepseek_lm.train.finetune import FINETUNE_DEFAULTS, finetune
    from deepseek_lm.train.config import TrainConfig
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **FINETUNE_DEFAULTS, "max_steps": 300})
    finetune("runs/demo", cfg, "runs/chat")                                  # the built-in instruction set
    finetune("runs/demo", cfg, "runs/mine", data=ChatPrepareConfig(data=["chats.jsonl"]))

What changes against pretraining:
- the tokenizer gets the role tokens `<|system|> <|user|> <|assistant|> <|end|>` when it lacks them, and the
  embedding and head grow to the new vocabulary (padded to train.vocab_multiple); every new row starts as the
  mean of the base model's token rows (`grow_vocab` says why);
- the chat template (`TOKEN_CHAT_TEMPLATE`, or the base checkpoint's own) is stored with every checkpoint;
- the data are conversations (data/chat_data.py): the loss covers the assistant's tokens only, several
  conversations share a window without attending to each other (train.chat_packing);
- the held-out answer loss is measured once before the first step, so the run's metrics start from the base
  model's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.data.chat import PLAIN_CHAT_TEMPLATE, ROLE_TOKENS, TOKEN_CHAT_TEMPLATE
from deepseek_lm.data.chat_data import (
    ChatData,
    ChatDir,
    ChatPrepareConfig,
    default_chat_dir,
    is_chat_dir,
    prepare_chat,
)
from deepseek_lm.errors import UserError
from deepseek_lm.train import distributed as D
from deepseek_lm.train.config import TrainConfig, padded_vocab
from deepseek_lm.train.session import TrainResult, train

# Questions asked after every `sample_every` steps and at the end (user messages through the template).
CHAT_PROMPTS = [
    "What does `json.dumps` do?",
    "Which module provides `urlopen`?",
    "What arguments does `os.path.join` take?",
    "What is the `csv` module for?",
]

# Fine-tuning's overrides of TrainConfig's defaults (the base model's architecture is kept): windows of 256
# (the built-in set's conversations average ~42 tokens: ~6 to a window), 8 windows a step, a 3-minute
# wall-clock budget on which the learning rate decays (as the demo's, so `make chat` takes the same time on
# any machine; at most 3 epochs), greedy samples. Figures: README, "Chat".
# fmt: off
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    seq_len=256, micro_batch_size=8, grad_accum_steps=1, epochs=3.0, max_steps=None, max_time_minutes=3.0,
    schedule_by_time=True, lr=1e-3, warmup_steps=20, min_lr_ratio=0.1, grad_clip=1.0, eval_every=100,
    eval_batches=25, sample_every=200, save_every=200, log_every=10, sample_prompts=CHAT_PROMPTS,
    sample_max_new_tokens=60, sample_temperature=0.0,
)
# fmt: on


def finetune(
    checkpoint: str | Path | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    data: ChatPrepareConfig | str | Path | None = None,
    resume: bool = False,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Fine-tune `checkpoint` (a checkpoint or run directory) on `data` in `out_dir`.

    `data`: a prepared chat directory, or what to prepare (chat JSONL files or a dataset, prepared into
    OUT/data; None: the built-in instruction set, prepared once into data_cache/chat). With `resume`, the run
    continues from its latest checkpoint with its own tokenizer, template and data (`cfg.data_dir`).
    """
    out = Path(out_dir)
    latest = ckpt.latest_checkpoint(out, training=True) if resume else None
    if latest is not None:  # the run's own model, tokenizer, template and data
        config, tokenizer, template, state, to_prepare = *_from_run(latest, cfg), None, None
    else:
        config, tokenizer, template, state = chat_base(checkpoint, cfg.vocab_multiple)
        to_prepare, chat_dir = _chat_data(data, out)
        cfg = replace(cfg, data_dir=str(chat_dir))
    if cfg.seq_len > config.max_position_embeddings:
        raise UserError(
            f"--train.seq_len {cfg.seq_len} exceeds the model's context ({config.max_position_embeddings})"
        )

    def open_chat(cfg: TrainConfig, dist: D.DistInfo) -> ChatData:
        if to_prepare is not None and dist.is_main:
            prepare_chat(to_prepare)
        D.barrier(dist)
        return ChatData(ChatDir.open(cfg.data_dir), tokenizer, template, packing=cfg.chat_packing)

    return train(
        config, cfg, out, resume=resume, preset="finetune", stop_at_step=stop_at_step,
        data_source=open_chat, initial_state=state, eval_first=True,
    )  # fmt: skip


def _from_run(latest: Path, cfg: TrainConfig) -> tuple[DeepSeekConfig, Any, str]:
    config, _ = ckpt.read_config_json(latest)
    template = ckpt.read_chat_template(latest)
    if cfg.data_dir is None or template is None:
        raise UserError(
            f"{latest} is not a fine-tuning checkpoint (no chat data or template): use `train --resume`"
        )
    return config, ckpt.load_tokenizer_file(latest), template


def chat_base(checkpoint: str | Path | None, multiple: int) -> tuple[DeepSeekConfig, Any, str, dict]:
    """The base model grown to the chat tokenizer: (config, tokenizer, template, weights)."""
    if checkpoint is None:
        raise UserError("--checkpoint DIR is required: the model to fine-tune")
    base = ckpt.load_checkpoint(checkpoint)
    tokenizer, template = chat_tokenizer(base)
    known, vocab = base.tokenizer.get_vocab_size(), tokenizer.get_vocab_size()
    config, state = grow_vocab(base.config, base.model.state_dict(), known, vocab, multiple)
    return config, tokenizer, template, state


def _chat_data(
    data: ChatPrepareConfig | str | Path | None, out: Path
) -> tuple[ChatPrepareConfig | None, Path]:
    """(what to prepare, or None for a prepared directory; the chat directory)."""
    if isinstance(data, (str, Path)):
        if not is_chat_dir(data):
            raise UserError(
                f"{data}: not a prepared chat directory; give a .jsonl file or `prepare --chat` it first"
            )
        return None, Path(data)
    data = data or ChatPrepareConfig()
    if data.out is None:
        data = replace(
            data, out=str(out / "data" if data.data or data.dataset or data.tasks else default_chat_dir())
        )
    return data, Path(data.out)


def chat_tokenizer(base: ckpt.Checkpoint) -> tuple[Any, str]:
    """The base checkpoint's tokenizer with the role tokens added where missing, and the template to train
    with: the checkpoint's own when it has one that is not the plain fallback, else the role-token one."""
    if base.tokenizer is None:
        raise UserError(
            f"{base.path} has no tokenizer.json: fine-tuning needs the tokenizer it was trained with"
        )
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(base.tokenizer.to_str())  # a copy: the base checkpoint's stays as it was
    template = (
        base.chat_template if base.chat_template not in (None, PLAIN_CHAT_TEMPLATE) else TOKEN_CHAT_TEMPLATE
    )
    if template == TOKEN_CHAT_TEMPLATE:
        tokenizer.add_special_tokens([t for t in ROLE_TOKENS if tokenizer.token_to_id(t) is None])
    return tokenizer, template


@torch.no_grad()
def grow_vocab(
    config: DeepSeekConfig, state: dict[str, torch.Tensor], known: int, vocab: int, multiple: int
) -> tuple[DeepSeekConfig, dict[str, torch.Tensor]]:
    """The embedding and head for a tokenizer grown from `known` to `vocab` tokens (rows padded to `multiple`).

    The known tokens' rows are kept. Every other row (the new tokens, and padding) starts as the mean of the
    known rows (Hewitt, "Initializing new word embeddings", 2021): in the head a new token's logit is then the
    average logit, so it starts improbable but reachable and the base model's distribution over its own
    tokens hardly moves, whereas rows drawn at the init scale score ~0, which after pretraining can rank above
    most real tokens; in the embedding a mean row is an input like those the blocks were trained on.
    """
    if vocab == known:
        return config, state
    rows, state = padded_vocab(vocab, multiple), dict(state)
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key in state:  # a tied head is stored once, as the embedding
            w = state[key][:known]  # (known, D)
            state[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(rows - known, -1)])
    return replace(config, vocab_size=rows), state
