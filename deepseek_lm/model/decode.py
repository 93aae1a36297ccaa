"""Decode steps over the latent cache with the weights rearranged for a few tokens at a time.

A decode step runs one token per row through every layer. Its cost is not FLOPs but the number of operations
(each one a dispatch, and on a CPU a trip through caches that the weights streamed past have just emptied)
and the bytes of weights read. `Decoder` takes a trained `DeepSeekLM` and precomputes, once per generation
call, layouts that do the same math in fewer and larger products:

- MLA, absorbed (DeepSeek-V2 §2.1.3, V3 `inference/model.py`): W_uk folded into the query projection and
  W_uv into the output projection ahead of time, instead of two einsums per step; the down-projections of
  the query and of the latent KV read x in one product.
- DeepSeekMoE at small batches: when the step's tokens pick most experts anyway (T·K ≥ E/2), every expert and
  the shared experts run as one up-projection and one down-projection, with the gate weights of unchosen
  experts zero. Routing is the model's own `Router`, so the same experts win; the outputs equal the sparse
  sum up to the order of fp32 additions. Otherwise the model's sparse MoE runs as in the forward.
- The LM head as a (D, V) copy: a (B, D) @ (D, V) product streams the weight row by row, ~3× faster on a
  CPU at batch 1 than F.linear's (V, D) layout.

Products read the layout measured faster on a CPU for a few rows: x @ w with w stored (in, out), except the
MoE down-projection (a wide input), which F.linear reads as (out, in). The decoder copies the model's
weights when it is built: build a new one after the weights change (the engine builds one per `generate`
call). `model(...)` with a cache stays the reference: tests/test_decode.py holds the two to 1e-5.

Legend: B rows, T new tokens per row, D hidden, H heads, r kv_lora_rank, dr rope dim, ql q_lora_rank,
E routed experts, K experts per token, I expert intermediate size, S shared experts (of I each), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepseek_lm.model.layers import apply_rope
from deepseek_lm.model.mla import MLA, LatentCache, Positions, latent_attention, make_positions, write_latent
from deepseek_lm.model.moe import MoE
from deepseek_lm.model.transformer import Block, DeepSeekLM


class _Attention:
    """One layer's MLA with W_uk and W_uv absorbed."""

    def __init__(self, attn: MLA) -> None:
        H, dn, dr, dv, r = attn.n_heads, attn.dn, attn.dr, attn.dv, attn.kv_lora_rank
        self.attn, self.H, self.r, self.dr = attn, H, r, dr
        w_ukv = attn.kv_b_proj.weight.view(H, dn + dv, r)
        w_q = (attn.q_proj if attn.q_lora_rank == 0 else attn.q_b_proj).weight.view(H, dn + dr, -1)
        # per head [W_uk^T W_q_nope ; W_q_pe]: q_lat and q_pe straight from x (or c_q)
        w_q_abs = torch.cat((torch.einsum("hdr,hdq->hrq", w_ukv[:, :dn], w_q[:, :dn]), w_q[:, dn:]), dim=1)
        w_q_abs = w_q_abs.reshape(H * (r + dr), -1)  # (H·(r + dr), ql or D)
        w_kv = attn.kv_a_proj_with_mqa.weight  # (r + dr, D)
        if attn.q_lora_rank == 0:  # q from x: the query and the latent KV in one product
            self.w_in = torch.cat((w_q_abs, w_kv)).t().contiguous()  # (D, H·(r + dr) + r + dr)
            self.w_q = None
            self.split = [H * (r + dr), r, dr]
        else:
            self.w_in = torch.cat((attn.q_a_proj.weight, w_kv)).t().contiguous()  # (D, ql + r + dr)
            self.w_q = w_q_abs.t().contiguous()  # (ql, H·(r + dr))
            self.split = [attn.q_lora_rank, r, dr]
        w_o = attn.o_proj.weight.view(-1, H, dv)  # (D, H, dv)
        self.w_out = torch.einsum("Dhv,hvr->hrD", w_o, w_ukv[:, dn:]).reshape(H * r, -1).contiguous()

    def __call__(self, x: torch.Tensor, pos: Positions, cache: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) normed -> attention output (B, T, D); writes the tokens' latents into `cache`."""
        B, T, _ = x.shape
        q, c_kv, k_pe = (x @ self.w_in).split(self.split, dim=-1)
        if self.w_q is not None:
            q = self.attn.q_a_layernorm(q) @ self.w_q
        q_lat, q_pe = q.view(B, T, self.H, -1).split([self.r, self.dr], dim=-1)  # (B, T, H, r | dr)
        q = torch.cat((q_lat, apply_rope(q_pe, pos.cos, pos.sin)), dim=-1)
        k_pe = apply_rope(k_pe[:, :, None], pos.cos, pos.sin)[:, :, 0]  # (B, T, dr)
        write_latent(cache, torch.cat((self.attn.kv_a_layernorm(c_kv), k_pe), dim=-1), pos)
        o_lat = latent_attention(q, cache, pos, self.attn.scale, self.r)  # (B, T, H, r)
        return o_lat.reshape(B, T, -1) @ self.w_out


class _DenseExperts:
    """A MoE layer as two products over all experts: [shared | routed] gate and up, then down."""

    def __init__(self, moe: MoE) -> None:
        cfg = moe.config
        E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
        self.moe, self.E, self.S = moe, E, cfg.n_shared_experts
        gate_EID, up_EID = moe.experts.gate_up_proj.view(E, 2, inter, -1).unbind(1)
        down_EDI = moe.experts.down_proj
        gates, ups, downs = (
            [gate_EID.flatten(0, 1)],
            [up_EID.flatten(0, 1)],
            [down_EDI.transpose(0, 1).flatten(1)],
        )
        if moe.shared_experts is not None:  # S shared experts of I each, as one SwiGLU of S·I
            sh = moe.shared_experts
            gates.insert(0, sh.gate_proj.weight)
            ups.insert(0, sh.up_proj.weight)
            downs.insert(0, sh.down_proj.weight)
        self.w_in = torch.cat(gates + ups).t().contiguous()  # (D, 2·(S + E)·I): all gates, then all ups
        # (D, (S + E)·I): F.linear's layout, which a CPU reads faster for this wide input
        self.w_down = torch.cat(downs, dim=1)

    def __call__(self, x_TD: torch.Tensor) -> torch.Tensor:
        topk_ids_TK, w_TK, _ = self.moe.gate(x_TD)
        T = x_TD.shape[0]
        w_TE = torch.zeros(T, self.S + self.E, dtype=w_TK.dtype, device=x_TD.device)
        w_TE[:, : self.S] = 1.0  # the shared experts: always on, weight 1
        w_TE.scatter_(1, topk_ids_TK + self.S, w_TK)
        gate, up = (x_TD @ self.w_in).chunk(2, dim=-1)  # (T, (S + E)·I) each
        act = (F.silu(gate) * up).view(T, self.S + self.E, -1) * w_TE[..., None].to(x_TD.dtype)
        return F.linear(act.view(T, -1), self.w_down)


class Decoder:
    """`decoder(ids, cache, start_pos)` = the next-token logits of `model(ids, cache=..., start_pos=...)`.

    ids (B, T) long; returns (B, V) logits after each row's last token. `batch_size` is the number of rows
    the decoder will see per step: it decides which MoE layers run dense.
    """

    def __init__(self, model: DeepSeekLM, batch_size: int) -> None:
        cfg = model.config
        self.model = model
        dense_moe = 2 * batch_size * cfg.num_experts_per_tok >= cfg.n_routed_experts
        with torch.no_grad():
            self.attn = [_Attention(b.self_attn) for b in model.layers]
            self.mlp = [
                _DenseExperts(b.mlp) if dense_moe and isinstance(b.mlp, MoE) else None for b in model.layers
            ]
            self.head_DV = model.lm_head.weight.t().contiguous()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., D) -> logits (..., V)."""
        return hidden @ self.head_DV

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: LatentCache, start_pos: int | torch.Tensor) -> torch.Tensor:
        model = self.model
        B, T = ids.shape
        pos = make_positions(model.rope, B, T, start_pos, True, cache.max_len)
        x = model.embed_tokens(ids)
        for block, attn, mlp, kv in zip(model.layers, self.attn, self.mlp, cache.kv):
            x = x + attn(block.input_layernorm(x), pos, kv)
            x = x + self._mlp(block, mlp, block.post_attention_layernorm(x))
        return self.logits(model.norm(x[:, -1]))

    @staticmethod
    def _mlp(block: Block, dense: _DenseExperts | None, h: torch.Tensor) -> torch.Tensor:
        if dense is not None:
            return dense(h.flatten(0, 1)).view_as(h)
        if isinstance(block.mlp, MoE):
            return block.mlp(h)[0]
        return block.mlp(h)
