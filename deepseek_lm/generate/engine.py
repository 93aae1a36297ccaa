"""The generation engine: prefill the prompts in one forward pass into a preallocated latent KV cache, then
decode token by token over it (SPEC §6).

Per decode step the loop runs one model forward on (B, 1) tokens, one sampling call and a handful of
in-place tensor updates into buffers allocated once per call; it reads tokens back to the host only when text
is needed (streaming, stop strings) and checks for "all rows finished" every step on CPU, every
`_SYNC_EVERY` steps on accelerators, where each read is a device sync.

Batches of prompts of different lengths are right-padded (CONTRACT.md): the padded batch fills the cache in
one pass, then each row's last prompt token runs once more as a decode step at that row's own position,
which gives every row its next-token logits without materialising (B, T, V) prefill logits. Decoding
continues with per-row positions; pad slots are overwritten before anything attends to them.

Context length: a prompt is left-truncated (with a `PromptTruncatedWarning`) so that `max_new_tokens` fit in
`max_position_embeddings`, but never to fewer than half the context; a row that reaches the end of the
context stops there with finish_reason "context".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from deepseek_lm.data.tokenizer import special_token_ids
from deepseek_lm.errors import UserError
from deepseek_lm.generate.sampling import SamplingConfig
from deepseek_lm.generate.speculative import SpeculativeState
from deepseek_lm.generate.state import Completion, DecodeState
from deepseek_lm.generate.streaming import TextStream
from deepseek_lm.model.aot import default_on
from deepseek_lm.model.decode import weights_stamp

_SYNC_EVERY = 16  # decode steps between "all rows finished?" checks on a GPU (each check is a device sync)
_FAST_PATHS_KEPT = 4  # rearranged weights kept between calls (`Engine.fast_path`), the most recently used
T = TypeVar("T")

# called with (prompt index, text piece) as text is produced
StreamCallback = Callable[[int, str], None]


class PromptTruncatedWarning(UserWarning):
    """A prompt lost its oldest tokens to fit the context window."""


class Engine:
    """Sampling from a `DeepSeekLM` with its latent KV cache. Notebook use:

    engine = Engine.from_checkpoint("runs/demo")
    print(engine.generate("Once upon a time", max_new_tokens=50).text)
    for piece in engine.stream("The meaning of", temperature=0.7):
        print(piece, end="", flush=True)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        compile: bool = False,
        speculative: bool = False,
        draft_tokens: int = 1,
        aot: bool | None = None,
    ) -> None:
        """`aot`: one-token decode steps through a library compiled ahead of time (model/aot.py: C++
        kernels, no Python between them, the greedy token taken inside the step); None: on for a CPU model
        in fp32 where a C++ compiler is (`aot.default_on`) and neither `compile` nor `speculative` is asked
        for. A batch size's first use compiles it once (~1 min on 2 cores), cached on disk for later runs.
        `compile`: decode steps through `torch.compile` (model/decode.py) instead: the first `generate` of
        each batch size and cache length compiles (~20 s on a CPU). `speculative`: self-speculative decoding with the model's
        first MTP module drafting `draft_tokens` tokens per round (generate/speculative.py); greedy output is
        plain greedy's, sampled output has plain sampling's distribution."""
        config = model.config
        if speculative and not config.num_nextn_predict_layers:
            raise UserError(
                "speculative decoding needs MTP modules and this model has none (num_nextn_predict_layers=0): "
                "train with --model.num_nextn_predict_layers 1, or decode without --speculative"
            )
        if draft_tokens < 1:
            raise UserError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.compile = compile
        self.speculative, self.draft_tokens = speculative, draft_tokens
        if aot and (compile or speculative):
            raise UserError("aot decoding replaces compile and runs no speculative rounds: pick one")
        self.aot = aot if aot is not None else not (compile or speculative) and default_on(model)
        self.speculative_stats: Any = None  # the last speculative call's SpeculativeStats
        self._fast_paths: dict[tuple, tuple[tuple | None, Any]] = {}  # (class, sizes, options) -> (stamp, it)
        self.context_length: int = config.max_position_embeddings
        # the model config's ids win (an imported model carries them); else the tokenizer's own
        special = special_token_ids(tokenizer) if tokenizer is not None else {}
        self.eos_token_id: int | None = _first_not_none(config.eos_token_id, special.get("eot"))
        self.pad_token_id: int = _first_not_none(
            config.pad_token_id, special.get("pad"), self.eos_token_id, 0
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", compile: bool = False, **options: Any
    ) -> Engine:
        """A checkpoint directory, or a run directory (its best checkpoint, else the latest); `options` as
        the constructor's (speculative, draft_tokens)."""
        from deepseek_lm.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, device=device)
        if options.get("speculative") and not ckpt.config.num_nextn_predict_layers:
            raise UserError(
                f"--speculative: {ckpt.path} has no MTP modules (num_nextn_predict_layers=0); train with "
                "--model.num_nextn_predict_layers 1 to decode speculatively, or leave out --speculative"
            )
        return cls(ckpt.model, ckpt.tokenizer, compile=compile, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fast_path(self, cls: type[T], *sizes: int, **options: Any) -> T:
        """`cls(model, *sizes, **options)`: the model's weights rearranged for a fast path (model/decode.py's
        decode steps, model/prefill.py's prefill), kept between calls while they stay the same
        (`weights_stamp`): rearranging them is ~10-20 ms on the seed preset, paid once, not before every
        call's first token; weights that train between calls get a new one."""
        key, stamp = (cls, sizes, tuple(sorted(options.items()))), weights_stamp(self.model)
        kept_stamp, built = self._fast_paths.pop(key, (None, None))
        if built is None or stamp is None or kept_stamp != stamp:
            built = cls(self.model, *sizes, **options)
        self._fast_paths[key] = (stamp, built)  # last in the dict: the most recently used
        while len(self._fast_paths) > _FAST_PATHS_KEPT:
            del self._fast_paths[next(iter(self._fast_paths))]
        return built

    # text API -------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Prompt ids, encoded as `prepare` encodes documents (no BOS: none precedes a document in
        training). An empty prompt starts a new document: the end-of-text token alone."""
        ids = self._require_tokenizer().encode(text, add_special_tokens=False).ids
        if not ids and self.eos_token_id is not None:
            ids = [self.eos_token_id]  # the document separator: what precedes every document in training
        if not ids:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        return ids

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: StreamCallback | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> Completion | list[Completion]:
        """Complete one prompt (→ a `Completion`) or a batch (→ a list, decoded together).

        `stream(index, piece)` is called with each piece of text as soon as it is final. `stop_token_ids`
        end a row as the end-of-sequence token does (a chat template's end of turn: `ChatFormat`).
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
        rows = [self.encode(t) for t in texts]
        run = self._run(
            rows, max_new_tokens, sampling, seed, stop, stream is not None, stop_token_ids=stop_token_ids
        )
        results = _drain(run, stream)
        return results[0] if single else results

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> Iterator[str]:
        """The text of one completion, piece by piece as it is produced (arguments as in `generate`)."""
        sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
        run = self._run(
            [self.encode(prompt)], max_new_tokens, sampling, seed, stop, True, stop_token_ids=stop_token_ids
        )
        for _, piece in run:
            yield piece

    # token API ------------------------------------------------------------------------------------------

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        *,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: StreamCallback | None = None,
        output_logits: bool = False,
        stop_token_ids: Sequence[int] = (),
    ) -> list[Completion]:
        """Complete a batch of token-id prompts; `output_logits` keeps each step's next-token logits."""
        sampling = sampling if sampling is not None else SamplingConfig()
        rows = [list(p) for p in prompt_ids]
        run = self._run(
            rows, max_new_tokens, sampling, seed, stop, stream is not None, output_logits, stop_token_ids
        )
        return _drain(run, stream)

    # the loop -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(
        self,
        rows: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig,
        seed: int | None,
        stop: str | Sequence[str] | None,
        want_stream: bool,
        output_logits: bool = False,
        stop_token_ids: Sequence[int] = (),
    ) -> Iterator[tuple[int, str]]:
        """Yield (row, text piece) while decoding; return the completions (as StopIteration's value)."""
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not rows or any(len(r) == 0 for r in rows):
            raise UserError("every prompt needs at least one token")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        rows = [self._fit_to_context(r, max_new_tokens, i) for i, r in enumerate(rows)]
        state_type = SpeculativeState if self.speculative else DecodeState
        state = state_type(self, rows, max_new_tokens, sampling, seed, output_logits, stop_token_ids)
        self.speculative_stats = getattr(state, "stats", None)
        streams = None
        if want_stream or stops:
            tokenizer = self._require_tokenizer()
            streams = [TextStream(tokenizer, stops, r) for r in rows]
        sync_every = 1 if streams is not None or self.device.type == "cpu" else _SYNC_EVERY
        for t in range(state.steps):
            state.step(t, last=t == state.steps - 1)
            if streams is not None:
                yield from _push_text(state, streams, t)
            if (t + 1) % sync_every == 0 and state.finished(t):
                break
        if streams is not None:
            yield from ((b, piece) for b, s in enumerate(streams) if (piece := s.finish()))
        return state.completions(streams)

    def _fit_to_context(self, ids: list[int], max_new_tokens: int, index: int) -> list[int]:
        ctx = self.context_length
        keep = max(ctx - max_new_tokens, ctx // 2)
        if len(ids) <= keep:
            return ids
        warnings.warn(
            f"prompt {index} has {len(ids)} tokens; keeping its last {keep} so that new tokens fit the "
            f"{ctx}-token context (generation stops at the end of the context)",
            PromptTruncatedWarning,
            stacklevel=2,
        )
        return ids[-keep:]

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise UserError(
                "this model has no tokenizer (no tokenizer.json in the checkpoint): pass token ids"
            )
        return self.tokenizer


def _push_text(state: DecodeState, streams: list[TextStream], t: int) -> Iterator[tuple[int, str]]:
    """Feed step t's tokens to the rows' text streams; a row that hits a stop string is finished."""
    for b, token in enumerate(state.out[:, t].tolist()):
        if b in state.ended or t >= state.budget[b]:
            continue
        if token in state.ends:
            state.ended.add(b)
            continue
        piece = streams[b].push(token)
        if streams[b].stopped:
            state.ended.add(b)
            state.stopped_at[b] = t
            state.done[b] = True
        if piece:
            yield b, piece


def _drain(run: Iterator[tuple[int, str]], callback: StreamCallback | None) -> list[Completion]:
    while True:
        try:
            index, piece = next(run)
        except StopIteration as finished:
            return finished.value
        if callback is not None:
            callback(index, piece)


def _first_not_none(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
