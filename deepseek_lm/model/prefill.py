"""A prompt's prefill on a CPU with every large product through oneDNN (onednn.py): ~2.3× MKL's speed there.

`Prefill(model)(ids, cache, start)` computes what the model's forward with a cache and `last_logits_only`
computes — every token's latents written into the cache, the final-normed state after each row's last
token returned — layer by layer as `Block`, `MLA` and `MoE` do, with the same attention cores (`MLA._naive`
from position 0, `MLA._absorbed` after earlier chunks), the same norms and the same routing; only the
products differ: over the model's weights laid out once by oneDNN (the query and latent down-projections as
one), each SwiGLU (dense FFN, shared experts, every routed expert over its tokens) as `onednn.swiglu` with
its activation fused. The routed outputs are weighted and added back per expert, in the order the model's
`index_add_` adds them. So the numbers are the model's up to the rounding of the products
(tests/test_prefill.py holds them to 1e-5); the model's forward stays the reference.

On the seed preset, one thread of the dev VM's EPYC, a 1,984-token prompt: the forward 140-150 → 105-115 ms
(the attention's SDPA, ~57 ms of it, is the same kernel). Built once per set of weights (the engine keeps it
while `decode.weights_stamp` is unchanged); `fill` runs it where `Prefill.supports` the model (a CPU, fp32,
oneDNN) and the prompt has `MIN_TOKENS` or more, else the model's forward.

Legend: B rows, T tokens per row, N = B·T, D hidden, H heads, r kv_lora_rank, dr rope dim, E routed experts,
K experts per token, A = N·K assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deepseek_lm.model import onednn
from deepseek_lm.model.layers import apply_rope
from deepseek_lm.model.mla import MLA, LatentCache, make_positions, write_latent
from deepseek_lm.model.moe import MoE, route
from deepseek_lm.model.transformer import DeepSeekLM

_PACK_ROWS = 1024  # the layout's row hint: prefill products run hundreds to thousands of rows (any works)
# Fewer tokens go through the model's forward: its experts in one `_grouped_mm` beat the loop of oneDNN
# calls here (demo model, one / two threads: 8 tokens 6.0 / 3.7 ms against 7.5 / 4.6; even at 64-128; 256
# tokens 19.8 / 17.3 against 13.7 / 17.1, 512 35.3 / 28.4 against 24.8 / 24.4)
MIN_TOKENS = 128


@dataclass
class _SwiGLU:
    gate: torch.Tensor  # (I, D) packed
    up: torch.Tensor  # (I, D) packed
    down: torch.Tensor  # (D, I) packed

    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        return onednn.swiglu(x_ND, self.gate, self.up, self.down)


@dataclass
class _Layer:
    mla: MLA  # the model's: its norms, softmax scale and attention cores
    norm_in: torch.Tensor  # (D,)
    w_in: torch.Tensor  # [kv_a; q_a] (r + dr + ql, D), or [kv_a; q] without q lora, packed
    w_q: torch.Tensor | None  # q_b (H·(dn + dr), ql) packed
    w_o: torch.Tensor  # (D, H·dv) packed
    norm_post: torch.Tensor  # (D,)
    ffn: _SwiGLU | None  # the dense FFN, or the shared experts; None without shared experts
    router: torch.Tensor | None  # (E, D) fp32, as the model's Router; None for a dense layer
    bias: torch.Tensor | None  # (E,)
    experts: list[_SwiGLU]  # the routed experts; empty for a dense layer


def _pack(w: torch.Tensor) -> torch.Tensor:
    packed = onednn.pack(w, _PACK_ROWS)
    assert packed is not None, "Prefill.supports(model) is false for this model"
    return packed


def _swiglu(gate_ID: torch.Tensor, up_ID: torch.Tensor, down_DI: torch.Tensor) -> _SwiGLU:
    return _SwiGLU(_pack(gate_ID), _pack(up_ID), _pack(down_DI))


def _layer(block: torch.nn.Module) -> _Layer:
    a, mlp = block.self_attn, block.mlp
    q_in = a.q_proj.weight if a.q_lora_rank == 0 else a.q_a_proj.weight
    moe = isinstance(mlp, MoE)
    dense = mlp.shared_experts if moe else mlp
    experts = []
    if moe:
        for gate_up, down in zip(mlp.experts.gate_up_proj, mlp.experts.down_proj):  # (2I, D), (D, I)
            gate, up = gate_up.chunk(2)
            experts.append(_swiglu(gate, up, down))
    return _Layer(
        mla=a,
        norm_in=block.input_layernorm.weight,
        w_in=_pack(torch.cat((a.kv_a_proj_with_mqa.weight, q_in))),
        w_q=None if a.q_lora_rank == 0 else _pack(a.q_b_proj.weight),
        w_o=_pack(a.o_proj.weight),
        norm_post=block.post_attention_layernorm.weight,
        ffn=None
        if dense is None
        else _swiglu(dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight),
        router=mlp.gate.weight.float() if moe else None,
        bias=mlp.gate.e_score_correction_bias if moe else None,
        experts=experts,
    )


class Prefill:
    """`prefill(ids, cache, start)` = `model(ids, cache=cache, start_pos=start, last_logits_only=True,
    return_hidden=True).hidden[:, -1]`: ids (B, T) at positions start.. of every row -> (B, D); with
    `every_state=True`, `model(ids, cache=cache, start_pos=start, return_hidden=True).hidden` (B, T, D)."""

    def __init__(self, model: DeepSeekLM) -> None:
        self.model = model
        with torch.no_grad():
            self.layers = [_layer(block) for block in model.layers]

    @staticmethod
    def supports(model: DeepSeekLM, tokens: int | None = None) -> bool:
        """On a CPU, in fp32, in a torch with oneDNN, with every routed expert in this process; and for
        `tokens` prompt tokens, where given, only from `MIN_TOKENS` (below them it does not pay)."""
        if tokens is not None and tokens < MIN_TOKENS:
            return False
        if any(moe.ep is not None for moe in model.moe_layers()):  # expert parallelism: a share of them
            return False
        w = model.embed_tokens.weight
        return w.device.type == "cpu" and w.dtype == torch.float32 and onednn.available()

    @torch.no_grad()
    def __call__(
        self, ids_BT: torch.Tensor, cache: LatentCache, start: int, every_state: bool = False
    ) -> torch.Tensor:
        """`every_state`: the states after every token (B, T, D), as the forward without `last_logits_only`
        (the MTP module's prefill reads them)."""
        m, (B, T) = self.model, ids_BT.shape
        pos = make_positions(m.rope, B, T, start, cached=True, max_len=cache.max_len)
        x = m.embed_tokens(ids_BT)
        for i, (layer, kv) in enumerate(zip(self.layers, cache.kv)):
            # as the model's forward: past the last layer's latents only the last token's state is read
            last_only = not every_state and i == len(self.layers) - 1
            x = _block(layer, m.config, x, pos, kv, last_only)
        return m.norm(x if every_state else x[:, -1])


def fill(
    model: DeepSeekLM,
    fast: Prefill | None,
    ids_BT: torch.Tensor,
    cache: LatentCache,
    start_pos: int | torch.Tensor,
    every_state: bool = False,
    short: Any = None,
) -> torch.Tensor:
    """The latents of ids (B, T) at start_pos into the cache -> the final-normed state after each row's last
    token (B, D), or after every token (B, T, D): through `fast` where there is one, the rows share their
    start and there are `MIN_TOKENS` of them or more; else through `short` where it takes them (model/aot.py's
    `CompiledPrefill`), else through the model's forward."""
    if fast is not None and isinstance(start_pos, int) and ids_BT.numel() >= MIN_TOKENS:
        return fast(ids_BT, cache, start_pos, every_state)
    if short is not None and isinstance(start_pos, int) and short.takes(ids_BT, every_state):
        return short(ids_BT, cache, start_pos)
    out = model(
        ids_BT, cache=cache, start_pos=start_pos, last_logits_only=not every_state, return_hidden=True
    )
    return out.hidden if every_state else out.hidden[:, -1]


def _block(layer: _Layer, cfg, x_BTD: torch.Tensor, pos, kv: torch.Tensor, last_only: bool) -> torch.Tensor:
    """`Block.forward` -> x (B, T, D), or (B, 1, D) when `last_only`."""
    attn = _attention(
        layer, cfg, F.rms_norm(x_BTD, x_BTD.shape[-1:], layer.norm_in, cfg.rms_norm_eps), pos, kv, last_only
    )
    x_BTD = (x_BTD[:, -1:] if last_only else x_BTD) + attn
    B, T, D = x_BTD.shape
    h_ND = F.rms_norm(x_BTD, (D,), layer.norm_post, cfg.rms_norm_eps).view(B * T, D)
    return x_BTD + _ffn(layer, cfg, h_ND).view(B, T, D)


def _attention(
    layer: _Layer, cfg, h_BTD: torch.Tensor, pos, kv: torch.Tensor, last_only: bool
) -> torch.Tensor:
    """`MLA.forward` on the normed h (B, T, D) -> (B, T or 1, D); writes the latents into kv
    (B, S, r + dr)."""
    a, (B, T, D) = layer.mla, h_BTD.shape
    r, dr, H = a.kv_lora_rank, a.dr, a.n_heads
    y = onednn.mm(h_BTD.reshape(B * T, D), layer.w_in).view(B, T, -1)
    c_kv, k_pe, q = y.split([r, dr, y.shape[-1] - r - dr], dim=-1)
    c_kv = a.kv_a_layernorm(c_kv)  # (B, T, r)
    k_pe = apply_rope(k_pe[:, :, None], pos.cos, pos.sin)  # (B, T, 1, dr)
    write_latent(kv, torch.cat((c_kv, k_pe[:, :, 0]), dim=-1), pos)
    pos_q = pos.last() if last_only else pos
    if last_only:
        q = q[:, -1:]
    Tq = q.shape[1]
    if layer.w_q is not None:
        q = onednn.mm(a.q_a_layernorm(q).reshape(B * Tq, -1), layer.w_q)
    q_nope, q_pe = q.reshape(B, Tq, H, -1).split([a.dn, a.dr], dim=-1)
    q_pe = apply_rope(q_pe, pos_q.cos, pos_q.sin)
    if pos.start == 0 and T > 1:  # from position 0: the naive path, as the model's
        o = a._naive(q_nope, q_pe, c_kv, k_pe)
    else:
        o = a._absorbed(q_nope, q_pe, pos_q, kv)
    return onednn.mm(o.reshape(B * Tq, -1), layer.w_o).view(B, Tq, D)


def _ffn(layer: _Layer, cfg, h_ND: torch.Tensor) -> torch.Tensor:
    """`MoE.forward` (or the dense SwiGLU) on the normed h (N, D) -> (N, D)."""
    out_ND = layer.ffn(h_ND) if layer.ffn is not None else torch.zeros_like(h_ND)
    if layer.router is None:
        return out_ND
    ids_NK, w_NK, _ = route(F.linear(h_ND.float(), layer.router), layer.bias, cfg, with_probs=False)
    K, ids_A = ids_NK.shape[1], ids_NK.flatten()
    order_A = ids_A.argsort(stable=True)  # by expert, in token order within each: the model's order
    tok_A, w_A = order_A // K, w_NK.flatten()[order_A, None].to(h_ND.dtype)
    counts = torch.bincount(ids_A, minlength=len(layer.experts)).tolist()  # one host sync
    start = 0
    for expert, n in zip(layer.experts, counts):
        if n:
            tok = tok_A[start : start + n]
            y = expert(h_ND.index_select(0, tok)).mul_(w_A[start : start + n])
            out_ND.index_add_(0, tok, y)
            start += n
    return out_ND
