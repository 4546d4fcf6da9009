"""The Top-K kernels as torch custom ops: torch.compile traces them as opaque calls, so a compiled decode step is
one graph (a Python call behind ``torch.compiler.disable`` broke it into one frame per projection, and those
frames recompiled for every input width until dynamo's limit, after which they ran uncompiled)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels


@torch.library.custom_op("larosa::topk_gemv", mutates_args=())
def topk_gemv(x: Tensor, wt: Tensor, k: int, pdl: bool) -> Tensor:
    """topk(x, k) @ wt for one token ([d_in] -> [d_out]): the threshold search, then the fused GEMV."""
    return kernels.topk_gemv(x, wt, k, pdl=pdl)


@torch.library.custom_op("larosa::threshold_gemv", mutates_args=())
def threshold_gemv(x: Tensor, wt: Tensor, state: Tensor, per_column: bool) -> Tensor:
    """(x with |x| below a calibrated threshold zeroed) @ wt for one token: the fused GEMV alone (a threshold per
    output column with ``per_column``: TEAL's q, k, v or gate, up packed side by side)."""
    return kernels.threshold_gemv(x, wt, state, per_column=per_column)


@topk_gemv.register_fake
def _(x: Tensor, wt: Tensor, k: int, pdl: bool) -> Tensor:
    return wt.new_empty(wt.shape[1])


@threshold_gemv.register_fake
def _(x: Tensor, wt: Tensor, state: Tensor, per_column: bool) -> Tensor:
    return wt.new_empty(wt.shape[1])
