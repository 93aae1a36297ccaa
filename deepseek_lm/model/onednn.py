"""Products through oneDNN over weights laid out once in its blocked format, on a CPU in fp32.

torch sends a CPU's fp32 products to MKL. On AMD processors MKL runs its AVX2 kernels, even where the cores
have AVX-512: ~110 GFLOP/s on one core of this project's EPYC dev VM, where oneDNN's JIT-compiled kernels,
which pick the instructions the core has, reach ~250 on the same shapes (the prefill's (1,984, 128) ×
(128, 512): 2.33 against 0.99 ms, one thread). And MKL is slow for a few rows times a wide weight (the decode
path's reason, decode.py). Two ops of torch's oneDNN bindings, which inductor also uses for frozen CPU
weights: `_reorder_linear_weight` lays a (M, K) weight out once, `_linear_pointwise` multiplies by it, with
an elementwise epilogue fused where asked (`swiglu`).
"""

from __future__ import annotations

import functools

import torch


def _linear(x_NK: torch.Tensor, w: torch.Tensor, epilogue: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x_NK, w, None, epilogue, [], "")


def pack(weight_MK: torch.Tensor | None, batch_size: int | None) -> torch.Tensor | None:
    """A (M, K) weight in oneDNN's blocked layout for products of `batch_size` rows, or None where that does
    not pay or exist: under 3 rows (MKL's matrix-vector product was faster at one row, 0.9 against 2.4 ms
    for the seed's head, and at two a wash), off the CPU, outside fp32, in a torch built without oneDNN. Not
    inside compiled graphs: inductor cannot lower the layout."""
    if weight_MK is None or batch_size is None or batch_size < 3:
        return None
    if weight_MK.device.type != "cpu" or weight_MK.dtype != torch.float32:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight_MK.detach().contiguous(), batch_size)
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return None


def mm(x_NK: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (N, K) times a weight held as (K, M), or as (M, K) packed (`pack`).

    oneDNN's kernel for one row rounds differently from its kernel for several (at K >= 2048): a single row
    runs as two, so that a row's result is the same alone as beside others (a batch-invariant decoder)."""
    if w.is_mkldnn:
        if x_NK.shape[0] == 1:
            return _linear(x_NK.expand(2, -1), w)[:1]
        return _linear(x_NK, w)
    return x_NK @ w


def swiglu(x_NK: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) · up(x)) over packed (I, K), (I, K), (M, I) weights -> (N, M): the silu fused
    into the gate's product and the elementwise product into the up's (oneDNN post-ops), so the (N, I)
    activations are written once instead of four times (the seed's expert at 1,130 rows: 0.97 ms, against
    3.85 through MKL and 2.65 through oneDNN unfused)."""
    silu_gate = _linear(x_NK, gate, "swish")
    act = torch.ops.mkldnn._linear_pointwise.binary(x_NK, silu_gate, up, None, "mul")
    return _linear(act, down)


@functools.cache
def available() -> bool:
    """Whether this torch's oneDNN ops run here (packing, the plain product and both fused epilogues), tried
    once per process on tiny tensors."""
    try:
        x, w = torch.ones(4, 8), torch.ones(8, 8)
        packed = pack(w, 4)
        return packed is not None and swiglu(x, packed, packed, packed).shape == (4, 8)
    except (AttributeError, RuntimeError):  # a torch built without oneDNN, or without these ops
        return False
