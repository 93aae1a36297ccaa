"""`deepseek-lm serve`: parse arguments, load the checkpoint, start the engine, run the server.

deepseek-lm serve --checkpoint runs/demo                                   # http://127.0.0.1:8000
deepseek-lm serve --checkpoint runs/demo --host 0.0.0.0 --api-key "$KEY"   # reachable from other machines
deepseek-lm serve --checkpoint runs/mtp --speculative                      # drafts from the MTP module
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path

from jsonargparse import ArgumentParser

from deepseek_lm.cli import parse_args
from deepseek_lm.errors import UserError


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="deepseek-lm serve",
        exit_on_error=False,
        description="An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics) with continuous batching, and a playground page at /.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (its best checkpoint, else the latest)",
    )
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before a 503")
    p.add_argument(
        "--api-key",
        type=str | None,
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $DEEPSEEK_LM_API_KEY, else none)",
    )
    p.add_argument("--model-name", type=str | None, default=None, help="the model's id in the API")
    p.add_argument("--context-length", type=int | None, default=None, help="default: the model's context")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled between steps")
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=64,
        help="memory for recent prompts' latent caches, reused by prompts that start the same way (a "
        "conversation's history; an ended chat turn's answer is prefilled into it for the next turn), chunk "
        "by chunk; 0: off (and always off with --speculative)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (~20 s per shape)")
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="the eager batch-invariant decoder: a request's output bitwise the same alone or in a full "
        "batch, at a seventh to two thirds of the speed (default on a CPU: steps compiled ahead of time, whose "
        "numbers can move in the last bits with the batch)",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding with the checkpoint's MTP module: the same greedy output, sampled "
        "output of the same distribution; each response's usage reports the drafts' acceptance",
    )
    p.add_argument("--draft-tokens", type=int, default=1, help="with --speculative: tokens drafted per round")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def main(argv: list[str]) -> int:
    args = parse_args(_parser(), argv)
    api_key = args.api_key if args.api_key is not None else os.environ.get("DEEPSEEK_LM_API_KEY") or None
    if args.max_batch_size < 1 or args.max_queue < 0 or args.prefill_chunk < 1 or args.prefix_cache_mb < 0:
        raise UserError(
            "need --max-batch-size >= 1, --max-queue >= 0, --prefill-chunk >= 1 and --prefix-cache-mb >= 0 "
            f"(got {args.max_batch_size}, {args.max_queue}, {args.prefill_chunk}, {args.prefix_cache_mb})"
        )
    if args.speculative and (args.compile or args.draft_tokens < 1):
        raise UserError(
            "--speculative runs the batch-invariant eager decoder: leave out --compile"
            if args.compile
            else f"--draft-tokens must be at least 1, got {args.draft_tokens}"
        )
    from deepseek_lm.serve.server import bind

    sock = bind(args.host, args.port)  # first: a port in use fails before the (slower) load
    started = time.perf_counter()
    engine, name, chat_format = _engine(args)
    from deepseek_lm.serve.app import create_app
    from deepseek_lm.serve.server import serve

    app = create_app(engine, model_name=name, api_key=api_key, chat_format=chat_format)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def ready() -> None:
        mode = f", speculative: {engine.draft_tokens} draft token(s) per round" if engine.draft_tokens else ""
        print(f"serving {name} at {url} (ready in {time.perf_counter() - started:.1f} s{mode}): the playground "
              f"at {url}/, the OpenAI API at {url}/v1; Ctrl-C stops", flush=True)  # fmt: skip
        if api_key is None and not _is_loopback(args.host):
            print(
                f"deepseek-lm serve: warning: {args.host} is reachable from other machines and no --api-key "
                "is set: anyone who can reach it can use the model",
                file=sys.stderr,
                flush=True,
            )

    serve(app, engine, sock, on_ready=ready)
    print("deepseek-lm serve: stopped", file=sys.stderr)
    return 0


def _engine(args):
    """-> the started engine, the model's name in the API, its chat format."""
    from deepseek_lm.checkpoint import load_checkpoint
    from deepseek_lm.data.chat import ChatFormat
    from deepseek_lm.generate.batching import BatchEngine

    ckpt = load_checkpoint(args.checkpoint, device=args.device)
    if args.speculative and not ckpt.config.num_nextn_predict_layers:
        raise UserError(
            f"--speculative: {ckpt.path} has no MTP modules (num_nextn_predict_layers=0); train with "
            "--model.num_nextn_predict_layers 1 to serve speculatively, or leave out --speculative"
        )
    if ckpt.tokenizer is None:
        raise UserError(
            f"{args.checkpoint} has no tokenizer.json to read and write text with: copy its training data's "
            "tokenizer.json (DATA_DIR/tokenizer.json) into the checkpoint directory"
        )
    chat_format = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template)
    options = dict(
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        context_length=args.context_length,
        compile=args.compile,
        aot=False if args.batch_invariant or args.compile else None,
    )
    if not args.speculative:
        options["prefix_cache_bytes"] = int(args.prefix_cache_mb * 2**20)
    # a prefill chunk starts at each user turn: a conversation's next turn reuses its history's chunks
    options["chunk_starts"] = chat_format.user_turn_ids(ckpt.tokenizer)
    if args.speculative:
        from deepseek_lm.generate.speculative_batching import SpeculativeBatchEngine

        engine = SpeculativeBatchEngine(ckpt.model, ckpt.tokenizer, draft_tokens=args.draft_tokens, **options)
    else:
        engine = BatchEngine(ckpt.model, ckpt.tokenizer, **options)
    name = args.model_name or Path(args.checkpoint).resolve().name
    return engine.start(), name, chat_format


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
