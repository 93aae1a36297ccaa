"""The optimizer (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedule (warmup, then decay to a floor).

Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025) replaces a hidden matrix's momentum update by its
nearest semi-orthogonal matrix (five Newton–Schulz iterations), so that every direction of the layer learns
at the same rate. It is meant for the matrices inside the network: embeddings, the LM head, norms and the
router stay on AdamW (as nanochat and Moonlight do). The 2-D matrices use `torch.optim.Muon`; the routed
experts' 3-D weights, which it refuses, use `ExpertMuon`: the same arithmetic batched over the experts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial

import torch
from torch import nn

from deepseek_lm.errors import UserError
from deepseek_lm.train.config import TrainConfig

# torch.optim.Muon's defaults (Keller Jordan's quintic coefficients, chosen for a steep slope at zero)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: frozenset[int] = frozenset(),
    embedding_lr: float | None = None,
) -> list[dict]:
    """Decay only the matrices that multiply activations: no decay on norms, biases or embeddings.

    Weight decay on an embedding pulls rare tokens' rows to zero and on a norm's gain fights the scale it
    learns (as in nanoGPT / GPT-3). The MoE router bias is a buffer, updated by counting, so the optimizer
    never sees it. A tied head is the embedding, so it is not decayed either. `exclude`: ids of parameters
    another optimizer takes. `embedding_lr`: the embedding tables in a third group at that peak rate (None:
    in the undecayed group at the optimizer's, so that runs without it keep their two groups on resume).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, embedding, seen = [], [], [], set(exclude)
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embeddings and embedding_lr is not None:
            embedding.append(p)
        else:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if embedding:
        groups.append({"params": embedding, "weight_decay": 0.0, "lr": embedding_lr})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over every parameter (`train.optimizer adamw`), or `muon_optimizer`."""
    if cfg.optimizer == "muon":
        return muon_optimizer(model, cfg, device_type)
    return adamw(param_groups(model, cfg.weight_decay, embedding_lr=cfg.embedding_lr), cfg, device_type)


def adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # The fused kernel exists for CUDA and CPU tensors in recent torch; foreach is the portable fallback.
    fused = device_type in ("cuda", "cpu")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    except (RuntimeError, ValueError):  # e.g. DTensor parameters or a device without the fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Muon


def muon_matrices(model: nn.Module) -> tuple[list[nn.Parameter], dict[int, list[nn.Parameter]]]:
    """The hidden matrices Muon takes: (2-D matrices, {blocks: 3-D expert stacks}), the rest left to AdamW.

    AdamW keeps embeddings and output heads (a row per token: a lookup table, not a linear map of the
    hidden state), the router (its scores pass through a sigmoid and a top-k) and every vector. The experts'
    fused `gate_up_proj` (E, 2I, D) holds two matrices per expert, [gate; up], orthogonalised apart (blocks
    2): they are two linear maps whose outputs meet only in silu(gate) * up, just as the dense and shared
    SwiGLU's separate gate_proj and up_proj, which torch's Muon takes one by one (Moonlight and nanochat
    orthogonalise each weight matrix).
    """
    from deepseek_lm.model.moe import Router

    adamw_only = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | Router) or name.rsplit(".", 1)[-1] in ("lm_head", "head"):
            adamw_only |= {id(p) for p in module.parameters()}
    matrices, stacks, seen = [], defaultdict(list), set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in adamw_only or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim == 2:
            matrices.append(p)
        elif p.ndim == 3:
            stacks[2 if name.endswith("gate_up_proj") else 1].append(p)
    return matrices, dict(stacks)


def muon_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> CombinedOptimizer:
    """Muon for the hidden matrices, batched `ExpertMuon` for the experts, AdamW for the rest: one object."""
    if not hasattr(torch.optim, "Muon"):
        raise UserError(
            f"train.optimizer muon needs torch.optim.Muon (torch >= 2.9; this is {torch.__version__}): "
            "upgrade torch or use train.optimizer adamw"
        )
    matrices, stacks = muon_matrices(model)
    taken = frozenset(id(p) for p in [*matrices, *(p for ps in stacks.values() for p in ps)])
    kwargs = dict(
        lr=cfg.muon_lr if cfg.muon_lr is not None else cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        adjust_lr_fn=cfg.muon_adjust_lr,
    )
    parts: list[torch.optim.Optimizer] = [
        adamw(param_groups(model, cfg.weight_decay, taken, cfg.embedding_lr), cfg, device_type)
    ]
    if matrices:
        parts.append(torch.optim.Muon(matrices, **kwargs))
    if stacks:
        parts.append(ExpertMuon([{"params": ps, "blocks": b} for b, ps in sorted(stacks.items())], **kwargs))
    return CombinedOptimizer(parts)


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """The zeroth power (≈ U Vᵀ of the SVD) of each matrix of G (B, M, N), in bf16 as torch's Muon.

    Transposed to the wide side first, so the Gram matrix X Xᵀ is the smaller one; each matrix is divided
    by its Frobenius norm, which bounds its spectral norm by 1, where the iteration converges.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()  # (B, M, N)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # (B, N, M)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT  # (B, m, m), m = min(M, N)
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A²) X
    return X.mT if tall else X


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Muon's update scale for one (rows, cols) matrix, as torch.optim.Muon's `adjust_lr_fn`.

    original (Keller Jordan): sqrt(max(1, rows / cols)); match_rms_adamw (Moonlight): 0.2 sqrt(max(rows,
    cols)), which gives the update AdamW's typical RMS, so that AdamW's lr and weight decay carry over.
    """
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


class ExpertMuon(torch.optim.Optimizer):
    """torch.optim.Muon for stacks of matrices: every (M, N) slice of a 3-D parameter (E, M, N) is
    orthogonalised on its own, all of them in one batched Newton–Schulz.

    A group's `blocks` cuts each slice along its rows into that many matrices of M / blocks rows (2 for
    the experts' fused [gate; up]). Per matrix the arithmetic is `torch.optim.Muon`'s: momentum as a lerp,
    Nesterov, bf16 Newton–Schulz, decoupled weight decay with the unadjusted lr, the update scaled by
    `adjust_lr_fn` of one matrix's shape. Under FSDP2 each rank steps its own shard: the shards split the
    expert dimension, so every matrix is whole on one rank.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str | None = None,
        blocks: int = 1,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            adjust_lr_fn=adjust_lr_fn, blocks=blocks,
        )  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 3 or p.shape[1] % group["blocks"]:
                    raise ValueError(
                        f"ExpertMuon takes (E, M, N) with M divisible by blocks, not {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, group)
        return loss

    def _step_one(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        param, grad, buf = (_local(t) for t in (p, p.grad, state["momentum_buffer"]))  # (E, M, N)
        momentum, blocks = group["momentum"], group["blocks"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        E, M, N = update.shape
        ortho = newton_schulz(update.reshape(E * blocks, M // blocks, N))  # (E·blocks, M / blocks, N)
        lr = group["lr"]
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(ortho.reshape(E, M, N), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], M // blocks, N))


def _evaluate(closure):
    """torch.optim's `step(closure)` contract: the closure re-evaluates the loss, with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters as one: what the trainer, LambdaLR, the GradScaler,
    clipping and the checkpoint helpers call, so none of them needs to know about the parts.

    `param_groups` is the parts' groups, the same dicts (a scheduler setting `lr` sets it for the part);
    `state` is one dict shared by the parts, keyed by parameter, so that `state_dict()` has the standard
    layout that FSDP2's full-state-dict helpers convert. `load_state_dict` hands each part its groups.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        super().__init__([dict(g) for part in parts for g in part.param_groups], {})
        self._link({k: v for part in parts for k, v in part.state.items()})

    def _link(self, state: dict) -> None:
        self.state = defaultdict(dict, state)
        self.param_groups = [g for part in self.parts for g in part.param_groups]
        for part in self.parts:
            part.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for part in self.parts:
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        groups, states = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the saved optimizer state has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        merged, start = {}, 0
        for part in self.parts:
            own = groups[start : start + len(part.param_groups)]
            start += len(own)
            ids = {i for g in own for i in g["params"]}
            part.load_state_dict(
                {"state": {i: s for i, s in states.items() if i in ids}, "param_groups": own}
            )
            merged.update(part.state)
        self._link(merged)


# ---------------------------------------------------------------------------------------------------------
# the schedule


def decay_factor(progress: float, decay: str, floor: float) -> float:
    """The decay part of the schedule at `progress` ∈ [0, 1] of the post-warmup phase."""
    progress = min(max(progress, 0.0), 1.0)
    if decay == "constant":
        return 1.0
    if decay == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, *, warmup: int, total: int, decay: str, floor: float) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return decay_factor((step - warmup) / max(total - warmup - 1, 1), decay, floor)


def lr_factor_by_time(step: int, progress: float, *, warmup: int, decay: str, floor: float) -> float:
    """The time-budget schedule: warmup over the first steps, decay over the fraction of the budget used."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * decay_factor(progress, decay, floor)


def schedule_factor(cfg: TrainConfig, total_steps: int) -> partial:
    return partial(
        lr_factor, warmup=cfg.warmup_steps, total=total_steps, decay=cfg.decay, floor=cfg.min_lr_ratio
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg, total_steps))
