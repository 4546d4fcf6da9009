"""Attention of one decode token over a static KV cache, in Triton.

At batch 1 a decode step's attention reads the cached keys and values once (4 MB a layer for Llama-2-7B at 256
positions: about 1 us of bandwidth), but a general flash kernel spends 8 us a layer on it (H200, cuDNN, measured in
the decode profile). Here the cache is split into chunks of positions: a program takes one query head and one
chunk, keeps a running max and sum of its softmax over the chunk (the online softmax), and writes its partial
output; a second launch combines a head's chunks. Only positions up to the current one (read from the device, so
one CUDA graph serves every step) are read; chunks past it return at once.

Not used by the engine yet: in its first end-to-end run it moved nothing (benchmarks/NOTES-kernels.md, session 5),
and it waits for a profile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .topk_gemv import HAVE_TRITON, need_triton, next_pow2

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attend_chunk_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, stride_kh, stride_ks, group, scale,
                             n_splits, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, HD: tl.constexpr):
        head = tl.program_id(0)
        split = tl.program_id(1)
        kv = head // group
        length = tl.load(pos_ptr) + 1
        start = split * CHUNK
        dims = tl.arange(0, HD)
        q = tl.load(q_ptr + head * HD + dims).to(tl.float32) * scale
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([HD], dtype=tl.float32)
        end = tl.minimum(start + CHUNK, length)
        for s0 in range(start, end, BLOCK_S):
            offs = s0 + tl.arange(0, BLOCK_S)
            valid = offs < end
            at = kv * stride_kh + offs[:, None] * stride_ks + dims[None, :]
            k = tl.load(k_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        row = head * n_splits + split
        tl.store(m_ptr + row, m)  # -inf and 0 for a chunk past the current position: it weighs nothing
        tl.store(l_ptr + row, l)
        tl.store(o_ptr + row * HD + dims, acc)

    @triton.jit
    def _combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, n_splits, SPLITS: tl.constexpr, HD: tl.constexpr):
        head = tl.program_id(0)
        splits = tl.arange(0, SPLITS)
        here = splits < n_splits
        rows = head * n_splits + splits
        m = tl.load(m_ptr + rows, mask=here, other=float("-inf"))
        l = tl.load(l_ptr + rows, mask=here, other=0.0)
        top = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        dims = tl.arange(0, HD)
        o = tl.load(o_ptr + rows[:, None] * HD + dims[None, :], mask=here[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
        tl.store(out_ptr + head * HD + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, scale: float,
                     chunk: int = 64) -> Tensor:
    """softmax(q Kᵀ · scale) V for one token: ``q`` [n_heads, head_dim], caches [n_kv_heads, max_seq, head_dim]
    (query head h reads KV head h // (n_heads / n_kv_heads)), ``pos`` the token's position (int [1] on the device):
    keys 0..pos are attended. Returns [n_heads, head_dim] in q's dtype."""
    n_heads, hd = q.shape
    n_kv, max_seq, hd_k = k_cache.shape
    if v_cache.shape != k_cache.shape or hd_k != hd or n_heads % n_kv:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}")
    if hd & (hd - 1) or k_cache.stride(2) != 1 or v_cache.stride() != k_cache.stride() or not q.is_contiguous():
        raise ValueError("head_dim must be a power of two, q contiguous and the caches alike with contiguous rows")
    need_triton(q, k_cache, v_cache, pos)
    n_splits = -(-max_seq // chunk)
    part = torch.empty((n_heads, n_splits, hd), dtype=torch.float32, device=q.device)
    m = torch.empty((n_heads, n_splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty_like(q)
    block = min(chunk, 32)
    _attend_chunk_kernel[(n_heads, n_splits)](q, k_cache, v_cache, pos, part, m, l, k_cache.stride(0),
                                              k_cache.stride(1), n_heads // n_kv, scale, n_splits, CHUNK=chunk,
                                              BLOCK_S=block, HD=hd, num_warps=4)
    _combine_kernel[(n_heads,)](part, m, l, out, n_splits, SPLITS=max(2, next_pow2(n_splits)), HD=hd, num_warps=4)
    return out


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, scale: float) -> Tensor:
    """The same in float32 torch, for tests."""
    group = q.shape[0] // k_cache.shape[0]
    k = k_cache[:, : pos + 1].float().repeat_interleave(group, 0)
    v = v_cache[:, : pos + 1].float().repeat_interleave(group, 0)
    w = torch.softmax((k @ q.float()[:, :, None])[..., 0] * scale, -1)
    return (w[:, None, :] @ v)[:, 0]
