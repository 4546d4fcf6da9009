"""Triton kernels for batch-1 decoding: Top-K selection and the GEMVs that read only the kept weight rows. Imports
without Triton (``HAVE_TRITON`` is False then); only calling a kernel needs it."""

from .topk_gemv import (
    HAVE_TRITON,
    MAX_D_IN,
    column_thresholds,
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
    "column_thresholds",
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
