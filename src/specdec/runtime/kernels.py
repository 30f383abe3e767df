"""The matrix products of specdec's CPU forwards (the native runtime, the heads' drafting steps): x @ W with
the weight stored transposed ([in, out]), through MKL, or through oneDNN on a copy prepacked once in its blocked
layout. MKL repacks the weight at every call, which dominates few-row products (docs/runtime.md, Batches);
oneDNN's prepacked product takes float32, and bfloat16 where the CPU has bf16 units. From PACKED_ROWS rows on
the prepacked one is used; for one row the faster of the two is timed, per model (`NativeModel.packed_from`)
or per weight (`Matrix`), since it depends on the CPU, the dtype and the weight's size (docs/runtime.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

PACKED_ROWS = 2  # rows from which products use the prepacked weights (for one row: timed, module docstring)


def prepack(w_t: torch.Tensor) -> Any:
    """A weight [in, out] prepacked for oneDNN's product, or None (not on the CPU, no oneDNN, or a dtype
    oneDNN has no fast product for here: float32 always, bfloat16 where the CPU has bf16 units)."""
    if w_t.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if w_t.dtype != torch.float32 and not (w_t.dtype == torch.bfloat16 and bf16_units()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w_t.detach().T.contiguous(), 16)
    except RuntimeError:  # a build without the op
        return None


def bf16_units() -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def product(
    x: torch.Tensor,
    w_t: torch.Tensor,
    packed: Any = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, in] @ w_t [in, out] (+ bias) (+ residual): by oneDNN on the prepacked weight when given, else by
    MKL with the residual or bias fused (addmm)."""
    if packed is not None:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return y if residual is None else residual + y
    if residual is not None:
        y = torch.addmm(residual, x, w_t)
        return y if bias is None else y + bias
    return x @ w_t if bias is None else torch.addmm(bias, x, w_t)


def faster_kernel(run: Callable[[int], object], repeats: int = 5, clock=time.perf_counter) -> int:
    """Which one-row kernel is the faster: `run(rows)` does the work with the kernel a product of `rows` rows
    takes (1: oneDNN's prepacked, PACKED_ROWS: MKL's); each is timed `repeats` times, alternating, after one
    untimed run each, and the least counts (other load only ever slows a run). Returns 1 or PACKED_ROWS."""
    best = {1: float("inf"), PACKED_ROWS: float("inf")}
    for timed in [False] + [True] * repeats:
        for rows in best:
            start = clock()
            run(rows)
            if timed:
                best[rows] = min(best[rows], clock() - start)
    return 1 if best[1] < best[PACKED_ROWS] else PACKED_ROWS


class Matrix:
    """One weight for x @ W^T with `product`'s choice of kernel by row count (for small modules outside the
    target's forward: the trained heads' drafting steps). `weight`: [out, in], as `nn.Linear` stores it. For
    one row the two kernels are timed once here and the faster kept (`choose_one_token_kernel`'s reason: in
    bfloat16 on a CPU with bf16 units oneDNN's is several times faster, in float32 MKL's often is)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.t = weight.detach().T.contiguous()  # [in, out]
        self.packed = prepack(self.t)
        self.packed_from = PACKED_ROWS if self.packed is None else self._one_row_kernel()

    def _one_row_kernel(self) -> int:
        """1 when oneDNN's prepacked product of one row is the faster, else PACKED_ROWS."""
        x = torch.zeros(1, self.t.shape[0], dtype=self.t.dtype, device=self.t.device)
        with torch.inference_mode():
            return faster_kernel(
                lambda rows: product(x, self.t, self.packed if rows == 1 else None), repeats=3
            )

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        packed = self.packed if x.shape[0] >= self.packed_from else None
        return product(x, self.t, packed, bias, residual)
