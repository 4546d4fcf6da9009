"""Triton kernels for decoding with Top-K sparse activations: select the k largest entries, then read only
their weight rows. Imports without Triton (``HAVE_TRITON`` is False then); only calling a kernel needs it."""

from .topk_gemv import (
    HAVE_TRITON,
    MAX_D_IN,
    fused_config,
    gemv_config,
    pack_input_major,
    pdl_supported,
    reset_workspaces,
    select_topk,
    sparse_gemv,
    sparse_gemv_reference,
    split_output,
    threshold_gemv,
    threshold_state,
    topk_gemv,
    topk_gemv_reference,
    topk_threshold,
    workspaces_clean,
)

__all__ = [
    "HAVE_TRITON",
    "MAX_D_IN",
    "fused_config",
    "gemv_config",
    "pack_input_major",
    "pdl_supported",
    "reset_workspaces",
    "select_topk",
    "sparse_gemv",
    "sparse_gemv_reference",
    "split_output",
    "threshold_gemv",
    "threshold_state",
    "topk_gemv",
    "topk_gemv_reference",
    "topk_threshold",
    "workspaces_clean",
]
