"""``larosa bench kernels``: Top-K selection + sparse GEMV against dense cuBLAS at batch 1 (bf16), L2-cold.

Every shape is checked against a float32 torch reference before it is timed (the run stops on a mismatch).
Timing: CUDA graphs of back-to-back calls that rotate through enough distinct weight copies (>= l2_bytes in
all) that each call finds its weight out of L2; the median per-call time over several graph replays.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import kernels as kern
from .decode import copy_bandwidth

# (model, weight, d_in, d_out): q/k/v and gate/up are the packed input-major weights
SHAPES = [
    ("llama2-7b", "o", 4096, 4096),
    ("llama2-7b", "qkv", 4096, 12288),
    ("llama2-7b", "gate+up", 4096, 22016),
    ("llama2-7b", "down", 11008, 4096),
    ("llama3-8b", "qkv", 4096, 6144),
    ("llama3-8b", "gate+up", 4096, 28672),
    ("llama3-8b", "down", 14336, 4096),
]
SPARSITIES = (0.25, 0.4, 0.5, 0.7)
# the sweep (tune=True), at s = 0.4, 0.5: the fused GEMV's (block_n, block_k, programs per SM), 4 warps
FUSED_SWEEP = ((1024, 8, 4), (1024, 16, 2), (1024, 16, 4), (512, 8, 4), (512, 8, 7), (512, 16, 4), (512, 16, 8),
               (512, 32, 2), (256, 32, 3))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Timer:
    """Median microseconds per call of fns[i % len(fns)](), back to back inside one CUDA graph (graph=False:
    a launch loop, for what cannot be captured)."""

    def __init__(self, min_calls: int = 64, replays: int = 15):
        self.min_calls, self.replays = min_calls, replays

    def __call__(self, fns: Sequence[Callable[[], object]], graph: bool = True) -> float:
        calls = len(fns) * math.ceil(self.min_calls / len(fns))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        run = lambda: [fns[i % len(fns)]() for i in range(calls)]
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            run = g.replay
        run()
        times = []
        for _ in range(self.replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(times)


def launch_floor(timer: Timer) -> float:
    """us per back-to-back launch of a one-program kernel: what any extra launch costs in these graphs."""
    import triton
    import triton.language as tl

    @triton.jit
    def _one_store(p):
        tl.store(p, 1)

    buf = torch.empty(1, dtype=torch.int32, device="cuda")
    return timer([lambda: _one_store[(1,)](buf)])


# ------------------------------------------------------------------------------------------------- checks
def _fail(msg: str) -> None:
    raise RuntimeError(f"bench kernels: check failed: {msg}")


def check_selection(x: torch.Tensor, k: int, **cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly k, ascending, the same magnitudes as torch.topk, ties to the lowest index."""
    idx, vals = kern.select_topk(x, k, **cfg)
    i = idx.long()
    best = torch.topk(x.float().abs(), k).values
    tied = (x.float().abs() == best.min()).nonzero().flatten()
    kept = i[vals.float().abs() == best.min()]
    if not (idx.shape == (k,) and bool((i[1:] > i[:-1]).all()) and torch.equal(vals, x[i])
            and torch.equal(vals.float().abs().sort().values, best.sort().values)
            and torch.equal(kept, tied[: kept.numel()])):
        _fail(f"select_topk(d_in={x.numel()}, k={k}, {cfg}) is not the top-k selection")
    return idx, vals


def check_fused(x: torch.Tensor, wt: torch.Tensor, k: int, **cfg) -> float:
    """topk_gemv (poisoned output) against the float32 product over the v1 select's set; the workspaces must
    be zero again."""
    out = torch.full((wt.shape[1],), float("nan"), dtype=wt.dtype, device=wt.device)
    kern.topk_gemv(x, wt, k, out=out, **cfg)
    ref = kern.sparse_gemv_reference(*kern.select_topk(x, k, method="single"), wt)
    err = float((out.float() - ref).norm() / ref.norm())
    if not (bool(torch.isfinite(out).all()) and err < 1e-2 and kern.workspaces_clean(wt.device)):
        _fail(f"topk_gemv {tuple(wt.shape)} k={k} {cfg}: relative error {err:.3g} (or unwritten outputs, or "
              "workspaces not zero)")
    return err


# ------------------------------------------------------------------------------------------------- run
def bench_kernels(sparsities: Sequence[float] = SPARSITIES, only: Sequence[str] = (), tune: bool = False,
                  l2_bytes: float = 1e9, max_gb: float = 20.0) -> dict:
    """Time every shape (``only``: keep those whose 'model/weight' contains one of these) at each sparsity."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench kernels needs a CUDA device")
    import triton

    shapes = [s for s in SHAPES if not only or any(o in f"{s[0]}/{s[1]}" for o in only)]
    timer = Timer()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    t_start = time.time()
    meta = dict(device=torch.cuda.get_device_name(0), sms=n_sm, torch=torch.__version__, triton=triton.__version__,
                dtype="bfloat16", timer="cuda-graph", copy_GBps=copy_bandwidth(2.0),
                launch_floor_us=launch_floor(timer))
    log(f"{meta['device']}: copy {meta['copy_GBps']:.0f} GB/s, one tiny launch {meta['launch_floor_us']:.2f} us")
    rows, tuning, per_input = [], [], {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    for model, weight, d_in, d_out in shapes:
        w_bytes = d_in * d_out * 2
        copies = max(1, min(max(2, math.ceil(l2_bytes / w_bytes)), int(max_gb * 1e9 // (2 * w_bytes))))
        log(f"{model} {weight} {d_in}x{d_out}: {copies} copies of each layout ({copies * w_bytes / 1e9:.2f} GB)")
        ws = [torch.randn(d_out, d_in, generator=gen, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]  # input-major copies for the sparse kernels
        xs = [torch.randn(d_in, generator=gen, device="cuda", dtype=dtype) for _ in range(copies)]
        if float((F.linear(xs[0], ws[0]).float() - ws[0].float() @ xs[0].float()).norm()
                 / (ws[0].float() @ xs[0].float()).norm()) > 1e-2:
            _fail("dense baseline disagrees with the reference")
        dense_us = timer([lambda w=w, x=x: F.linear(x[None], w) for w, x in zip(ws, xs)])
        for s in sparsities:
            k = max(1, round((1 - s) * d_in))
            check_selection(xs[0], k)
            check_selection(xs[1], k, method="single")
            check_fused(xs[-1], wts[-1], k)
            if (d_in, k) not in per_input:  # selection timings depend on (d_in, k) only
                sel = dict(
                    # the threshold launch alone leaves its fine histogram dirty: zeroed after timing
                    threshold_us=timer([lambda x=x, k=k: kern.topk_threshold(x, k) for x in xs]),
                    select_us=timer([lambda x=x, k=k: kern.select_topk(x, k) for x in xs]),
                    select_v1_us=timer([lambda x=x, k=k: kern.select_topk(x, k, method="single") for x in xs]),
                    torch_topk_us=timer([lambda x=x, k=k: torch.topk(x.abs(), k, sorted=False) for x in xs], False),
                )
                kern.reset_workspaces(xs[0].device)
                check_selection(xs[2 % copies], k)
                per_input[(d_in, k)] = sel
            sel = per_input[(d_in, k)]
            idx = [kern.select_topk(x, k) for x in xs]
            gemv_us = timer([lambda wt=wt, i=i: kern.sparse_gemv(*i, wt) for wt, i in zip(wts, idx)])
            sparse_us = timer([lambda wt=wt, x=x, k=k: kern.topk_gemv(x, wt, k) for wt, x in zip(wts, xs)])
            # the fused GEMV alone with a fixed threshold that keeps k (the threshold selection: one launch)
            states = [kern.threshold_state(float(x.float().abs().sort().values[d_in - k]), dtype, x.device)
                      for x in xs]
            fixed_us = timer([lambda wt=wt, x=x, st=st: kern.threshold_gemv(x, wt, st)
                              for wt, x, st in zip(wts, xs, states)])
            unfused_us = timer([lambda wt=wt, x=x, k=k: kern.topk_gemv(x, wt, k, fused=False)
                                for wt, x in zip(wts, xs)])
            pdl_us = None
            if kern.pdl_supported(xs[0].device):
                check_fused(xs[0], wts[0], k, fused=True, pdl=True)
                pdl_us = timer([lambda wt=wt, x=x, k=k: kern.topk_gemv(x, wt, k, fused=True, pdl=True)
                                for wt, x in zip(wts, xs)])
            for bn, bk, m in FUSED_SWEEP if tune and s in (0.4, 0.5) else ():
                cfg = dict(block_n=bn, block_k=bk, split_k=math.ceil(m * n_sm / math.ceil(d_out / bn)))
                check_fused(xs[0], wts[0], k, fused=True, **cfg)
                us = timer([lambda wt=wt, x=x, k=k, c=cfg: kern.topk_gemv(x, wt, k, fused=True, **c)
                            for wt, x in zip(wts, xs)])
                tuning.append(dict(kernel="fused", d_in=d_in, d_out=d_out, s=s, block_n=bn, block_k=bk, per_sm=m,
                                   us=us))
            check_fused(xs[1], wts[1], k)  # still right after the timed calls
            sparse_bytes = k * d_out * 2 + d_in * 2 + d_out * 2  # weight rows, x, output
            row = dict(model=model, weight=weight, d_in=d_in, d_out=d_out, s=s, k=k,
                       copies=copies, dense_us=dense_us, dense_GBps=(w_bytes + 2 * d_in + 2 * d_out) / dense_us / 1e3,
                       **sel, gemv_us=gemv_us, unfused_us=unfused_us, sparse_us=sparse_us,
                       sparse_GBps=sparse_bytes / sparse_us / 1e3, pdl_us=pdl_us,
                       sparse_floor_us=sparse_bytes / meta["copy_GBps"] / 1e3, speedup=dense_us / sparse_us,
                       ideal_speedup=d_in / k, frac_of_ideal=dense_us / sparse_us * k / d_in,
                       threshold_gemv_us=fixed_us, threshold_frac_of_ideal=dense_us / fixed_us * k / d_in,
                       fused_cfg=kern.fused_config(d_in, d_out, dtype, torch.device("cuda")))
            rows.append(row)
            log(f"  s={s:.2f} k={k}: dense {dense_us:.1f} | threshold {sel['threshold_us']:.1f} | gemv {gemv_us:.1f}"
                f" | fixed t {fixed_us:.1f}"
                f" | sparse {sparse_us:.1f} (unfused {unfused_us:.1f}) -> x{row['speedup']:.2f} of ideal "
                f"x{d_in / k:.2f} ({row['frac_of_ideal']:.2f})"
                + (f" | pdl {pdl_us:.1f}" if pdl_us else ""))
        del ws, wts, xs, idx
        torch.cuda.empty_cache()
    meta["seconds"] = time.time() - t_start
    return dict(meta=meta, rows=rows, tuning=tuning, host=platform.node())


def kernels_table(result: dict) -> str:
    """The markdown table of a bench_kernels result (and the sweep's winners, when it ran)."""
    m = result["meta"]
    f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)
    lines = [
        f"Top-K selection + sparse GEMV vs dense cuBLAS GEMV, batch 1, bf16, L2-cold, {m['device']} (torch "
        f"{m['torch']}, triton {m['triton']}; copy bandwidth {m['copy_GBps']:.0f} GB/s; one tiny launch "
        f"{m['launch_floor_us']:.2f} us). Times in us, median per call in CUDA graphs. select = the threshold "
        "launch alone (the histogram threshold); sparse = topk_gemv, the selection included (threshold + GEMV, "
        "or at s = 0.7 on wide outputs select + index GEMV); GB/s = sparse bytes (k weight rows + x + y) / "
        "sparse; x ideal = speed-up / (d_in / k), target >= 0.9 at s = 0.4, 0.5; gemv only = the index GEMV on "
        "a given selection; unfused = select (threshold + compaction) + index GEMV; pdl = sparse with the GEMV "
        "as a programmatic dependent launch; fixed t = the fused GEMV alone with a calibrated threshold that keeps "
        "k (threshold selection, one launch), and its x ideal.",
        "",
        "| model | weight | d_in x d_out | s | k | dense | select | sparse | speed-up | GB/s | x ideal "
        "| gemv only | unfused | select v1 | torch.topk | pdl | fixed t | x ideal, fixed t |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['weight']} | {r['d_in']}x{r['d_out']} | {r['s']:.2f} | {r['k']} | {f(r['dense_us'])} "
            f"| {f(r['threshold_us'])} | {f(r['sparse_us'])} | {f(r['speedup'], '{:.2f}')} "
            f"| {f(r['sparse_GBps'], '{:.0f}')} | {f(r['frac_of_ideal'], '{:.2f}')} | {f(r['gemv_us'])} "
            f"| {f(r['unfused_us'])} | {f(r['select_v1_us'])} | {f(r['torch_topk_us'])} "
            f"| {f(r.get('pdl_us'))} | {f(r.get('threshold_gemv_us'))} "
            f"| {f(r.get('threshold_frac_of_ideal'), '{:.2f}')} |")
    best: dict = {}
    for t in result.get("tuning", []):
        key = (t["d_in"], t["d_out"], t["s"])
        best[key] = min(best.get(key, t), t, key=lambda e: e["us"])
    if best:
        lines += ["", "Sweep winners (fused GEMV, selection included):", "", "| d_in x d_out | s | config | us |",
                  "|---|---:|---|---:|"]
        for (d_in, d_out, s), t in sorted(best.items()):
            cfg = f"block_n {t['block_n']}, block_k {t['block_k']}, {t['per_sm']} programs/SM"
            lines.append(f"| {d_in}x{d_out} | {s:.2f} | {cfg} | {t['us']:.1f} |")
    return "\n".join(lines)
