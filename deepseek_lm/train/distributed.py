"""Data parallelism under torchrun: DDP everywhere (gloo on CPU, NCCL on GPU), FSDP2 as a GPU option.

The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so
single-node and multi-node runs differ only in torchrun's own flags. Every collective has a timeout
(`train.dist_timeout_s`): a rank that dies makes the others fail within that bound instead of hanging; with
gloo a dead peer usually surfaces at once as a closed connection. Checkpoints stay our one-directory format:
under FSDP2 the full state dicts are gathered to rank 0, which writes them; every rank reads them on resume.
"""

from __future__ import annotations

import contextlib
import faulthandler
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepseek_lm.errors import UserError
from deepseek_lm.train import expert_parallel as EP


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankFailure(UserError):
    """Another process of the run died or stopped answering; the run must be restarted (with --resume)."""


def init_distributed(device: str, timeout_s: float) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # a fatal signal from a backend's C++ thread (SIGABRT, SIGSEGV) then prints every Python thread's stack
    # to stderr, where torchrun alone reports only the exit code
    faulthandler.enable()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # NCCL then aborts a failed or timed-out collective instead of leaving the rank blocked in it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, backend)


def local_device(info: DistInfo, device: torch.device) -> torch.device:
    """Each process drives its own GPU (LOCAL_RANK); CPU processes share the host."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective_guard(info: DistInfo):
    """Turn a failed collective (dead peer, timeout) into one clear error instead of a backend traceback."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not info.enabled or not _looks_like_comm_failure(e):
            raise
        raise RankFailure(
            f"rank {info.rank}: lost contact with the other processes ({' '.join(str(e).split())[:200]}); "
            "restart the run with --resume"
        ) from e


def _looks_like_comm_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(
        s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "broken pipe")
    )


# ---------------------------------------------------------------------------------------------------------
# collectives that are no-ops in a single process


def all_reduce(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# wrapping the model


def wrap_model(
    model: nn.Module, info: DistInfo, device: torch.device, *, fsdp: bool, param_dtype=None, ep=None
):
    """DDP (or FSDP2 on GPUs) around `model`; the model itself when single-process. `ep`: the
    `ExpertParallel` whose experts `model` already holds a slice of (expert_parallel.py)."""
    if fsdp:
        return _fully_shard(model, info, device, param_dtype, ep)
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if ep is not None:
        # each process holds other experts: DDP must neither overwrite them with rank 0's at start nor average
        # their gradients (reduce_expert_grads does, over the processes holding the same experts)
        names = [name for name, _ in EP.routed_parameters(model)]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    # The MoE bias buffers are updated identically on every rank from all-reduced counts, so DDP need not
    # broadcast buffers each forward (torch >= 2.13 spells it forward_sync_buffers, and warns at the old name).
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else None
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, **{no_sync or "broadcast_buffers": False})


def _fully_shard(model: nn.Module, info: DistInfo, device: torch.device, param_dtype, ep):
    """FSDP2: each block, then the root, shards its parameters over all ranks (a 1-D device mesh); with
    expert parallelism each MoE layer's experts first, over the processes that hold the same experts.

    Meant for GPUs (NCCL); it also runs on CPU over gloo, which the tests use to check the sharded path.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # FSDP2 in a single process still needs a process group
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (info.world_size,))
    # compute in param_dtype (bf16 on GPUs), reduce gradients in fp32, keep fp32 master weights: torchtitan's
    # default policy
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if ep is not None:  # torchtitan's layout: experts sharded by EP, then by FSDP over their replicas
        replicas = ep.replicas or dist.new_group([info.rank])  # alone: a mesh of one
        replica_mesh = DeviceMesh.from_group(replicas, device.type)
        for moe in model.moe_layers():
            fully_shard(moe.experts, mesh=replica_mesh, mp_policy=mp)
            # the other gradients are averaged over all processes: so are these (see expert_parallel.py)
            moe.experts.set_gradient_divide_factor(info.world_size)
            # by a sum and a division: the fused pre-multiplied sum is NCCL's alone (gloo refuses it). Not
            # on a mesh of one, where torch 2.13 would then divide twice.
            moe.experts.set_force_sum_reduction_for_comms(replica_mesh.size() > 1)
    for layer in [*model.layers, *model.mtp]:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def clip_grad_norm(model: nn.Module, max_norm: float, ep=None) -> float:
    """Clip the global gradient norm to `max_norm` -> the norm before clipping, the same on every rank.
    `model`: the plain or FSDP2 model (its parameters are the ones DDP's wrapper holds)."""
    if ep is not None:
        norm = EP.clip_grad_norm_(model, max_norm, ep)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------------------
# full state dicts for our one-directory checkpoints


def full_model_state(model: nn.Module, ep=None) -> dict[str, torch.Tensor]:
    """The unsharded state dict (on CPU); a collective under FSDP2 or expert parallelism (`ep`), so every
    rank must call it. `model`: the FSDP2 model, or the plain one (not DDP's wrapper)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state if ep is None else EP.full_model_state(state, model, ep)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ep=None) -> dict[str, Any]:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        state = optimizer.state_dict()
    if ep is None:
        return state
    return EP.full_optimizer_state(state, model, optimizer, ep, by_name=is_fsdp(model))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ep=None
) -> None:
    if ep is not None:
        state = EP.local_optimizer_state(state, model, optimizer, ep)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
