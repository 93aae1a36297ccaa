"""Expert parallelism in training (`train.expert_parallel N`): the routed experts of every MoE layer shared
out over groups of N processes, everything else data-parallel as before.

Layout, for W processes: ranks [g·N, (g+1)·N) form EP group g (consecutive ranks, so one node's GPUs when N
divides the GPUs per node: the all-to-all stays on the fast links); rank r holds experts
[(r mod N)·E/N, (r mod N + 1)·E/N); the W/N processes with the same r mod N hold the same experts and are
that shard's data-parallel replicas.

Gradients. Each process's loss is the mean over its own tokens, and DDP averages the other parameters' gradients
over all W processes. The all-to-all's backward already brings every EP-group process's contribution to the
process holding the expert, so an expert's gradient is summed over its replicas only and divided by W: the
same average as DDP's. With FSDP2 the experts are a module of their own, sharded over the replicas with that
divide factor (torchtitan's layout). The gradient norm for clipping adds up the experts' shares over the
EP group, so every process clips by the same global norm.

Checkpoints keep the one-directory format: the full expert set is gathered for saving (model weights and
AdamW moments), and each process takes its slice on loading, so a run resumes with another N or without EP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepseek_lm.errors import UserError
from deepseek_lm.model.expert_parallel import ExpertShard


@dataclass(frozen=True)
class ExpertParallel:
    shard: ExpertShard  # this process's EP group and place in it
    replicas: dist.ProcessGroup | None  # the processes holding the same experts; None when there are none
    world_size: int

    @property
    def size(self) -> int:
        return self.shard.size


def setup(
    size: int, world_size: int, n_experts: int, n_moe_layers: int, precision: str, timeout_s: float
) -> ExpertParallel | None:
    """The process groups of `train.expert_parallel` (a collective: every process calls it); None for 1.

    The groups are new communicators even when one spans every process: the all-to-all then never queues
    behind (or between) DDP's gradient all-reduces, which run on the default group during the backward.
    """
    if size == 1:
        return None
    problem = (
        "needs torchrun with several processes" if world_size == 1
        else f"must divide the number of processes ({world_size})" if world_size % size
        else f"must divide n_routed_experts ({n_experts})" if n_experts % size
        else "has no routed experts to share out: the model has no MoE layer" if n_moe_layers == 0
        # fp16's loss scaler decides to skip a step from each process's own gradients, which differ under EP
        else "needs precision bf16 or fp32 (fp16's loss scaler is per process)" if precision == "fp16"
        # torch.nn.utils.get_total_norm (2.6), FSDP2's set_force_sum_reduction_for_comms (2.8)
        else f"needs torch >= 2.8 (this is {torch.__version__})" if _torch_version() < (2, 8)
        else None
    )  # fmt: skip
    if problem is not None:
        raise UserError(
            f"train.expert_parallel {size} {problem}; use --train.expert_parallel 1 to turn it off"
        )
    timeout = timedelta(seconds=timeout_s)
    groups = [list(range(g, g + size)) for g in range(0, world_size, size)]
    ep_group, _ = dist.new_subgroups_by_enumeration(groups, timeout=timeout)
    replicas = None
    if world_size > size:
        replicas, _ = dist.new_subgroups_by_enumeration([list(r) for r in zip(*groups)], timeout=timeout)
    return ExpertParallel(ExpertShard.of(ep_group), replicas, world_size)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def shard_experts(model: nn.Module, ep: ExpertParallel) -> None:
    """Every MoE layer the model reports keeps only this process's experts (before wrapping, before the
    optimizer: the expert parameters are replaced by their slices)."""
    for moe in model.moe_layers():
        moe.shard_experts(ep.shard)


def routed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the routed experts, in the model's parameter order (the same on every process)."""
    routed = {id(p) for moe in model.moe_layers() for p in moe.experts.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) in routed]


# ---------------------------------------------------------------------------------------------------------
# gradients


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, ep: ExpertParallel) -> None:
    """Under DDP, after the last micro-batch's backward: the experts' gradients summed over the replicas and
    divided by the number of processes, DDP's average (FSDP2 does this itself)."""
    for _, p in routed_parameters(model):
        if p.grad is None:  # every process must take part in the same all-reduces
            p.grad = torch.zeros_like(p)
        if ep.replicas is not None:
            dist.all_reduce(p.grad, group=ep.replicas)
        p.grad.div_(ep.world_size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, ep: ExpertParallel) -> torch.Tensor:
    """`clip_grad_norm_` over the whole model: the routed experts' share of the squared norm is summed over
    the EP group, so every process clips by the same global norm. -> that norm."""
    routed = {id(p) for _, p in routed_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    dense = [p for p in params if id(p) not in routed]
    experts = [p for p in params if id(p) in routed]
    dense_norm = _full(torch.nn.utils.get_total_norm([p.grad for p in dense]))
    experts_sq = _full(torch.nn.utils.get_total_norm([p.grad for p in experts])) ** 2
    dist.all_reduce(experts_sq, group=ep.shard.group)
    total = (dense_norm**2 + experts_sq).sqrt()
    for group in (dense, experts):  # two calls: under FSDP2 the two sets live on different device meshes
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) reduced to the plain tensor every process agrees on."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------------------------------------------------
# checkpoints: full experts on save, this process's slice on load


def gather_experts(t: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """The full (E, ...) tensor on the CPU from every process's (E/N, ...) slice; a collective."""
    return ep.shard.gather(_full(t.detach())).cpu()


def local_slice(t: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    return t.chunk(ep.size)[ep.shard.rank].clone()


def full_model_state(state: dict[str, torch.Tensor], model: nn.Module, ep: ExpertParallel) -> dict:
    """`state` (the model's state dict, experts as this process's slices) with the full expert set."""
    return state | {name: gather_experts(p, ep) for name, p in routed_parameters(model)}


def full_optimizer_state(
    state: dict[str, Any], model: nn.Module, optimizer, ep: ExpertParallel, *, by_name: bool
) -> dict[str, Any]:
    """`state` (the optimizer's state dict) with the experts' AdamW moments gathered to full size.

    DDP's `optimizer.state_dict()` is keyed by each parameter's index in the param groups, FSDP2's full state
    dict (`by_name`) by its name. Under FSDP2 only rank 0's `state` holds entries; every rank gathers.
    """
    entries = {
        name if by_name else i: _per_param(optimizer.state.get(p, {}), gather_experts, ep)
        for i, name, p in _expert_entries(model, optimizer)
    }
    return _with_entries(state, entries)


def local_optimizer_state(state: dict[str, Any], model: nn.Module, optimizer, ep: ExpertParallel) -> dict:
    """A full optimizer state dict (as saved, keyed either way) with the experts' moments cut to this
    process's slice."""
    entries = {}
    for i, name, _ in _expert_entries(model, optimizer):
        for key in (i, name):
            if key in state["state"]:
                entries[key] = _per_param(state["state"][key], local_slice, ep)
    return _with_entries(state, entries)


def _expert_entries(model: nn.Module, optimizer) -> list[tuple[int, str, nn.Parameter]]:
    """(index in the optimizer's param groups, name, parameter) of the routed experts."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return [(index[id(p)], name, p) for name, p in routed_parameters(model)]


def _per_param(entry: dict[str, Any], fn, ep: ExpertParallel) -> dict[str, Any]:
    # a new dict: `optimizer.state_dict()` hands out the live per-parameter dicts; `step` is a scalar
    return {k: fn(v, ep) if torch.is_tensor(v) and v.ndim > 0 else v for k, v in sorted(entry.items())}


def _with_entries(state: dict[str, Any], entries: dict[Any, dict]) -> dict[str, Any]:
    return {**state, "state": {**state.get("state", {}), **entries}}
