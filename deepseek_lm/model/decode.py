"""Decode steps over the latent cache with the weights rearranged for a few tokens at a time.

A decode step runs one token per row through every layer. Its cost is not FLOPs but the number of operations
(each one a dispatch, and on a CPU a trip through caches that the weights streamed past have just emptied)
and the bytes of weights read. `Decoder` takes a trained `DeepSeekLM` and precomputes, once per generation
call, layouts that do the same math in fewer and larger products:

- MLA, absorbed (DeepSeek-V2 §2.1.3, V3 `inference/model.py`): W_uk folded into the query projection and
  W_uv into the output projection ahead of time, instead of two einsums per step; the down-projections of
  the query and of the latent KV read x in one product. The softmax scale is folded into the query, and
  RoPE reads each rope vector's pair-swapped copy from extra columns of the same product
  (x·cos + swap(x)·sin, two in-place operations instead of a flip, a copy and a cat).
- RMSNorm weights folded into the product that follows the norm wherever the decoder copies that product's
  weights anyway (attention in, query up, FFN in, router); the norm itself then runs without a weight.
- DeepSeekMoE at small batches: when the step's tokens pick most experts anyway (B·K ≥ E/2 eager, B·K ≥ E
  compiled), every expert and the shared experts run as one up-projection and one down-projection, with the
  gate weights of unchosen experts zero. Otherwise each token's K experts are gathered and run as two
  batched products (compiled on a CPU: a generated kernel that reads the chosen experts in place), with no
  host synchronisation (the model's sparse dispatch sorts and counts). Routing is the model's own `route`,
  so the same experts win; the outputs equal the model's up to the order of fp32 additions.
- The LM head as a (D, V) copy: a (B, D) @ (D, V) product streams the weight row by row, ~3× faster on a
  CPU at batch 1 than F.linear's (V, D) layout. From 3 rows up on a CPU, oneDNN's product over the weight
  in its own blocked layout instead (`onednn.pack`), and the same for the SwiGLUs' products outside compiled
  graphs: MKL is slow for a few rows times a wide matrix.
- Batch-invariant (`batch_invariant=True`, what serve's continuous batching builds): a row's logits do not
  depend on the other rows of the step nor on the attended length, bitwise (see `Decoder`).

The step itself, `decode_step`, is a function of tensors and the config with static shapes, so
`Decoder(..., compile=True)` runs it through `torch.compile` up to the head (`decode_hidden`; one graph per
batch size and cache length, shared by every decoder; on a CPU with inductor's C++ wrapper, which calls the
kernels without Python in between). Eager, it attends to the cache positions in use; compiled, to the whole
cache under a mask.

The decoder holds rearranged copies of the model's weights, made when it is built (gathered experts read
the model's own tensors): build a new one after the weights change (the engine keeps one per batch size
while `weights_stamp` says they have not). `model(...)` with a cache stays the reference: tests/test_decode.py
holds the two to 1e-5.

Legend: B rows, T new tokens per row, N = B·T, D hidden, H heads, r kv_lora_rank, dr rope dim,
ql q_lora_rank, E routed experts, K experts per token, I expert intermediate size, S shared experts (of I
each), V vocabulary, L cache positions attended, A = B·T·K token-expert assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import onednn
from deepseek_lm.model.mla import MLA, LatentCache, token_positions
from deepseek_lm.model.moe import MoE, route
from deepseek_lm.model.transformer import DeepSeekLM


@dataclass
class _Attention:
    """One layer's MLA, absorbed; the input norm, the q norm and the softmax scale folded in."""

    # products as (K, M) for x @ w, or as (M, K) packed by oneDNN in a batch-invariant decoder (`onednn.mm`)
    # (D, ql + r + 2·dr): [c_q | c_kv | k_pe | swap(k_pe)]; without q lora (D, H·(r + 2·dr) + r + 2·dr), q first
    w_in: torch.Tensor
    w_q: torch.Tensor | None  # (ql, H·(r + 2·dr)): per head [q_lat | q_pe], then per head swap(q_pe)
    kv_norm: torch.Tensor  # (r,) the latent's norm weight: the cache holds the model's normed c_kv
    w_out: torch.Tensor  # (H·r, D): W_o·W_uv


@dataclass
class _FFN:
    """One layer's feed-forward: SwiGLUs side by side as one product pair — the dense FFN, or the shared
    experts plus (when dense) every routed expert — and otherwise the routed experts gathered per token."""

    norm: torch.Tensor | None  # the post-attention norm's weight; None when folded into w_in and router
    # (D, 2·n·I): the n SwiGLUs' gates, then their ups; or (2·n·I, D) packed by oneDNN (`onednn.mm`)
    w_in: torch.Tensor | None
    w_down: torch.Tensor | None  # (D, n·I): F.linear's layout, which a CPU reads faster; or packed
    always_on: int  # leading columns of the activation with weight 1 (the dense FFN or the shared experts)
    router: torch.Tensor | None  # (D, E) fp32, or packed; None for a dense FFN
    bias: torch.Tensor | None  # (E,) the selection bias
    experts_gu: torch.Tensor | None  # (E, 2I, D) the model's own, gathered per token; None when dense
    experts_down: torch.Tensor | None  # (E, D, I)


@dataclass
class DecoderWeights:
    config: DeepSeekConfig
    embed: torch.Tensor  # (V, D)
    rope: torch.Tensor  # (2, max positions, dr) in the weights' dtype
    attn: list[_Attention]
    ffn: list[_FFN]
    norm: torch.Tensor  # (D,) final norm weight
    head_DV: torch.Tensor | None  # (D, V); None when head_packed stands in for it
    head_packed: torch.Tensor | None  # (V, D) in oneDNN's blocked layout for B rows (CPU, B ≥ 3)
    route_rows: int = 1  # routing runs on a multiple of this many rows (`_route`)
    kv_chunk: int = 0  # attention's values summed over slices of this many positions (`_values`); 0: one


def _pair_swap(n: int) -> torch.Tensor:
    """Index (1, 0, 3, 2, ...): row j of a rope projection by it gives x_{j^1}, RoPE's rotation partner."""
    return torch.arange(n).view(-1, 2).flip(-1).flatten()


def _attention_weights(attn: MLA, norm_w: torch.Tensor, pack_rows: int | None) -> _Attention:
    H, dn, dr, dv, r = attn.n_heads, attn.dn, attn.dr, attn.dv, attn.kv_lora_rank
    w_ukv = attn.kv_b_proj.weight.view(H, dn + dv, r)
    w_q = (attn.q_proj if attn.q_lora_rank == 0 else attn.q_b_proj).weight.view(H, dn + dr, -1)
    w_q_pe = w_q[:, dn:]
    # per head [W_uk^T W_q_nope ; W_q_pe], then every head's swapped W_q_pe rows; q from c_q (or x)
    w_q_abs = torch.cat((torch.einsum("hdr,hdq->hrq", w_ukv[:, :dn], w_q[:, :dn]), w_q_pe), dim=1)
    w_q_all = torch.cat((w_q_abs.flatten(0, 1), w_q_pe[:, _pair_swap(dr)].flatten(0, 1))) * attn.scale
    w_kv = attn.kv_a_proj_with_mqa.weight  # (r + dr, D)
    w_kv = torch.cat((w_kv, w_kv[r:][_pair_swap(dr)]))  # (r + 2·dr, D)
    if attn.q_lora_rank == 0:
        w_in, w_q_out = torch.cat((w_q_all, w_kv)), None
    else:
        w_in = torch.cat((attn.q_a_proj.weight, w_kv))
        w_q_out = _held((w_q_all * attn.q_a_layernorm.weight).t(), pack_rows)
    w_o = attn.o_proj.weight.view(-1, H, dv)  # (D, H, dv)
    return _Attention(
        w_in=_held((w_in * norm_w).t(), pack_rows),
        w_q=w_q_out,
        kv_norm=attn.kv_a_layernorm.weight.clone(),
        w_out=_held(torch.einsum("Dhv,hvr->hrD", w_o, w_ukv[:, dn:]).reshape(H * r, -1), pack_rows),
    )


def _held(weight_KM: torch.Tensor, pack_rows: int | None) -> torch.Tensor:
    """A product's (K, M) weight as `onednn.mm` takes it: packed by oneDNN for `pack_rows` rows where
    `onednn.pack` can, else contiguous."""
    packed = onednn.pack(weight_KM.t(), pack_rows)
    return packed if packed is not None else weight_KM.contiguous()


def _ffn_weights(
    mlp: torch.nn.Module, norm_w: torch.Tensor, dense: bool, pack_rows: int | None, pack_router: bool
) -> _FFN:
    """dense: the routed experts join the always-on SwiGLUs (a dense FFN layer is always 'dense').
    pack_rows: the SwiGLUs' products packed by oneDNN for that many rows (and the router's, `pack_router`)."""
    if not isinstance(mlp, MoE):  # the dense FFN of the first layers
        gates, ups, downs = [mlp.gate_proj.weight], [mlp.up_proj.weight], [mlp.down_proj.weight]
    elif mlp.shared_experts is not None:
        sh = mlp.shared_experts
        gates, ups, downs = [sh.gate_proj.weight], [sh.up_proj.weight], [sh.down_proj.weight]
    else:
        gates, ups, downs = [], [], []
    always_on = sum(w.shape[0] for w in gates)
    router = bias = experts_gu = experts_down = None
    if isinstance(mlp, MoE):
        E = mlp.config.n_routed_experts
        router, bias = mlp.gate.weight.float(), mlp.gate.e_score_correction_bias.clone()
        if dense:
            gate_EID, up_EID = mlp.experts.gate_up_proj.view(E, 2, -1, norm_w.shape[0]).unbind(1)
            gates.append(gate_EID.flatten(0, 1))
            ups.append(up_EID.flatten(0, 1))
            downs.append(mlp.experts.down_proj.transpose(0, 1).flatten(1))  # (D, E·I)
        else:
            experts_gu, experts_down = mlp.experts.gate_up_proj, mlp.experts.down_proj
    fold = dense or not isinstance(mlp, MoE)  # the norm folds only where every product is a copy
    scale = norm_w if fold else torch.ones_like(norm_w)
    w_down = torch.cat(downs, dim=1) if downs else None  # (D, n·I)
    return _FFN(
        norm=None if fold else norm_w,
        w_in=_held((torch.cat(gates + ups) * scale).t(), pack_rows) if gates else None,
        w_down=_first_not_none(onednn.pack(w_down, pack_rows), w_down),
        always_on=always_on,
        router=_held((router * scale.float()).t(), pack_rows if pack_router else None)
        if router is not None
        else None,
        bias=bias,
        experts_gu=experts_gu,
        experts_down=experts_down,
    )


def decode_step(
    w: DecoderWeights, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor], masked: bool
) -> torch.Tensor:
    """ids (B, T) at absolute positions pos_BT (B, T) -> logits after each row's last token (B, V)."""
    return _head(w, decode_hidden(w, ids_BT, pos_BT, kvs, masked))


def decode_hidden(
    w: DecoderWeights, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor], masked: bool
) -> torch.Tensor:
    """`decode_step` up to the LM head: the final-normed states after each row's last token (B, D).

    kvs: per layer the (B, L, r + dr) cache the step writes its latents into and attends to; a position
    p > pos is hidden when `masked` (needed unless L = the single position + 1 of every row; unmasked, the
    step writes its latents into the last position).
    """
    B, T = ids_BT.shape
    x = _trunk(w, ids_BT, pos_BT, kvs, masked)
    return _rms_norm(x.view(B, T, -1)[:, -1], w.norm, w.config.rms_norm_eps)


def decode_states(
    w: DecoderWeights, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor], masked: bool
) -> torch.Tensor:
    """`decode_hidden` at every position: (B, T, D) final-normed states (speculative verification)."""
    B, T = ids_BT.shape
    return _rms_norm(_trunk(w, ids_BT, pos_BT, kvs, masked), w.norm, w.config.rms_norm_eps).view(B, T, -1)


@dataclass
class StepPositions:
    """Where a step's N = B·T tokens sit, shared by its layers."""

    pos_BT: torch.Tensor  # (B, T) absolute positions
    cos: torch.Tensor  # (N, 1, dr) rope tables at those positions
    sin: torch.Tensor
    rows_B1: torch.Tensor  # (B, 1) row indices, for writing latents
    hide: torch.Tensor | None  # (B, T, 1, L) True where a position is after the token's own; None unmasked


def step_positions(w: DecoderWeights, pos_BT: torch.Tensor, n_positions: int, masked: bool) -> StepPositions:
    cos, sin = w.rope[:, pos_BT.flatten(), None]  # (N, 1, dr) each
    dev = pos_BT.device
    hide = torch.arange(n_positions, device=dev) > pos_BT[..., None, None] if masked else None
    return StepPositions(pos_BT, cos, sin, torch.arange(pos_BT.shape[0], device=dev)[:, None], hide)


def _trunk(w: DecoderWeights, ids_BT, pos_BT, kvs: list[torch.Tensor], masked: bool) -> torch.Tensor:
    """Every layer over the tokens -> the residual stream (N, D), before the final norm."""
    # the residual stream as (N, D), N = B·T: 2-D products go straight to mm (3-D ones fold and unfold)
    x = F.embedding(ids_BT.flatten(), w.embed)
    at = step_positions(w, pos_BT, kvs[0].shape[1], masked)
    for attn, ffn, kv in zip(w.attn, w.ffn, kvs):
        x = decoder_layer(w, attn, ffn, x, at, kv)
    return x


def decoder_layer(
    w: DecoderWeights, attn: _Attention, ffn: _FFN, x: torch.Tensor, at: StepPositions, kv: torch.Tensor
) -> torch.Tensor:
    """One block (`attn`, `ffn`: a layer of `w`'s or an MTP module's) over the residual stream x (N, D) with
    its cache kv (B, L, r + dr) -> x (N, D)."""
    cfg = w.config
    h = _rms_norm(x, None, cfg.rms_norm_eps)  # its weight is in attn.w_in
    x = x + _attention(attn, cfg, h, at.cos, at.sin, kv, at.rows_B1, at.pos_BT, at.hide, w.kv_chunk)
    return x + _ffn(ffn, cfg, x, w.route_rows)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension. In fp32 in six light operations: on a CPU F.rms_norm is
    composite, ~16 dispatches with its casts, ~13 µs at one row against ~8 here, and a step runs 4 per layer.
    Half types keep F.rms_norm, which normalises them in fp32."""
    if x.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    x = x * n.mul_(n).div_(x.shape[-1]).add_(eps).rsqrt_()  # 1 / sqrt(mean(x²) + eps)
    return x if weight is None else x.mul_(weight)


def _attention(
    a: _Attention, cfg: DeepSeekConfig, h, cos, sin, kv, rows_B1, pos_BT, hide, kv_chunk: int
) -> torch.Tensor:
    """h (N, D) normed, N = B·T -> (N, D); writes the tokens' [c_kv | k_pe] into kv at pos_BT (B, T)."""
    (B, T), N = pos_BT.shape, h.shape[0]
    H, r, dr, ql = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank
    y = onednn.mm(h, a.w_in)
    if a.w_q is None:
        q, lat = y.split([H * (r + 2 * dr), r + 2 * dr], dim=-1)
    else:
        c_q, lat = y.split([ql, r + 2 * dr], dim=-1)
        q = onednn.mm(_rms_norm(c_q, None, cfg.rms_norm_eps), a.w_q)
    q, q_swap = q.split([H * (r + dr), H * dr], dim=-1)
    q = q.view(N, H, r + dr)  # scaled
    q[..., r:].mul_(cos).addcmul_(q_swap.view(N, H, dr), sin)  # RoPE: x·cos + swap(x)·sin
    c_kv, k_pe, k_swap = lat.split([r, dr, dr], dim=-1)
    k_pe.mul_(cos[:, 0]).addcmul_(k_swap, sin[:, 0])
    latent = torch.cat((_rms_norm(c_kv, a.kv_norm, cfg.rms_norm_eps), k_pe), dim=-1)  # (N, r + dr)
    if hide is None:  # unmasked: every row's one token sits at the last position (a slice, not an index_put)
        kv[:, -1] = latent
    else:
        kv[rows_B1, pos_BT] = latent.view(B, T, -1)
    # all heads read the same latent rows (MQA in the latent space); a position's value is its c_kv
    scores = torch.bmm(q.reshape(B, T * H, -1), kv.transpose(1, 2))  # (B, T·H, L)
    if hide is not None:
        scores = scores.view(B, T, H, -1).masked_fill_(hide, float("-inf")).flatten(1, 2)
    o_lat = _values(scores.softmax(-1, dtype=torch.float32).to(kv.dtype), kv[..., :r], kv_chunk)
    return onednn.mm(o_lat.view(N, H * r), a.w_out)


def _values(p: torch.Tensor, c_kv: torch.Tensor, chunk: int) -> torch.Tensor:
    """p (B, T·H, L) @ c_kv (B, L, r) -> (B, T·H, r). With a chunk, the sum over L runs as products over
    `chunk` positions added in order: a product's rounding depends on its length, so a batch-invariant
    decoder, whose attended L follows the longest row, keeps a row's result its own (the positions past a
    row's end weigh exactly 0)."""
    L = c_kv.shape[1]
    if not chunk or chunk >= L:
        return torch.bmm(p, c_kv)
    out = torch.bmm(p[..., :chunk], c_kv[:, :chunk])
    for start in range(chunk, L, chunk):
        out += torch.bmm(p[..., start : start + chunk], c_kv[:, start : start + chunk])
    return out


def _ffn(f: _FFN, cfg: DeepSeekConfig, x: torch.Tensor, route_rows: int) -> torch.Tensor:
    """x (N, D), the residual stream (normed here) -> (N, D)."""
    N, D = x.shape
    h_ND = _rms_norm(x, f.norm, cfg.rms_norm_eps)
    if f.router is not None:
        ids_NK, w_NK = _route(onednn.mm(h_ND.float(), f.router), f.bias, cfg, route_rows)
    out = None
    if f.w_in is not None:
        gate, up = onednn.mm(h_ND, f.w_in).chunk(2, dim=-1)
        act = F.silu(gate) * up  # (N, n·I)
        if f.router is not None and f.experts_gu is None:  # dense: unchosen experts weigh 0
            w_NE = h_ND.new_zeros(N, cfg.n_routed_experts).scatter_(1, ids_NK, w_NK.to(h_ND.dtype))
            act[:, f.always_on :].unflatten(-1, (w_NE.shape[1], -1)).mul_(w_NE[..., None])
        out = onednn.mm(act, f.w_down) if f.w_down.is_mkldnn else F.linear(act, f.w_down)
    if f.experts_gu is not None:  # each token's K experts, gathered: (A, 2I, D) and (A, D, I)
        # index_select copies whole matrices (indexing goes element by element), and a row times a
        # transposed matrix streams the weights ~8× faster on a CPU than the matrix times a column
        K, ids_A = ids_NK.shape[1], ids_NK.flatten()
        x_A1D = h_ND.repeat_interleave(K, dim=0)[:, None]
        gu_AD2I = f.experts_gu.index_select(0, ids_A).transpose(1, 2)
        gate, up = torch.bmm(x_A1D, gu_AD2I).chunk(2, dim=-1)  # (A, 1, I) each
        down_AID = f.experts_down.index_select(0, ids_A).transpose(1, 2)
        y_AD = torch.bmm(F.silu(gate) * up, down_AID)[:, 0]
        routed = (y_AD.view(-1, K, D) * w_NK[..., None].to(y_AD.dtype)).sum(1)
        out = routed if out is None else out + routed
    return out


def _route(logits_NE: torch.Tensor, bias_E: torch.Tensor, cfg: DeepSeekConfig, rows: int):
    """`route` on the logits padded to a multiple of `rows` rows -> ids (N, K), gate weights (N, K).

    torch's CPU elementwise loops send the last (numel mod twice the vector width) elements of a contiguous
    tensor through the scalar formula, whose sigmoid rounds differently from the vectorised one: so a
    token's gate weights can move with the number of rows beside it. Padded to 64 rows, every element takes
    the vector path (a batch-invariant decoder)."""
    N = logits_NE.shape[0]
    if rows > 1:
        logits_NE = F.pad(logits_NE, (0, 0, 0, -N % rows))
    ids_NK, w_NK, _ = route(logits_NE, bias_E, cfg, with_probs=False)
    return ids_NK[:N], w_NK[:N]


def _head(w: DecoderWeights, h_BD: torch.Tensor) -> torch.Tensor:
    return onednn.mm(h_BD, w.head_packed if w.head_packed is not None else w.head_DV)


_KV_CHUNK = 256  # positions per slice of a batch-invariant decoder's attention (`_values`)
_COMPILED: dict[tuple[Callable, str], Callable] = {}


def compiled(step: Callable, device_type: str) -> Callable:
    """One compiled `step` (`decode_hidden`, ...) per device type, shared by all decoders (graphs keyed by
    shapes only). The head stays outside the graph: one product, and from 3 rows on a CPU oneDNN's
    (`onednn.pack`)."""
    if (step, device_type) not in _COMPILED:
        # a CPU step is ~130 tiny kernels: the C++ wrapper calls them without Python in between
        options = {"cpp_wrapper": True} if device_type == "cpu" else None
        _COMPILED[step, device_type] = torch.compile(step, fullgraph=True, dynamic=False, options=options)
    return _COMPILED[step, device_type]


def dense_experts(cfg: DeepSeekConfig, rows: int, compile: bool) -> bool:
    """Whether a step of `rows` tokens runs every routed expert of a layer (with zero gates) rather than
    each token's K gathered. Gathering pays while the B·K chosen experts are fewer than all E: compiled,
    inductor turns a product of one row per matrix into a generated reduction that reads the chosen experts
    in place (on a CPU; 1.76 against 2.04 ms per seed step at batch 1); eager, index_select copies them
    first, about a second read, so there only while they are under half."""
    return rows * cfg.num_experts_per_tok * (1 if compile else 2) >= cfg.n_routed_experts


class Decoder:
    """`decoder(ids, cache, start_pos)` = the next-token logits of `model(ids, cache=..., start_pos=...)`.

    ids (B, T) long; returns (B, V) logits after each row's last token. `batch_size` is the number of rows
    the decoder will see per step: it decides which MoE layers run dense. `compile`: run the step through
    `torch.compile` (the first step of each new batch size and cache length compiles, ~20 s on a CPU; past
    torch._dynamo's recompile limit, 8 shapes per process by default, new shapes run eager).

    `dense`: whether every routed expert runs, all rows at once (None: `dense_experts`' rule).

    `batch_invariant` (eager, CPU, fp32): a row's logits are bitwise the same whatever other rows share the
    step and whatever L `step` attends to: every product through oneDNN over weights laid out once (MKL's
    kernels change with the number of rows, and its one for a 7-wide router with a row's place; oneDNN's
    only at one row with K >= 2048, so one row runs as two, `onednn.mm`), routing on rows padded to 64
    (`_route`), the attention's values summed over fixed slices (`_values`); the MoE path follows
    `batch_size`, once.
    Its cost, seed architecture, one thread, against the plain decoder of each batch size attending to the
    positions in use: see `benchmarks/README.md` (serve).
    """

    def __init__(
        self,
        model: DeepSeekLM,
        batch_size: int,
        compile: bool = False,
        batch_invariant: bool = False,
        dense: bool | None = None,
    ) -> None:
        cfg = model.config
        if compile and batch_invariant:
            raise ValueError("a compiled decoder picks its kernels per shape: it cannot be batch-invariant")
        self.compile = compile
        self.dense = dense = dense if dense is not None else dense_experts(cfg, batch_size, compile)
        # oneDNN's products (`onednn.pack`): the head from 3 rows; the SwiGLUs too outside compiled graphs,
        # which cannot hold them; every product when batch-invariant
        rows = max(batch_size, 3) if batch_invariant else batch_size
        ffn_rows, attn_rows = (None if compile else rows), (rows if batch_invariant else None)
        with torch.no_grad():
            head_packed = onednn.pack(model.lm_head.weight, rows)
            self.weights = DecoderWeights(
                config=cfg,
                embed=model.embed_tokens.weight,
                rope=model.rope.to(model.embed_tokens.weight.dtype),
                attn=[
                    _attention_weights(b.self_attn, b.input_layernorm.weight, attn_rows) for b in model.layers
                ],
                ffn=[
                    _ffn_weights(b.mlp, b.post_attention_layernorm.weight, dense, ffn_rows, batch_invariant)
                    for b in model.layers
                ],
                norm=model.norm.weight.clone(),
                head_DV=None if head_packed is not None else model.lm_head.weight.t().contiguous(),
                head_packed=head_packed,
                route_rows=64 if batch_invariant else 1,
                kv_chunk=_KV_CHUNK if batch_invariant else 0,
            )

    def with_argmax(
        self, ids: torch.Tensor, cache: LatentCache, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`self(...)`, and each row's greedy next token (B,) where the step computes it (else None)."""
        return self(ids, cache, start_pos), None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., D) -> logits (..., V)."""
        return _head(self.weights, hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)

    @torch.no_grad()
    def step(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, kvs: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, V) after ids (B, T) at positions pos_BT (B, T), attending under the causal mask to all
        of `kvs` (per layer (B, L, r + dr), the tokens' latents written into it): the caller picks the
        rows and L, e.g. cache slots and a length that does not change a row's numbers (serve's batching)."""
        hidden = compiled(decode_hidden, ids_BT.device.type) if self.compile else decode_hidden
        return _head(self.weights, hidden(self.weights, ids_BT, pos_BT, kvs, True))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: LatentCache, start_pos: int | torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        n_rope = self.weights.rope.shape[1]
        start, pos_BT, end = token_positions(start_pos, B, T, ids.device, n_rope, cache.max_len)
        if start is not None:  # one start for all rows
            pos_BT = torch.arange(start, end, device=ids.device).expand(B, T)
        if self.compile:  # static shapes and strides (a graph per layout): the whole cache, masked
            hidden = compiled(decode_hidden, ids.device.type)
            return _head(
                self.weights, hidden(self.weights, ids.contiguous(), pos_BT.contiguous(), cache.kv, True)
            )
        kvs = [kv[:, :end] for kv in cache.kv]
        return decode_step(self.weights, ids, pos_BT, kvs, masked=T > 1 or start is None)


def weights_stamp(model: torch.nn.Module) -> tuple | None:
    """What a decoder or a prefill built from `model` reads: every parameter's and buffer's identity,
    storage and version counter, which each in-place write bumps (an optimizer step, load_state_dict, copy_
    under no_grad; not writes through `.data`). Equal stamps, the same weights. None where a counter cannot
    be read (tensors made under inference_mode have none): nothing to compare, so build anew."""
    try:
        return tuple((id(t), t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def _first_not_none(*values):
    return next((v for v in values if v is not None), None)
