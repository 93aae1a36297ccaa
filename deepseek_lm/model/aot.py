"""The decode step compiled ahead of time with AOTInductor: a shared library of C++ kernels that its own C++
code calls one after the other, with no Python between operations (on a CPU at batch 1 the step is ~70
small kernels, and Python's dispatch of each used to cost more than its arithmetic).

`CompiledStep(weights, shapes)` exports `decode_step` of a `DecoderWeights` layout (model/decode.py) plus
each row's greedy next token with `torch.export`, compiles it with `torch._inductor.aoti_compile_and_package`
and loads it with the loader that `aoti_load_package` wraps. The weights are inputs of the compiled step,
not constants baked into it: one artifact serves every checkpoint of a configuration and weights that
change between calls (a model in training) need no new compile. The cache length is a dynamic dimension
(one artifact for every prompt and output length), and so is the batch from 2 rows: one library for the
sizes that gather each token's experts (`gathers`), one for those that run every expert. `CompiledPrefill`
is the same step over a prompt's tokens (their number dynamic), for short prompts of one row.

Artifacts are cached on disk (`cache_dir()`, `$DEEPSEEK_LM_CACHE` or ~/.cache/deepseek-lm), keyed by all
they depend on: the configuration, the weights' shapes and layouts, the batch size (or the dynamic range)
and the caches' layout, the dtype, the torch version, the CPU's vector instruction set and the source of
the decode code. A cold start compiles (~30-80 s per library on the 2-core dev VM), a warm one loads the
library (~10 ms).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.errors import Notice
from deepseek_lm.model import decode, moe, onednn
from deepseek_lm.model.decode import Decoder
from deepseek_lm.model.mla import LatentCache, token_positions
from deepseek_lm.model.transformer import DeepSeekLM

_MAX_BATCH = 1024  # the dynamic batch dimension's upper bound (dense steps)
_GATHERED_READS = 10  # compiled steps gather experts while the rows read each expert fewer times than this
# `Engine` decodes through the libraries up to this many rows: from 3 the eager decoder's products go through
# oneDNN's AVX-512 kernels (decode.py), faster than the libraries' MKL products where the head is large (seed
# preset, one thread: batch 4 762 vs 600 tokens/s, 8 1,275 vs 1,068; batch 1 473 vs 268, 2 395 vs 291)
ENGINE_MAX_BATCH = 2
# The generated kernels run on one thread: a step is ~70 of them, each a few µs at batch 1, and a parallel
# region per kernel costs more than it saves (and on a busy machine every one waits for a descheduled
# thread: 7 tokens/s at 2 threads against 540 at 1, load 5). The products inductor leaves to torch (mm)
# still use torch's threads.
_INDUCTOR = {"cpp.threads": 1}
_LOADED: dict[str, Any] = {}  # key -> the loaded package's runner, shared by every decoder in the process


class CompileNotice(Notice):
    """The decode step is being compiled (once per configuration and machine; cached on disk)."""


def cache_dir() -> Path:
    """$DEEPSEEK_LM_CACHE/aot, else ~/.cache/deepseek-lm/aot (or under $XDG_CACHE_HOME)."""
    if root := os.environ.get("DEEPSEEK_LM_CACHE"):
        return Path(root) / "aot"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepseek-lm" / "aot"


@functools.cache
def available() -> bool:
    """Whether steps can be compiled here: a C++ compiler that inductor will call (g++, or $CXX)."""
    from torch._inductor import config

    return shutil.which(config.cpp.cxx[1] or "g++") is not None


def default_on(model: torch.nn.Module) -> bool:
    """Whether the engines use compiled steps unless told otherwise: a CPU model in fp32 where a C++
    compiler is, unless $DEEPSEEK_LM_AOT is 0."""
    p = next(model.parameters())
    on = os.environ.get("DEEPSEEK_LM_AOT", "1") != "0"
    return on and p.device.type == "cpu" and p.dtype == torch.float32 and available()


def gathers(config, rows: int) -> bool:
    """Whether a compiled step of `rows` rows gathers each token's experts (a fused kernel that reads them in
    place) rather than running every expert through the library's products: on this project's CPU it wins
    up to ~9 reads of each expert (demo, one thread, a step at batch 2 604 vs 1,110 µs, 4 1,085 vs 2,081, 8
    1,757 vs 2,705, 16, 64 reads of 7 experts, 3,233 vs 3,971): MKL runs its generic kernels on AMD."""
    return rows * config.num_experts_per_tok < _GATHERED_READS * config.n_routed_experts


def library_batch(config, rows: int) -> int:
    """The batch size whose library serves steps of `rows` rows: 1 for one row; from 2, one library (a
    dynamic batch) for the sizes that gather experts, from 2 up, and one for those that run every expert,
    from the smallest such size up."""
    if rows == 1 or gathers(config, rows):
        return min(rows, 2)
    return next(b for b in range(2, rows + 1) if not gathers(config, b))


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The inputs a library is compiled for: `batch` rows (from `batch` up when `dynamic_batch`), and
    caches whose rows are `slot_positions` positions apart (a slice of the first L of them; None:
    contiguous caches of L positions). Any L from 2 up to the context (or slot_positions - 1)."""

    batch: int
    dynamic_batch: bool = False
    slot_positions: int | None = None
    tokens: bool = False  # a prompt's tokens (2 up a row) in, the final-normed state after the last out


class CompiledStep:
    """`step(ids_BT, pos_BT, kvs)` -> (logits (B, V), greedy next ids (B,)) = `decode_step(weights, ...,
    masked=True)` and its argmax, through the compiled library (`step.hidden(...)`: a prompt library's
    `decode_hidden`). kvs: per layer a (B, L, r + dr) cache as `shapes` says."""

    def __init__(self, weights: decode.DecoderWeights, shapes: Shapes) -> None:
        if shapes.batch == 1 and not shapes.dynamic_batch:  # one row: how far apart rows are never matters
            shapes = dataclasses.replace(shapes, slot_positions=None)
        elif shapes.dynamic_batch:  # the sizes of a library share the library of the smallest
            shapes = dataclasses.replace(shapes, batch=library_batch(weights.config, shapes.batch))
        self.template, self.shapes = weights, shapes
        self.weights = flatten(weights)
        self.key = _key(weights, shapes)
        self.runner = _LOADED.get(self.key) or self._load()
        _LOADED[self.key] = self.runner

    def __call__(
        self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (threads := torch.get_num_threads()) == 1:
            next_ids, logits = self.runner.run([ids_BT, pos_BT, *kvs, *self.weights])
            return logits, next_ids
        # A step on one thread: its library products (~25 a step, a few µs each at batch 1) gain less from a
        # second thread than each parallel region costs, and every region waits for a thread that the
        # server's event loop or another process holds (batch 1 on a busy machine: 145 tokens/s at 2 threads
        # against 2,829 at 1, load 3; the server on a quiet one, demo, 2 threads: 4 clients 1,568 against
        # 1,021 tokens/s, 16 clients 2,100 against 1,823, load 1.2).
        torch.set_num_threads(1)
        try:
            next_ids, logits = self.runner.run([ids_BT, pos_BT, *kvs, *self.weights])
        finally:
            torch.set_num_threads(threads)
        return logits, next_ids

    def hidden(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor]) -> torch.Tensor:
        """A prompt library's output: `decode_hidden(weights, ...)`, the state after each row's last token."""
        return self.runner.run([ids_BT, pos_BT, *kvs, *self.weights])[0]

    def _load(self) -> Any:
        path = cache_dir() / self.key / "decode_step.pt2"
        if not path.exists():
            warnings.warn(
                f"compiling the decode step for this model and batch size once (about a minute on 2 cores); "
                f"cached in {path.parent}",
                CompileNotice,
                stacklevel=4,
            )
            _compile(self.template, self.shapes, path)
        # the loader `torch._inductor.aoti_load_package` wraps, without importing inductor's packaging
        # (2-5 s of imports at a process's first load; the loader itself ~10 ms)
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)


class AOTDecoder(Decoder):
    """A `Decoder` whose one-token steps run through a `CompiledStep` (built, or loaded from the disk cache,
    with the decoder): `decoder(ids, cache, start_pos)` as `Decoder`'s, and `with_argmax` gives each row's
    greedy next token, taken in the step, beside the logits. The cache must be contiguous (a
    `LatentCache`'s is); the step attends to all of it under the causal mask (one row: to the positions in
    use)."""

    def __init__(self, model: DeepSeekLM, batch_size: int, slot_positions: int | None = None) -> None:
        """`slot_positions`: steps read slices of caches whose rows hold that many positions (`Shapes`),
        through `self.compiled`; None: a `LatentCache` each call."""
        # the compiled graphs' layout, no packed weights; experts gathered as `gathers` says
        super().__init__(model, batch_size, compile=True, dense=not gathers(model.config, batch_size))
        if self.weights.head_packed is not None:  # the head runs inside the step: its plain (D, V) copy
            head = model.lm_head.weight.detach().t().contiguous()
            self.weights = dataclasses.replace(self.weights, head_DV=head, head_packed=None)
        self.compile = False
        # from 2 rows a library serves a range of batch sizes (the batch dynamic): `library_batch`
        self.compiled = CompiledStep(self.weights, Shapes(batch_size, batch_size > 1, slot_positions))

    def __call__(self, ids: torch.Tensor, cache: LatentCache, start_pos: int | torch.Tensor) -> torch.Tensor:
        return self.with_argmax(ids, cache, start_pos)[0]

    def with_argmax(
        self, ids: torch.Tensor, cache: LatentCache, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = ids.shape
        if T != 1 or cache.max_len < 2:  # several tokens a row (or a 1-position cache): the eager step
            return super().__call__(ids, cache, start_pos), None
        start, pos_BT, end = token_positions(
            start_pos, B, T, ids.device, self.weights.rope.shape[1], cache.max_len
        )
        if start is not None:
            pos_BT = torch.full((B, 1), start, dtype=torch.long, device=ids.device)
        # one row attends to the positions in use (how far apart rows are never matters to it)
        kvs = [kv[:, : max(end, 2)] for kv in cache.kv] if B == 1 else cache.kv
        return self.compiled(ids, pos_BT, kvs)


class CompiledPrefill:
    """Short prompts of one row through a library of the step over several tokens (every expert run, as a
    prompt's tokens pick most of them): `prefill(ids, cache, start_pos)` = `fill(...)`'s final-normed state
    after the last token (1, D), the latents written into the cache. Where the model's forward would run:
    under `prefill.MIN_TOKENS` tokens it is ~100 Python dispatches a layer (~8 ms for a 10-token prompt on
    the seed architecture, one thread); the oneDNN prefill takes the longer prompts."""

    def __init__(self, model: DeepSeekLM) -> None:
        weights = Decoder(model, model.config.n_routed_experts, compile=True).weights  # dense experts
        weights = dataclasses.replace(weights, head_DV=None, head_packed=None)  # no head: states out
        self.compiled = CompiledStep(weights, Shapes(1, tokens=True))

    @staticmethod
    def takes(ids_BT: torch.Tensor, every_state: bool) -> bool:
        return ids_BT.shape[0] == 1 and ids_BT.shape[1] >= 2 and not every_state

    def __call__(
        self, ids_BT: torch.Tensor, cache: LatentCache, start_pos: int | torch.Tensor
    ) -> torch.Tensor:
        start, T = int(start_pos), ids_BT.shape[1]
        pos_BT = torch.arange(start, start + T, device=ids_BT.device)[None]
        token_positions(start, 1, T, ids_BT.device, self.compiled.template.rope.shape[1], cache.max_len)
        return self.compiled.hidden(ids_BT, pos_BT, [kv[:, : start + T] for kv in cache.kv])


class _Step(torch.nn.Module):
    """What is exported: the step over weights passed in (the template gives their structure); a prompt
    library's (`tokens`) ends at the final-normed states."""

    def __init__(self, template: decode.DecoderWeights, tokens: bool) -> None:
        super().__init__()
        self.template, self.tokens = template, tokens

    def forward(self, ids_BT, pos_BT, kvs, weights):
        w = unflatten(self.template, weights)
        if self.tokens:
            return (decode.decode_hidden(w, ids_BT, pos_BT, kvs, masked=True),)
        logits = decode.decode_step(w, ids_BT, pos_BT, kvs, masked=True)
        return logits.argmax(-1), logits


def _compile(weights: decode.DecoderWeights, shapes: Shapes, path: Path) -> None:
    cfg = weights.config
    # an example of 1 row would specialise the dimension to 1
    B = max(shapes.batch, 2) if shapes.dynamic_batch else shapes.batch
    L = min(64, cfg.max_position_embeddings)
    T = 4 if shapes.tokens else 1
    dtype, dev = weights.embed.dtype, weights.embed.device
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    pos = torch.arange(L - T, L, device=dev).expand(B, T).contiguous()
    C, slots = cfg.kv_lora_rank + cfg.qk_rope_head_dim, shapes.slot_positions
    # a slice of longer rows: the library keeps their stride, whatever L (which stays below it)
    kvs = [torch.zeros(B, slots or L, C, dtype=dtype, device=dev)[:, :L] for _ in weights.attn]
    Ld = torch.export.Dim("L", min=2, max=slots - 1 if slots else cfg.max_position_embeddings)
    if shapes.dynamic_batch:  # the gathering sizes (from 2), or every size from the first dense one
        top = _MAX_BATCH if not gathers(cfg, B) else max(b for b in range(B, _MAX_BATCH) if gathers(cfg, b))
        Bd = torch.export.Dim("B", min=B, max=top) if top > B else None
    else:
        Bd = None
    rows = {0: Bd} if Bd is not None else {}
    tokens = {**rows, 1: torch.export.Dim("T", min=2, max=cfg.max_position_embeddings)} if T > 1 else rows
    dims = (tokens, tokens, [{**rows, 1: Ld}] * len(kvs), [None] * len(flatten(weights)))
    with torch.no_grad():
        program = torch.export.export(
            _Step(weights, shapes.tokens), (ids, pos, kvs, flatten(weights)), dynamic_shapes=dims
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        # compiled beside its final place, then renamed: a reader never sees half a file
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            try:
                built = torch._inductor.aoti_compile_and_package(
                    program, package_path=str(Path(tmp) / path.name), inductor_configs=_INDUCTOR
                )
            finally:  # inductor's pool of compile processes would otherwise stay for the process's life
                from torch._inductor.async_compile import shutdown_compile_workers

                shutdown_compile_workers()
            os.replace(built, path)


def flatten(weights: decode.DecoderWeights) -> list[torch.Tensor]:
    """The tensors of a `DecoderWeights`, in field order (layers in turn), None fields left out."""
    out = []
    for f in dataclasses.fields(weights):
        value = getattr(weights, f.name)
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, list):
            out += [t for layer in value for t in flatten_layer(layer)]
    return out


def flatten_layer(layer: Any) -> list[torch.Tensor]:
    return [t for f in dataclasses.fields(layer) if isinstance(t := getattr(layer, f.name), torch.Tensor)]


def unflatten(template: decode.DecoderWeights, tensors: list[torch.Tensor]) -> decode.DecoderWeights:
    """`template` with its tensors replaced by `tensors` (as `flatten` lists them)."""
    it = iter(tensors)

    def fill(obj: Any) -> Any:
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = next(it)
            elif isinstance(value, list):
                changes[f.name] = [fill(layer) for layer in value]
        return dataclasses.replace(obj, **changes)

    return fill(template)


def _key(weights: decode.DecoderWeights, shapes: Shapes) -> str:
    """A hash of everything the compiled library depends on."""

    def structure(obj: Any) -> Any:  # every field but the tensors' values: shapes, strides, dtypes, ints
        if isinstance(obj, torch.Tensor):
            return [list(obj.shape), list(obj.stride()), str(obj.dtype)]
        if isinstance(obj, list):
            return [structure(v) for v in obj]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            if obj is weights.config:
                return obj.to_dict()
            return {f.name: structure(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return obj

    code = "".join(inspect.getsource(m) for m in (decode, moe, onednn, sys.modules[__name__]))
    parts = dict(
        weights=structure(weights),
        shapes=dataclasses.asdict(shapes),
        torch=torch.__version__,
        isa=torch.backends.cpu.get_cpu_capability(),  # what inductor's kernels are built for
        code=hashlib.sha256(code.encode()).hexdigest(),
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
