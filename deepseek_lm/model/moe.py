"""DeepSeekMoE: shared experts always on + top-k of fine-grained routed experts (DeepSeek-V2 §2.2, V3 §2.1.2).

Routing (fp32): scores = sigmoid (V3) or softmax (V2) of the router logits. Selection uses scores + bias
(auxiliary-loss-free balancing, V3 §2.1.2: the bias steers *which* experts are chosen, never the gate
weights), optionally limited to the `topk_group` best of `n_group` expert groups (group score: the sum of the
top-2 biased scores for sigmoid as V3, the max score for softmax as V2). Gate weights = the chosen experts'
unbiased scores, renormalised to sum to 1 when `norm_topk_prob`, times `routed_scaling_factor`.

Dispatch: the T·K token→expert assignments are sorted by expert, so each expert runs one matmul chain on a
contiguous slice (`torch._grouped_mm` where the device supports it: one call for all experts; else a loop over
the experts' slices), and the weighted outputs are added back with `index_add`. Nothing scales with
tokens × experts × hidden.

Expert parallelism (`shard_experts`): each of n processes keeps e = E/n experts. The sorted assignments go to
the processes that own their experts (all-to-all, expert_parallel.py), which sort what they receive by expert
and run it as above, and the outputs come back for the same combine. Capacity is the group's: an expert
keeps its heaviest assignments among those of all n processes, as one process holding the whole batch would.

Legend: T tokens (B·S), D hidden, E routed experts, K experts per token, A = T·K assignments (fewer after
capacity dropping), I expert intermediate size, G groups of e experts, N sequences (aux loss); with expert
parallelism n processes, e = E/n local experts, R rows received from the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model.expert_parallel import ExpertShard
from deepseek_lm.model.layers import SwiGLU


@dataclass
class RouterStats:
    """One MoE layer's routing in one forward; detached tensors."""

    counts: torch.Tensor  # (E,) long: assignments per routed expert chosen by the router (before dropping)
    dropped_frac: torch.Tensor  # () float (on the CPU): fraction of the T·K assignments over capacity
    entropy: torch.Tensor  # () float: mean entropy of the routing distribution (nats; log E when uniform)
    bias: torch.Tensor  # (E,) float: the selection bias used


class Router(nn.Module):
    """`gate.weight` (E, D) and the persistent fp32 buffer `gate.e_score_correction_bias` (E,)."""

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> topk_ids_TK, gate weights_TK (fp32), routing probabilities_TE (fp32, sum to 1 per token)."""
        return route(F.linear(x_TD.float(), self.weight.float()), self.e_score_correction_bias, self.config)


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor, cfg: DeepSeekConfig, with_probs: bool = True):
    """Router logits (T, E) fp32 -> topk_ids_TK, gate weights_TK, probabilities_TE (None without `with_probs`).

    A function of tensors and the config, so that the decoder's compiled step (decode.py) routes the same way.
    """
    if cfg.scoring_func == "sigmoid":
        scores_TE = logits_TE.sigmoid()
        # V3's normalised s' for the aux loss
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True) if with_probs else None
    else:
        scores_TE = probs_TE = logits_TE.softmax(-1)
    with torch.no_grad():
        topk_ids_TK = _select(scores_TE + bias_E, cfg)
    w_TK = scores_TE.gather(1, topk_ids_TK)
    if cfg.norm_topk_prob:
        w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
    return topk_ids_TK, w_TK * cfg.routed_scaling_factor, probs_TE


def _select(choice_TE: torch.Tensor, cfg: DeepSeekConfig) -> torch.Tensor:
    if cfg.n_group > 1:
        choice_TGe = choice_TE.view(choice_TE.shape[0], cfg.n_group, -1)
        if cfg.scoring_func == "sigmoid":
            group_TG = choice_TGe.topk(2, dim=-1).values.sum(-1)
        else:
            group_TG = choice_TGe.amax(-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
        choice_TE = choice_TGe.masked_fill(~keep_TG[..., None], float("-inf")).flatten(1)
    return choice_TE.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices


class Experts(nn.Module):
    """E SwiGLU experts as 3-D weights (transformers' layout): gate_up_proj (E, 2I, D), down_proj (E, D, I)."""

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        E, D, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, inter))
        self.use_grouped_mm: bool | None = None  # None = decide per device (see `_grouped_ok`)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_AD sorted by expert, counts_E rows per expert (summing to A) -> expert outputs (A, D)."""
        dtype = _autocast_dtype(x_AD)  # F.linear casts under autocast by itself; _grouped_mm does not
        if self._grouped_ok(x_AD, dtype):
            w_gu, w_down, x_AD = self.gate_up_proj.to(dtype), self.down_proj.to(dtype), x_AD.to(dtype)
            offs_E = counts_E.cumsum(0, dtype=torch.int32)
            gate_AI, up_AI = torch._grouped_mm(x_AD, w_gu.transpose(1, 2), offs=offs_E).chunk(2, -1)
            return torch._grouped_mm(F.silu(gate_AI) * up_AI, w_down.transpose(1, 2), offs=offs_E)
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):  # one host sync; empty experts are skipped
            if n:
                outs.append(self._expert(e, x_AD[start : start + n]))
                start += n
        # no rows at all (an expert-parallel process that received none): expert 0 over the empty input keeps
        # the weights in the graph, so their gradient is zeros, not None, and every process of the group runs
        # the same backward collectives
        return torch.cat(outs) if outs else self._expert(0, x_AD)

    def _expert(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        gate_nI, up_nI = F.linear(x_nD, self.gate_up_proj[e]).chunk(2, -1)
        return F.linear(F.silu(gate_nI) * up_nI, self.down_proj[e])

    @torch.no_grad()
    def keep(self, first: int, stop: int) -> None:
        """Hold only experts [first, stop) (expert parallelism); works on the meta device too."""
        self.gate_up_proj = nn.Parameter(self.gate_up_proj[first:stop].clone())
        self.down_proj = nn.Parameter(self.down_proj[first:stop].clone())

    def _grouped_ok(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0:
            return False
        if x.device.type == "cpu":  # one C++ loop over the experts: less overhead than the Python slices
            # (eager only: under torch.compile the op's shape function accepts nothing but bf16); but without
            # autograd and with many rows per expert (a prefill, an evaluation), MKL's product per expert runs
            # faster than its CPU kernel: 34 against 46 ms for the seed's 7,936 assignments of a 1,984-token
            # prefill, one thread (loop/grouped 1.06 at 16 rows per expert, 0.78 at 64); training keeps it
            if not torch.is_grad_enabled() and x.shape[0] >= 32 * self.down_proj.shape[0]:
                return False
            return dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling()
        # the CUDA kernel: bf16 on Hopper or newer, rows 16-byte aligned
        D, inter = self.down_proj.shape[1:]
        return (
            x.device.type == "cuda"
            and dtype == torch.bfloat16
            and D % 8 == 0
            and inter % 8 == 0
            and torch.cuda.get_device_capability(x.device)[0] >= 9
        )


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def sort_by_expert(ids_A: torch.Tensor, w_A, counts_E: torch.Tensor, cap: int | None) -> torch.Tensor:
    """Assignment indices grouped by expert id (stable); `counts_E` = assignments per expert.

    Over capacity `cap`, an expert keeps its assignments with the largest gate weights `w_A` and drops the
    rest (DeepSeek-V2 §2.2's "lowest affinity" rule, rather than position, which would always drop late
    tokens); ties go to the earlier assignment.
    """
    if cap is None or cap >= ids_A.numel():
        return ids_A.argsort(stable=True)
    by_weight_A = w_A.argsort(descending=True, stable=True)
    order_A = by_weight_A[ids_A[by_weight_A].argsort(stable=True)]  # by expert, then by weight
    rank_A = (
        torch.arange(ids_A.numel(), device=ids_A.device) - (counts_E.cumsum(0) - counts_E)[ids_A[order_A]]
    )
    return order_A[rank_A < cap]


class MoE(nn.Module):
    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = SwiGLU(config.hidden_size, shared) if shared else None
        self.ep: ExpertShard | None = None  # expert parallelism: this process's share (`shard_experts`)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
        """-> output (B, S, D), α-weighted aux loss (), stats. Dropped assignments add nothing (residual only)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        topk_ids_TK, w_TK, probs_TE = self.gate(x_TD)
        run = self._run_experts if self.ep is None else self._run_experts_parallel
        order_A, y_AD, counts_E, kept_frac = run(x_TD, topk_ids_TK, w_TK)
        tok_A = order_A // topk_ids_TK.shape[1]
        y_AD = y_AD * w_TK.view(-1)[order_A, None].to(y_AD.dtype)
        # the routed outputs are added in place onto the shared experts' output: no (T, D) zeros + add
        out_TD = self.shared_experts(x_TD) if self.shared_experts is not None else torch.zeros_like(x_TD)
        out_TD.index_add_(0, tok_A, y_AD.to(out_TD.dtype))  # under autocast the two dtypes can differ
        aux = self._aux_loss(topk_ids_TK, probs_TE, B) if self.training else probs_TE.new_zeros(())
        stats = self._stats(counts_E, kept_frac, probs_TE)
        return out_TD.view(B, S, D), aux, stats

    def capacity(self, n_tokens: int) -> int | None:
        """Max assignments per expert in training: ceil(capacity_factor · T · K / E); None when dropless."""
        cf = self.config.capacity_factor
        if cf is None or not self.training:
            return None
        return math.ceil(cf * n_tokens * self.config.num_experts_per_tok / self.config.n_routed_experts)

    def _run_experts(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, w_TK: torch.Tensor):
        """-> order_A (the kept assignments, by expert), their expert outputs y_AD, counts_E, kept fraction."""
        order_A, counts_E, kept_E = self._sort_assignments(topk_ids_TK, w_TK)
        y_AD = self.experts(x_TD.index_select(0, order_A // topk_ids_TK.shape[1]), kept_E)
        return order_A, y_AD, counts_E, order_A.numel() / topk_ids_TK.numel()

    def _sort_assignments(self, topk_ids_TK: torch.Tensor, w_TK: torch.Tensor):
        """-> order_A' (assignment indices grouped by expert), counts_E (routed), kept_E (after dropping)."""
        ids_A = topk_ids_TK.reshape(-1)
        counts_E = torch.bincount(ids_A, minlength=self.config.n_routed_experts)
        cap = self.capacity(topk_ids_TK.shape[0])
        order_A = sort_by_expert(ids_A, w_TK.detach().reshape(-1), counts_E, cap)
        return order_A, counts_E, counts_E if cap is None else counts_E.clamp(max=cap)

    # expert parallelism -----------------------------------------------------------------------------------

    def shard_experts(self, shard: ExpertShard) -> None:
        """Keep only this process's E/n routed experts; forward then trades rows with the group (all-to-all)."""
        e, rest = divmod(self.config.n_routed_experts, shard.size)
        if rest:
            raise ValueError(
                f"{self.config.n_routed_experts} experts do not split over {shard.size} processes"
            )
        self.experts.keep(shard.rank * e, (shard.rank + 1) * e)
        self.ep = shard

    def _run_experts_parallel(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, w_TK: torch.Tensor):
        """`_run_experts` with the experts shared out. order_A holds every assignment: capacity is applied
        where the experts are, and a dropped assignment comes back as a row of zeros."""
        ep, E, K = self.ep, self.config.n_routed_experts, topk_ids_TK.shape[1]
        e = E // ep.size
        mine = slice(ep.rank * e, (ep.rank + 1) * e)  # this process's experts
        ids_A = topk_ids_TK.reshape(-1)
        order_A = ids_A.argsort(stable=True)  # by expert, so by the process that owns it
        counts_E = torch.bincount(ids_A, minlength=E)
        counts_nE = ep.gather(counts_E[None])  # every process's routing: split sizes, the group's counts
        counts = counts_nE.tolist()  # the one host sync: all-to-all takes its split sizes as ints
        send = [sum(counts[ep.rank][j * e : (j + 1) * e]) for j in range(ep.size)]
        recv = [sum(row[mine]) for row in counts]
        group_E = [sum(col) for col in zip(*counts)]
        cap = self.capacity(sum(group_E) // K)  # over the group's tokens, as one process with all of them
        # rows travel in the compute dtype (bf16 under autocast): the experts would cast them anyway
        x_RD = ep.exchange(x_TD[order_A // K].to(_autocast_dtype(x_TD)), send, recv)
        # received: by source process, then by local expert, then in the source's token order
        ids_R = torch.arange(e, device=x_TD.device).repeat(ep.size)
        ids_R = ids_R.repeat_interleave(counts_nE[:, mine].flatten(), output_size=sum(recv))
        w_R = ep.exchange(w_TK.detach().reshape(-1)[order_A], send, recv) if cap is not None else None
        here_e = counts_nE[:, mine].sum(0)
        sort_R = sort_by_expert(ids_R, w_R, here_e, cap)  # by expert, then by source: the global token order
        y_RD = self.experts(x_RD[sort_R], here_e if cap is None else here_e.clamp(max=cap))
        y_RD = y_RD.new_zeros(x_RD.shape).index_copy(0, sort_R, y_RD)  # arrival order; dropped rows stay 0
        kept = sum(group_E) if cap is None else sum(min(c, cap) for c in group_E)
        return order_A, ep.exchange(y_RD, recv, send), counts_E, kept / max(sum(group_E), 1)

    def _aux_loss(self, topk_ids_TK: torch.Tensor, probs_TE: torch.Tensor, B: int) -> torch.Tensor:
        """α Σ_i f_i P_i (DeepSeek-V2 eq. 12-14; V3 eq. 17-20 per sequence when `seq_aux`).

        f_i = E/(K·T) × assignments to expert i (1 when balanced), P_i = mean routing probability of expert i.
        Σ_i f_i = E, so with uniform probabilities (P_i = 1/E) the loss is exactly α whatever the selection;
        it grows above α as selection concentrates on the high-probability experts (at most α·E/K).
        """
        alpha, E = self.config.aux_loss_alpha, probs_TE.shape[1]
        if alpha == 0:
            return probs_TE.new_zeros(())
        n_seq = B if self.config.seq_aux else 1  # sequence-wise: f and P per sequence, then the mean
        ids_NA = topk_ids_TK.view(n_seq, -1)  # N sequences (1 = the whole batch), A = K · tokens each
        ones_NA = torch.ones_like(ids_NA, dtype=torch.float32)
        f_NE = torch.zeros(n_seq, E, device=ids_NA.device).scatter_add_(1, ids_NA, ones_NA) * (
            E / ids_NA.shape[1]
        )
        P_NE = probs_TE.view(n_seq, -1, E).mean(1)
        return alpha * (f_NE * P_NE).sum(-1).mean()

    @torch.no_grad()
    def _stats(self, counts_E: torch.Tensor, kept_frac: float, probs_TE: torch.Tensor) -> RouterStats:
        entropy = -torch.special.xlogy(probs_TE, probs_TE).sum(-1).mean()
        bias = self.gate.e_score_correction_bias.clone()  # a copy: the optimizer step updates it in place
        return RouterStats(counts_E, torch.tensor(1.0 - kept_frac), entropy, bias)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """bias += γ · sign(mean load − load): under-loaded experts become more likely to be chosen."""
        bias_E = self.gate.e_score_correction_bias
        load_E = counts_E.to(bias_E)
        bias_E += self.config.bias_update_speed * torch.sign(load_E.mean() - load_E)
