"""Expert parallelism's communication: a group of n processes shares out the E routed experts of every MoE
layer, e = E/n each, and trades token rows with `all_to_all_single` (DeepSeek-V3 §3.2; torchtitan's EP).

The MoE layer (moe.py) decides what goes where; this file only moves tensors: one all-gather of the
per-expert counts, then all-to-alls whose backward sends the gradients back the way the rows came. Every
call is a collective: every process of the group makes the same calls in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertShard:
    """This process's place in an expert-parallel group: it holds experts [rank·e, (rank+1)·e), e = E/size."""

    group: dist.ProcessGroup
    rank: int
    size: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> ExpertShard:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(size · d0, ...): every process's `t` (d0, ...) stacked along dim 0, in group-rank order."""
        out = t.new_empty(self.size * t.shape[0], *t.shape[1:])
        # all_gather_single is all_gather_into_tensor's name from torch 2.13 on (the old one warns there)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(out, t.contiguous(), group=self.group)
        return out

    def exchange(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows x[Σsend[:j] : Σsend[:j+1]] go to process j; returns the Σrecv rows received, in rank order.

        Differentiable: the gradients travel back with the split sizes swapped.
        """
        return _AllToAll.apply(x, send, recv, self.group)


class _AllToAll(torch.autograd.Function):
    # torch.distributed.nn.functional.all_to_all_single does the same but is deprecated in torch 2.13 (its
    # successor lives in the private _functional_collectives); this keeps to the public all_to_all_single.
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out
