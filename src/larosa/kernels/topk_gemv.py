"""Top-K selection and gather-GEMV in Triton, for batch-1 decoding with a Top-K sparse activation.

At batch 1 a linear layer is bound by reading its weight, so keeping k of d_in inputs only pays off if just
those k weight rows are read. The weight is therefore stored input-major, ``wt = W.T`` ([d_in, d_out]): a kept
input is one contiguous row, read with wide coalesced loads. Kernels:

- ``select_topk`` (v2, 16-bit x): ``_threshold_kernel`` (programs of 1024 values count into a global
  histogram of the 15-bit magnitude patterns; the last to finish finds the k-th largest in two small scans)
  then ``_compact_kernel`` (each program writes its slice's kept positions). ``method="single"`` is v1: one
  program, a bitwise search then a prefix-sum compaction (the only path for fp32).
- ``sparse_gemv``: programs tile the output columns and split the k kept rows (split-K); fp32 partial sums go
  to a small buffer that a second kernel adds up in a fixed order (deterministic).
- ``topk_gemv`` (16-bit x): the threshold launch, then ``_topk_gemv_kernel``, whose programs take slices of
  *positions* and load only the rows whose |x| passes (no index list); splits meet by fp32 atomics and the
  last program of each column block writes the output (two launches in all, not three).

Weights that share an input (q/k/v, gate/up) are packed side by side (``pack_input_major``) so one selection
feeds one wider GEMV. On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which is how the tests run without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    HAVE_TRITON = True
except ImportError:  # the pure-torch helpers below still work
    HAVE_TRITON = False

MAX_D_IN = 32768  # one program holds the whole vector in registers (32 values a thread at 32 warps)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:

    @triton.jit
    def _magnitude_bits(x_ptr, offs, n, NBITS: tl.constexpr):
        """|x| as an int32 bit pattern: a non-negative float orders like its bits read as an integer, so the
        search runs on integers. Padding is -1: below every candidate (>= 1) and the final threshold (>= 0)."""
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        if NBITS == 15:
            bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        else:
            bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return tl.where(offs < n, bits, -1)

    # k (and the GEMV's chunk) vary with the sparsity and are only compared against: specializing on them
    # (k % 16 == 0, k == 1) would just compile more copies of the same code.
    @triton.jit(do_not_specialize=["k"])
    def _select_kernel(
        x_ptr, idx_ptr, vals_ptr, n, k,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr, NBITS: tl.constexpr, RADIX: tl.constexpr,
    ):
        bits = _magnitude_bits(x_ptr, tl.arange(0, BLOCK), n, NBITS)  # the whole vector, one int32 a value

        # t = the largest integer with count(bits >= t) >= k, i.e. the k-th largest magnitude, built from the
        # top bit down. RADIX 1: one count (one block-wide reduction) per bit. RADIX 2: two bits a step, the
        # three counts of a step packed in 21-bit fields of one int64 sum: half the reductions (barriers),
        # 1.5x the compares. Which wins depends on d_in and num_warps: tune on the GPU.
        t = tl.full([], 0, tl.int32)
        if RADIX == 2:
            for step in tl.static_range(NBITS // 2):
                shift = NBITS - 2 - 2 * step
                c = (
                    (bits >= (t | (1 << shift))).to(tl.int64)
                    + ((bits >= (t | (2 << shift))).to(tl.int64) << 21)
                    + ((bits >= (t | (3 << shift))).to(tl.int64) << 42)
                )
                c = tl.sum(c, 0)
                # counts fall as the candidate rises, so the number of candidates keeping >= k is the digit
                digit = (
                    ((c & 0x1FFFFF) >= k).to(tl.int32)
                    + (((c >> 21) & 0x1FFFFF) >= k).to(tl.int32)
                    + ((c >> 42) >= k).to(tl.int32)
                )
                t = t | (digit << shift)
        LOW: tl.constexpr = NBITS % 2 if RADIX == 2 else NBITS  # the bits left, searched one at a time
        for bit in tl.static_range(LOW):
            cand = t | (1 << (LOW - 1 - bit))
            t = tl.where(tl.sum((bits >= cand).to(tl.int32), 0) >= k, cand, t)
        need = k - tl.sum((bits > t).to(tl.int32), 0)  # how many of the values equal to t to keep (>= 1)

        # Keep every magnitude above t and the first `need` equal to t, in index order. A prefix sum over
        # (above << 16 | equal) gives both running counts at once (each < CHUNK <= 32768: no carry). The
        # compaction goes CHUNK values at a time, re-reading x (cache-resident): all at once it would spill.
        gt_base = tl.full([], 0, tl.int32)
        eq_base = tl.full([], 0, tl.int32)
        for c0 in range(0, n, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            b = _magnitude_bits(x_ptr, offs, n, NBITS)
            packed = (b > t).to(tl.int32) * 65536 + (b == t).to(tl.int32)
            before = tl.cumsum(packed, 0) - packed
            gt_before = gt_base + (before >> 16)
            eq_before = eq_base + (before & 0xFFFF)
            keep = (b > t) | ((b == t) & (eq_before < need))
            pos = gt_before + tl.minimum(eq_before, need)
            tl.store(idx_ptr + pos, offs, mask=keep)
            tl.store(vals_ptr + pos, tl.load(x_ptr + offs, mask=keep), mask=keep)
            total = tl.sum(packed, 0)
            gt_base += total >> 16
            eq_base += total & 0xFFFF

    @triton.jit(do_not_specialize=["k", "chunk"])
    def _gather_gemv_kernel(
        idx_ptr, vals_ptr, wt_ptr, out_ptr, k, d_out, stride_w, chunk,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        k_lo = pid_k * chunk
        k_hi = tl.minimum(k_lo + chunk, k)
        # Accumulate a [BLOCK_K, BLOCK_N] tile and reduce it once at the end: no cross-warp sum per step.
        # The next step's row indices are loaded alongside this step's weights, so each step waits on one
        # memory round trip, not two (index, then the rows it names).
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        rows = tl.load(idx_ptr + offs_k, mask=offs_k < k_hi, other=0)
        for _ in range(k_lo, k_hi, BLOCK_K):
            mask_k = offs_k < k_hi
            v = tl.load(vals_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(
                wt_ptr + rows.to(tl.int64)[:, None] * stride_w + offs_n[None, :],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
                eviction_policy="evict_first",  # each weight byte is read once: keep L2 for the rest
            )
            offs_k += BLOCK_K
            rows = tl.load(idx_ptr + offs_k, mask=offs_k < k_hi, other=0)
            acc += v[:, None] * w.to(tl.float32)
        y = tl.sum(acc, 0)
        # With one split this is the output itself (cast on store); otherwise row pid_k of the fp32 partials.
        tl.store(out_ptr + pid_k * d_out + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit(do_not_specialize=["split"])
    def _sum_splits_kernel(part_ptr, out_ptr, d_out, split, SPLIT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s0 in range(0, split, SPLIT_BLOCK):  # a fixed order: the same sum every call
            offs_s = s0 + tl.arange(0, SPLIT_BLOCK)
            p = tl.load(
                part_ptr + offs_s[:, None] * d_out + offs_n[None, :],
                mask=(offs_s[:, None] < split) & mask_n[None, :],
                other=0.0,
            )
            acc += tl.sum(p, 0)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


    # ------------------------------------------------------------------------------------- v2: two launches
    # The v1 select is one program, so its cost grows with d_in on a single SM (7.8 us at 4096, ~20 us at
    # 14336 on the H200). v2 spreads the threshold search over several programs that meet through a small
    # global histogram, and never compacts for the GEMV: the GEMV's programs take slices of *positions* and
    # test each |x| against the threshold themselves.
    #
    # Workspace (int32, per device, all zero between calls): HIST fine counts of each 15-bit magnitude
    # [32768], then COARSE counts of its top 7 bits [128], then a ticket counter. The threshold kernel's last
    # program clears COARSE and the ticket; the consumer kernel (GEMV or compaction) clears the fine bins of
    # the values it reads, with plain scattered stores. So every threshold launch must be followed by one.
    WS_COARSE = tl.constexpr(32768)
    WS_TICKET = tl.constexpr(32768 + 128)

    @triton.jit(do_not_specialize=["k"])
    def _threshold_kernel(x_ptr, ws_ptr, state_ptr, n, k, SLICE: tl.constexpr, PDL: tl.constexpr):
        """state = (t, need, eq): t the k-th largest magnitude pattern, need = how many values equal to t to
        keep (the lowest-index ones), eq = how many there are. Each program counts its slice; the last one
        to finish reads the totals and finds t in two small scans (128 coarse bins, then 256 fine ones)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()  # let the PDL-launched GEMV start its programs now
            tl.extra.cuda.gdc_wait()  # x, from the kernel before, is visible from here on
        pid = tl.program_id(0)
        offs = pid * SLICE + tl.arange(0, SLICE)
        valid = offs < n
        b = _magnitude_bits(x_ptr, offs, n, 15)
        coarse = tl.where(valid, b >> 8, 0)
        bins = tl.arange(0, 128)
        h = tl.histogram(coarse, 128)
        h = h - tl.where(bins == 0, SLICE - tl.sum(valid.to(tl.int32), 0), 0)  # padding went to bin 0
        tl.atomic_add(ws_ptr + WS_COARSE + bins, h, mask=h > 0, sem="relaxed")
        tl.atomic_add(ws_ptr + b, 1, mask=valid, sem="relaxed")
        tl.debug_barrier()  # every thread's counts are issued before the ticket (release, gpu scope)
        ticket = tl.atomic_add(ws_ptr + WS_TICKET, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            h1 = tl.load(ws_ptr + WS_COARSE + bins, volatile=True)
            above1 = tl.sum(h1, 0) - tl.cumsum(h1, 0)  # count in coarse bins above each bin
            c = tl.sum((above1 + h1 >= k).to(tl.int32), 0) - 1  # the bin holding the k-th largest
            above = tl.sum(tl.where(bins > c, h1, 0), 0)
            fine = tl.arange(0, 256)
            h2 = tl.load(ws_ptr + c * 256 + fine, volatile=True)
            above2 = above + tl.sum(h2, 0) - tl.cumsum(h2, 0)
            f = tl.sum((above2 + h2 >= k).to(tl.int32), 0) - 1
            gt = tl.sum(tl.where(fine == f, above2, 0), 0)
            eq = tl.sum(tl.where(fine == f, h2, 0), 0)
            tl.store(state_ptr + tl.arange(0, 4), tl.where(tl.arange(0, 4) == 0, c * 256 + f,
                     tl.where(tl.arange(0, 4) == 1, k - gt, eq)))
            tl.store(ws_ptr + WS_COARSE + bins, tl.zeros([128], tl.int32))
            tl.store(ws_ptr + WS_TICKET, 0)

    @triton.jit
    def _ties_before(x_ptr, p0, t, CH: tl.constexpr):
        """How many of x[0:p0] have magnitude pattern t."""
        cnt = tl.full([], 0, tl.int32)
        for c0 in range(0, p0, CH):
            offs = c0 + tl.arange(0, CH)
            cnt += tl.sum((_magnitude_bits(x_ptr, offs, p0, 15) == t).to(tl.int32), 0)
        return cnt

    @triton.jit
    def _compact_kernel(x_ptr, idx_ptr, vals_ptr, ws_ptr, state_ptr, n, SLICE: tl.constexpr):
        """select_topk's second step: each program writes the kept positions of its slice, after counting
        those kept before it (a re-read of x[0:p0], cache-resident)."""
        pid = tl.program_id(0)
        p0 = pid * SLICE
        t = tl.load(state_ptr)
        need = tl.load(state_ptr + 1)
        packed_before = tl.full([], 0, tl.int32)  # (count > t) << 16 | (count == t) over x[0:p0]
        for c0 in range(0, p0, SLICE):
            offs = c0 + tl.arange(0, SLICE)
            b = _magnitude_bits(x_ptr, offs, p0, 15)
            packed_before += tl.sum((b > t).to(tl.int32) * 65536 + (b == t).to(tl.int32), 0)
        offs = p0 + tl.arange(0, SLICE)
        b = _magnitude_bits(x_ptr, offs, n, 15)
        packed = (b > t).to(tl.int32) * 65536 + (b == t).to(tl.int32)
        before = tl.cumsum(packed, 0) - packed + packed_before
        eq_before = before & 0xFFFF
        keep = (b > t) | ((b == t) & (eq_before < need))
        pos = (before >> 16) + tl.minimum(eq_before, need)
        tl.store(idx_ptr + pos, offs, mask=keep)
        tl.store(vals_ptr + pos, tl.load(x_ptr + offs, mask=keep), mask=keep)
        tl.store(ws_ptr + b, tl.zeros([SLICE], tl.int32), mask=offs < n)  # leave the fine bins zero

    @triton.jit
    def _topk_gemv_kernel(
        x_ptr, wt_ptr, out_ptr, acc_ptr, cnt_ptr, ws_ptr, state_ptr, n, d_out, stride_w, P,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_SPLIT: tl.constexpr, PDL: tl.constexpr,
        CLEAR: tl.constexpr, COLUMNS: tl.constexpr,
    ):
        """y = topk(x) @ wt with the threshold from _threshold_kernel. Program (pid_n, pid_k) takes columns
        pid_n * BLOCK_N.. and positions pid_k * P.. (a slice of d_in, walked forwards): it loads the rows whose
        |x| passes the threshold (masked loads of the others move no bytes). Splits meet by fp32 atomics in
        a zeroed buffer; the last program of a column block to finish casts it to the output and re-zeroes
        it, so there is no second launch. With COLUMNS the state is a threshold per output column (TEAL's q, k
        and v, or gate and up, packed side by side): a row is read where |x| passes the lowest threshold of the
        program's columns (a row mask, so the loads stay 16-byte vectors; only a block that straddles two
        weights reads rows one of them drops), and each column sums the entries that pass its own."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        p0 = pid_k * P
        p1 = tl.minimum(p0 + P, n)
        rows = p0 + tl.arange(0, BLOCK_K)
        if PDL:
            tl.extra.cuda.gdc_wait()  # the threshold kernel's results are visible from here on
        xv = tl.load(x_ptr + rows, mask=rows < p1, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if COLUMNS:  # keep every value equal to a threshold
            t_col = tl.load(state_ptr + offs_n, mask=mask_n, other=0x7FFF)
            t = tl.min(t_col, 0)
            need = t * 0 + 2147483647
            n_eq = t * 0
        else:
            t = tl.load(state_ptr)
            need = tl.load(state_ptr + 1)
            n_eq = tl.load(state_ptr + 2)
        # Values equal to t: keep the first `need` in index order. Only when some are dropped does a
        # program need to know how many come before its slice.
        tie_end = tl.where(need < n_eq, p0, 0)
        eq_seen = _ties_before(x_ptr, tie_end, t, 1024)
        for _ in range(p0, p1, BLOCK_K):
            valid = rows < p1
            b = tl.where(valid, xv.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, -1)
            eq = (b == t).to(tl.int32)
            keep = (b > t) | ((eq != 0) & (eq_seen + tl.cumsum(eq, 0) - eq < need))
            eq_seen += tl.sum(eq, 0)
            w = tl.load(
                wt_ptr + rows.to(tl.int64)[:, None] * stride_w + offs_n[None, :],
                mask=keep[:, None] & mask_n[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            if COLUMNS:  # each column's own threshold
                v = tl.where(b[:, None] >= t_col[None, :], xv[:, None], 0.0).to(tl.float32)
            else:
                v = tl.where(keep, xv, 0.0).to(tl.float32)[:, None]
            if CLEAR:  # the histogram bins the threshold search filled (none with a given threshold)
                tl.store(ws_ptr + b, tl.zeros([BLOCK_K], tl.int32), mask=valid & (rows * 0 + pid_n == 0))
            rows += BLOCK_K
            xv = tl.load(x_ptr + rows, mask=rows < p1, other=0.0)  # the next step's x, with these rows
            acc += tl.sum(v * w.to(tl.float32), 0)
        if ONE_SPLIT:
            tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.atomic_add(acc_ptr + offs_n, acc, mask=mask_n, sem="relaxed")
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if ticket == tl.num_programs(1) - 1:
                y = tl.load(acc_ptr + offs_n, mask=mask_n, volatile=True)
                tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)
                tl.store(acc_ptr + offs_n, tl.zeros([BLOCK_N], tl.float32), mask=mask_n)
                tl.store(cnt_ptr + pid_n, 0)

    INTERPRETED = not isinstance(_select_kernel, JITFunction)
    try:
        from triton.language.extra.cuda import gdc_wait as _gdc_wait  # noqa: F401

        HAVE_GDC = True
    except ImportError:
        HAVE_GDC = False
else:
    INTERPRETED = False
    HAVE_GDC = False


# ----------------------------------------------------------------------------------------------- checks
def need_triton(*tensors: Tensor) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("larosa.kernels needs Triton: pip install triton")
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}")
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        # Triton launches on the current device
        raise ValueError(f"tensors are on {device} but the current device is cuda:{torch.cuda.current_device()}")


def _flat_vector(x: Tensor, name: str) -> Tensor:
    """Decode activations arrive as [d_in] or [1, d_in]; the kernels want one contiguous vector."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [d_in] or [1, d_in] (batch 1), got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    if x.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")
    return x


def _check_weight(wt: Tensor) -> None:
    if not isinstance(wt, Tensor) or wt.dim() != 2:
        raise ValueError("wt must be a 2-D input-major weight [d_in, d_out] (W.T of an nn.Linear, contiguous)")
    if wt.dtype not in DTYPES:
        raise TypeError(f"wt must be bfloat16, float16 or float32, got {wt.dtype}")
    if wt.stride(1) != 1 or wt.stride(0) < wt.shape[1]:
        raise ValueError(
            "wt must be input-major with contiguous rows (stride(1) == 1), e.g. W.T.contiguous() or "
            f"pack_input_major([W]); got strides {tuple(wt.stride())}"
        )


def _check_k(k: int, d_in: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= d_in:
        raise ValueError(f"k must be in 1..d_in={d_in}, got {k}")
    return k


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter runs programs one after another: few splits keep CPU tests fast
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------------------------- API
@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Whether ``topk_gemv(..., pdl=True)`` runs on ``device``: a Hopper or newer GPU, a Triton with gdc_wait."""
    return (HAVE_GDC and not INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _workspace(device: torch.device) -> Tensor:
    """The threshold kernel's histogram and ticket (int32, zero between calls), one per device. Made on the
    first call, which must come before any CUDA graph capture (as Triton's compilation must too)."""
    key = (device.type, device.index)
    ws = _WORKSPACES.get(key)
    if ws is None:
        _no_capture("the selection workspace")
        ws = _WORKSPACES[key] = torch.zeros(WS_INTS, dtype=torch.int32, device=device)
    return ws


def _gemv_workspace(device: torch.device, d_out: int, n_blocks: int) -> tuple[Tensor, Tensor]:
    """fp32 accumulator [>= d_out] and per-column-block tickets for the fused GEMV, zero between calls (the
    last program of each column block re-zeroes its part). Grows outside graph capture only."""
    key = (device.type, device.index)
    acc, cnt = _GEMV_WORKSPACES.get(key, (None, None))
    if acc is None or acc.numel() < d_out or cnt.numel() < n_blocks:
        _no_capture("the GEMV workspace")
        size = max(d_out, 0 if acc is None else acc.numel())
        acc = torch.zeros(size, dtype=torch.float32, device=device)
        cnt = torch.zeros(max(n_blocks, size // 16), dtype=torch.int32, device=device)
        _GEMV_WORKSPACES[key] = (acc, cnt)
    return acc, cnt


def _no_capture(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what} is allocated on the first call: call select_topk / topk_gemv once (for the largest d_out) "
            "before capturing a CUDA graph"
        )


WS_INTS = 32768 + 128 + 4
_WORKSPACES: dict = {}
_GEMV_WORKSPACES: dict = {}
SLICE = 1024  # values a threshold program counts, and a compaction program writes


def _threshold(x: Tensor, k: int, pdl: bool = False) -> Tensor:
    """int32 [4] on x's device: (t, need, eq) for the 16-bit vector x (see _threshold_kernel). Its consumer (the
    fused GEMV or the compaction) leaves the workspace clean."""
    ws = _workspace(x.device)
    state = torch.empty(4, dtype=torch.int32, device=x.device)
    _threshold_kernel[(_cdiv(x.shape[0], SLICE),)](
        x, ws, state, x.shape[0], k, SLICE=SLICE, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {})
    )
    return state


def topk_threshold(x: Tensor, k: int) -> Tensor:
    """The fused path's first launch alone, for timing it: int32 [4] (t, need, eq) with t the k-th largest
    magnitude pattern of the 16-bit vector x. It leaves the histogram to its usual consumer, the GEMV: call
    :func:`reset_workspaces` after using it alone."""
    x = _flat_vector(x, "x")
    k = _check_k(k, x.shape[0])
    need_triton(x)
    return _threshold(x, k)


def reset_workspaces(device: torch.device) -> None:
    """Zero the kernels' workspaces on ``device`` (after :func:`topk_threshold` was used alone)."""
    _workspace(device).zero_()
    for t in _GEMV_WORKSPACES.get((device.type, device.index), ()):
        t.zero_()


def workspaces_clean(device: torch.device) -> bool:
    """Whether the kernels left their workspaces zero, as every call must (a check for tests and benchmarks)."""
    tensors = [_WORKSPACES.get((device.type, device.index)), *_GEMV_WORKSPACES.get((device.type, device.index), ())]
    return all(t is None or not bool(t.abs().sum()) for t in tensors)


def select_topk(
    x: Tensor, k: int, *, num_warps: int | None = None, radix: int | None = None, method: str | None = None
) -> tuple[Tensor, Tensor]:
    """Exactly k positions of largest |x|, ascending (ties broken by index), as (int32 idx[k], vals[k] in
    x.dtype). Replaces torch.topk, which costs tens of microseconds per vector on a GPU.

    ``method``: "hist" (bf16/fp16 default above d_in 8192: several programs count into a global histogram,
    then a compaction launch) or "single" (v1: one program searches the bits and compacts; the default up to
    8192, where it measured faster, and the only one for fp32).
    ``num_warps`` and ``radix`` (1 or 2 bits a search step) tune "single" and imply it."""
    x = _flat_vector(x, "x")
    d_in = x.shape[0]
    k = _check_k(k, d_in)
    if d_in > MAX_D_IN:
        raise ValueError(f"select_topk handles d_in <= {MAX_D_IN}, got {d_in}")
    if radix is not None and radix not in (1, 2):
        raise ValueError(f"radix must be 1 or 2, got {radix}")
    if method is None:  # measured (v2, H200): hist 7.4 vs single 7.0 us at 4096, 11.0 vs 16.0 at 11008
        explicit = num_warps is not None or radix is not None
        method = "single" if (x.dtype == torch.float32 or explicit or d_in <= 8192) else "hist"
    if method not in ("hist", "single") or (method == "hist" and x.dtype == torch.float32):
        raise ValueError(f"method must be 'hist' (16-bit x) or 'single', got {method!r} for {x.dtype}")
    need_triton(x)
    idx = torch.empty(k, dtype=torch.int32, device=x.device)
    vals = torch.empty(k, dtype=x.dtype, device=x.device)
    if method == "hist":
        state = _threshold(x, k)
        _compact_kernel[(_cdiv(d_in, SLICE),)](x, idx, vals, _workspace(x.device), state, d_in, SLICE=SLICE,
                                               num_warps=4)
        return idx, vals
    block = max(16, next_pow2(d_in))
    if num_warps is None:  # measured (v1 sweep, H200): 8 warps beat 16-32 at every width
        num_warps = 8 if block <= 16384 else 16
    chunk = min(block, 4096, 512 * num_warps)  # compaction step: more spills registers (sm_90, triton 3.6)
    if radix is None:  # measured: one bit a step won at every width
        radix = 1
    nbits = 31 if x.dtype == torch.float32 else 15
    _select_kernel[(1,)](
        x, idx, vals, d_in, k, BLOCK=block, CHUNK=chunk, NBITS=nbits, RADIX=radix, num_warps=num_warps
    )
    return idx, vals


def gemv_config(k: int, d_out: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Launch shape for sparse_gemv. The v1 sweep on the H200 found [8 rows x 1024 columns] tiles of 4 warps
    (a thread reads 8 rows of 16 bytes, no cross-warp reduction) with about 4 programs per SM best (2 when
    there are only 4 column blocks) on every Llama shape."""
    block_n = min(1024 if dtype != torch.float32 else 512, max(16, next_pow2(d_out)))
    block_k = 8
    n_blocks = _cdiv(d_out, block_n)
    per_sm = 2 if n_blocks <= 4 else 4
    split_k = max(1, min(_cdiv(per_sm * _num_sms(device), n_blocks), _cdiv(k, block_k)))
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4)


def fused_config(d_in: int, d_out: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Launch shape for topk_gemv's fused GEMV: column blocks of 1024 and position slices (block_k
    positions a step, of which a fraction 1 - s is loaded) for about 4 programs per SM. Measured (v2 sweep,
    H200, s = 0.4 / 0.5, every Llama shape): block_k 16 with 4 programs per SM was best or within 0.1 us."""
    block_n = min(1024 if dtype != torch.float32 else 512, max(16, next_pow2(d_out)))
    block_k = 16
    n_blocks = _cdiv(d_out, block_n)
    per_sm = 4
    split_k = max(1, min(_cdiv(per_sm * _num_sms(device), n_blocks), _cdiv(d_in, block_k)))
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4)


def sparse_gemv(
    idx: Tensor,
    vals: Tensor,
    wt: Tensor,
    out: Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """y[n] = sum_j vals[j] * wt[idx[j], n], reading only the rows of wt that idx names (fp32 accumulation).

    ``out`` (any of bf16/fp16/fp32, [d_out]) defaults to a new tensor of wt.dtype. Indices are trusted to be
    in range and distinct, as select_topk makes them. The keyword arguments override the launch heuristic
    (gemv_config) for tuning; block sizes must be powers of two.
    """
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype != torch.int32 or idx.stride(0) != 1:
        raise ValueError("idx must be a contiguous 1-D int32 tensor")
    vals = _flat_vector(vals, "vals")
    _check_weight(wt)
    k = idx.shape[0]
    if vals.shape[0] != k:
        raise ValueError(f"idx and vals must have the same length, got {k} and {vals.shape[0]}")
    if k < 1 or k > wt.shape[0]:
        raise ValueError(f"need 1 <= len(idx) <= d_in={wt.shape[0]}, got {k}")
    d_out = wt.shape[1]
    if out is None:
        out = torch.empty(d_out, dtype=wt.dtype, device=wt.device)
    elif out.shape != (d_out,) or out.dtype not in DTYPES or out.stride(0) != 1:
        raise ValueError(f"out must be a contiguous [{d_out}] tensor of bf16/fp16/fp32")
    need_triton(idx, vals, wt, out)

    cfg = gemv_config(k, d_out, wt.dtype, wt.device)
    for name, value in (("block_n", block_n), ("block_k", block_k), ("split_k", split_k), ("num_warps", num_warps)):
        if value is not None:
            cfg[name] = int(value)
    bn, bk = cfg["block_n"], cfg["block_k"]
    if bn < 16 or bk < 1 or bn & (bn - 1) or bk & (bk - 1):
        raise ValueError(f"block_n (>= 16) and block_k must be powers of two, got {bn} and {bk}")
    # Each split takes a whole number of BLOCK_K steps; recount splits so none is empty.
    chunk = _cdiv(_cdiv(k, min(max(1, cfg["split_k"]), 4096)), bk) * bk
    split = _cdiv(k, chunk)
    n_blocks = _cdiv(d_out, bn)
    dst = out if split == 1 else torch.empty((split, d_out), dtype=torch.float32, device=wt.device)
    _gather_gemv_kernel[(n_blocks, split)](
        idx, vals, wt, dst, k, d_out, wt.stride(0), chunk, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"]
    )
    if split > 1:
        sb = min(32, next_pow2(split))
        block = max(16, min(256, 4096 // sb, next_pow2(d_out)))
        _sum_splits_kernel[(_cdiv(d_out, block),)](dst, out, d_out, split, SPLIT_BLOCK=sb, BLOCK_N=block)
    return out


def topk_gemv(
    x: Tensor, wt: Tensor, k: int, out: Tensor | None = None, *, fused: bool | None = None, pdl: bool = False,
    **gemv_kwargs: int,
) -> Tensor:
    """topk(x, k) @ wt for one decode token. Output shape follows x's ([d_out] or [1, d_out]).

    For a 16-bit x (``fused``, the default) this is two launches: the threshold search, then a GEMV whose
    programs test |x| against the threshold themselves (no index list, no summing launch). Otherwise
    select_topk then sparse_gemv. ``gemv_kwargs`` (block_n, block_k, split_k, num_warps) tune either GEMV;
    ``pdl`` makes both launches programmatic dependent launches (Hopper, Triton with gdc_wait): each is
    launched while the kernel before it runs and waits for its results inside."""
    _check_weight(wt)
    xf = _flat_vector(x, "x")
    d_in = xf.shape[0]
    if d_in != wt.shape[0]:
        raise ValueError(f"x has {d_in} entries but wt has d_in={wt.shape[0]} rows")
    k = _check_k(k, d_in)
    if fused is None:  # measured (v2, H200): masked position slices lose to the index list at s = 0.7 on
        # wide outputs (gate+up 28672: 37.1 vs 28.6 us), since most of each step's row loads are masked off
        fused = xf.dtype != torch.float32 and (2 * k >= d_in or wt.shape[1] <= 8192)
    if not fused or xf.dtype == torch.float32:
        idx, vals = select_topk(xf, k)
        y = sparse_gemv(idx, vals, wt, out, **gemv_kwargs)
        return y.unsqueeze(0) if x.dim() == 2 else y
    if pdl and not pdl_supported(wt.device):
        raise RuntimeError("pdl needs a Hopper or newer GPU and a Triton with tl.extra.cuda.gdc_wait")
    out = _fused_out(xf, wt, out)
    launch = _fused_gemv(xf, wt, out, pdl=pdl, clear=True, **gemv_kwargs)  # checked before anything launches
    launch(_threshold(xf, k, pdl=pdl))
    return out.unsqueeze(0) if x.dim() == 2 else out


def threshold_state(threshold: float, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The state :func:`threshold_gemv` reads for a fixed threshold: keep the entries with |x| >= threshold
    (rounded to x's 16-bit ``dtype``). Made once, before any CUDA-graph capture, like the weights."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"a threshold GEMV takes a bf16 or fp16 x, not {dtype}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    bits = int(torch.tensor([threshold]).to(dtype).view(torch.int16).item()) & 0x7FFF
    # (t, need, eq) as the threshold search writes it: keep everything above t and every value equal to it.
    return torch.tensor([bits, 2**31 - 1, 0, 0], dtype=torch.int32, device=device)


def column_thresholds(segments: Sequence[tuple[float, int]], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The state :func:`threshold_gemv` reads with ``per_column=True``: from (threshold, width) for each weight
    packed side by side (q | k | v, gate | up), a threshold per output column, so that each column keeps the
    entries with |x| >= its weight's threshold (rounded to x's 16-bit ``dtype``)."""
    if not segments or any(int(width) < 1 for _, width in segments):
        raise ValueError(f"column_thresholds needs (threshold, width >= 1) segments, got {list(segments)}")
    return torch.cat([threshold_state(threshold, dtype, "cpu")[0].expand(int(width))
                      for threshold, width in segments]).to(device)


def threshold_gemv(x: Tensor, wt: Tensor, state: Tensor, out: Tensor | None = None, *, per_column: bool = False,
                   **gemv_kwargs: int) -> Tensor:
    """(x with every |x| < threshold zeroed) @ wt for one decode token, in one launch: the fused GEMV with a
    calibrated threshold (``state`` from :func:`threshold_state`) instead of a search for the k-th largest; with
    ``per_column``, a threshold per output column (``state`` from :func:`column_thresholds`). Not a programmatic
    dependent launch: so launched, Llama-2-7B decoded 2 % slower at 25 / 40 / 50 % (H200, 2026-11-30), its programs
    waiting on SMs the kernel before still used."""
    _check_weight(wt)
    xf = _flat_vector(x, "x")
    if xf.shape[0] != wt.shape[0]:
        raise ValueError(f"x has {xf.shape[0]} entries but wt has d_in={wt.shape[0]} rows")
    if xf.dtype == torch.float32:
        raise TypeError("a threshold GEMV takes a bf16 or fp16 x")
    want = (wt.shape[1],) if per_column else (4,)
    if state.shape != want or state.dtype != torch.int32:
        maker = "column_thresholds" if per_column else "threshold_state"
        raise ValueError(f"state must be the int32 {list(want)} tensor {maker} makes")
    out = _fused_out(xf, wt, out)
    _fused_gemv(xf, wt, out, pdl=False, clear=False, columns=per_column, **gemv_kwargs)(state)
    return out.unsqueeze(0) if x.dim() == 2 else out


def _fused_out(xf: Tensor, wt: Tensor, out: Tensor | None) -> Tensor:
    d_out = wt.shape[1]
    if out is None:
        return torch.empty(d_out, dtype=wt.dtype, device=wt.device)
    if out.shape != (d_out,) or out.dtype not in DTYPES or out.stride(0) != 1:
        raise ValueError(f"out must be a contiguous [{d_out}] tensor of bf16/fp16/fp32")
    return out


def _fused_gemv(xf: Tensor, wt: Tensor, out: Tensor, *, pdl: bool, clear: bool, columns: bool = False,
                **gemv_kwargs: int):
    """The fused GEMV's launch, its arguments checked now: a function of the state that keeps the positions it
    selects and reads only their rows of ``wt``."""
    need_triton(xf, wt, out)
    d_in, d_out = wt.shape
    cfg = fused_config(d_in, d_out, wt.dtype, wt.device)
    for name, value in gemv_kwargs.items():
        if name not in cfg:
            raise TypeError(f"unknown GEMV option {name!r}")
        cfg[name] = int(value)
    bn, bk = cfg["block_n"], cfg["block_k"]
    if bn < 16 or bk < 1 or bn & (bn - 1) or bk & (bk - 1):
        raise ValueError(f"block_n (>= 16) and block_k must be powers of two, got {bn} and {bk}")
    chunk = _cdiv(_cdiv(d_in, max(1, cfg["split_k"])), bk) * bk  # positions a program takes
    split = _cdiv(d_in, chunk)
    n_blocks = _cdiv(d_out, bn)
    acc, cnt = _gemv_workspace(wt.device, d_out, n_blocks)
    extra = {"launch_pdl": True} if pdl else {}

    def launch(state: Tensor) -> None:
        need_triton(xf, state)
        _topk_gemv_kernel[(n_blocks, split)](
            xf, wt, out, acc, cnt, _workspace(xf.device), state, d_in, d_out, wt.stride(0), chunk, BLOCK_N=bn,
            BLOCK_K=bk, ONE_SPLIT=split == 1, PDL=pdl, CLEAR=clear, COLUMNS=columns, num_warps=cfg["num_warps"],
            **extra,
        )

    return launch


# ----------------------------------------------------------------------------------------------- torch helpers
def pack_input_major(weights: Sequence[Tensor | nn.Linear]) -> Tensor:
    """[d_in, sum d_out] from nn.Linear weights ([d_out, d_in] each) that read the same input, so that q/k/v
    or gate/up share one selection and one GEMV. Biases are not included: add them after split_output."""
    ws = [w.weight if isinstance(w, nn.Linear) else w for w in weights]
    if not ws:
        raise ValueError("pack_input_major needs at least one weight")
    d_in = ws[0].shape[1]
    for w in ws:
        if w.dim() != 2 or w.shape[1] != d_in:
            raise ValueError(f"weights must be [d_out, d_in] with one d_in={d_in}, got {tuple(w.shape)}")
    return torch.cat([w.detach().t() for w in ws], dim=1).contiguous()


def split_output(y: Tensor, sizes: Sequence[int | Tensor | nn.Linear]) -> tuple[Tensor, ...]:
    """Undo pack_input_major on the output: sizes are the d_out of each packed weight (or the weights)."""
    n = [s if isinstance(s, int) else (s.weight if isinstance(s, nn.Linear) else s).shape[0] for s in sizes]
    if sum(n) != y.shape[-1]:
        raise ValueError(f"sizes add up to {sum(n)} but the output has {y.shape[-1]} columns")
    return tuple(torch.split(y, n, dim=-1))


def sparse_gemv_reference(idx: Tensor, vals: Tensor, wt: Tensor) -> Tensor:
    """sparse_gemv in float32 torch, as the yardstick for tests (returns float32)."""
    return vals.reshape(-1).float() @ wt[idx.long()].float()


def topk_gemv_reference(x: Tensor, wt: Tensor, k: int) -> Tensor:
    """topk(x, k) @ wt in float32 torch (returns float32, shape [d_out]). Where several entries tie at the
    k-th magnitude, torch.topk may keep others than select_topk: compare on tie-free inputs."""
    xf = x.reshape(-1)
    idx = torch.topk(xf.float().abs(), k, sorted=False).indices
    return xf[idx].float() @ wt[idx].float()
