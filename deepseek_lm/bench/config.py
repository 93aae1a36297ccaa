"""The bench's settings (`BenchConfig`) and its command line, whose flags are the settings' fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError


@dataclass
class BenchConfig:
    preset: str = "seed"
    compare_hf: bool = False
    json: str | None = None
    device: str = "auto"
    compile: bool = False
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    steps: int = 4
    warmup: int = 2
    rounds: int = 5
    prompt_len: int = 32
    new_tokens: int = 128
    decode_batch: int = 8
    ctx_len: int = 2048
    ctx_new_tokens: int = 64
    seed: int = 0
    threads: int = 0
    checkpoint: str | None = None
    speculative: bool = False
    draft_tokens: int = 1
    data_dir: str | None = None


HELP = {  # the command line's help, by BenchConfig field
    "preset": "model preset: tiny, seed, 100m, 1b",
    "compare_hf": "also measure transformers' DeepseekV3ForCausalLM, alternating with ours",
    "json": "write the results to this JSON file",
    "device": "auto, cpu or cuda",
    "compile": "torch.compile both implementations: each block for training; for decoding our "
    "Engine(compile=True) and transformers' generate with a static cache and its compile config",
    "batch_size": "training micro-batch (rows)",
    "seq_len": "training sequence length",
    "grad_accum": "micro-batches per optimizer step (the trainer's accumulation)",
    "steps": "timed training steps per implementation and round (the implementations alternate per step)",
    "warmup": "untimed training steps per round",
    "rounds": "rounds of training steps and of decode figures; figures are medians",
    "prompt_len": "prompt length of the short-prompt decode figures",
    "new_tokens": "tokens decoded after the short prompt",
    "decode_batch": "rows of the batched decode figure",
    "ctx_len": "the long-context decode fills this many positions (prompt = ctx_len - ctx_new_tokens)",
    "ctx_new_tokens": "tokens decoded in the long-context figure",
    "seed": "seed of the weights and the token ids",
    "threads": "torch threads in every process (0: torch's default, one per core)",
    "checkpoint": "with --speculative: a trained checkpoint (or run directory) with an MTP module",
    "speculative": "self-speculative decoding against plain decoding on --checkpoint: tokens/s at batch 1 "
    "and --decode-batch, acceptance rate (bench/speculative.py)",
    "draft_tokens": "with --speculative: tokens drafted per round",
    "data_dir": "with --speculative: prepared data whose validation split gives the prompts (default: the "
    "checkpoint's training data)",
}


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="deepseek-lm bench", description=__doc__.split("\n\n")[0], exit_on_error=False
    )
    for name, default in asdict(BenchConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=HELP[name])
        else:
            kind = type(default) if default is not None else str | None
            parser.add_argument(flag, type=kind, default=default, help=HELP[name])
    return parser


def parse(argv: list[str]) -> BenchConfig:
    from deepseek_lm.cli import parse_args

    ns = parse_args(build_parser(), argv)
    cfg = BenchConfig(**{k: ns[k] for k in asdict(BenchConfig())})
    for name in [
        "batch_size",
        "seq_len",
        "grad_accum",
        "steps",
        "rounds",
        "prompt_len",
        "new_tokens",
        "decode_batch",
    ]:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(cfg, name)})")
    if cfg.warmup < 0 or cfg.threads < 0:
        raise UserError("--warmup and --threads must be >= 0")
    DeepSeekConfig.from_preset(cfg.preset)  # an unknown preset is a ConfigError (a UserError)
    if cfg.ctx_new_tokens < 2 or cfg.new_tokens < 2:
        raise UserError("--new-tokens and --ctx-new-tokens must be >= 2 (decode speed needs two lengths)")
    if cfg.speculative != (cfg.checkpoint is not None):
        raise UserError(
            "--speculative needs --checkpoint DIR (a trained model with an MTP module), and --checkpoint is "
            "only for --speculative (the other figures use a preset's random weights)"
        )
    if cfg.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be >= 1 (got {cfg.draft_tokens})")
    return cfg
