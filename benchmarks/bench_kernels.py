"""Time Top-K selection + gather-GEMV against dense cuBLAS GEMV at batch 1 (bf16), L2-cold.

    python benchmarks/bench_kernels.py --out "$OUT"            # GPU: Llama-2-7B / Llama-3-8B shapes, ~3-5 min
    python benchmarks/bench_kernels.py --smoke --out /tmp/b    # CPU (Triton interpreter) or GPU: tiny shapes

Every shape is checked against a float32 torch reference before it is timed (the run stops on a mismatch).
Timing: CUDA graphs of back-to-back calls that rotate through enough distinct weight copies (>= --l2-bytes in
all) that each call finds its weight out of L2; the median per-call time over several graph replays. Writes
results.json and results.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# (model, weight, d_in, d_out): fused weights are the packed input-major ones (q+k+v, gate+up)
SHAPES = [
    ("llama2-7b", "q (or o)", 4096, 4096),
    ("llama2-7b", "qkv", 4096, 12288),
    ("llama2-7b", "gate+up", 4096, 22016),
    ("llama2-7b", "down", 11008, 4096),
    ("llama3-8b", "qkv", 4096, 6144),
    ("llama3-8b", "gate+up", 4096, 28672),
    ("llama3-8b", "down", 14336, 4096),
]
SMOKE_SHAPES = [("tiny", "a", 64, 96), ("tiny", "b", 200, 136), ("tiny", "down", 1000, 40)]
SPARSITIES = [0.25, 0.4, 0.5, 0.7]
# tuning grid: GEMV (block_n, block_k, num_warps) x programs per SM; selection (num_warps, radix)
# v2 sweep: the fused GEMV's (block_k positions a step, programs per SM); v1's GEMV / select sweeps are
# in results/kernels-v1.md and their winners are the defaults now.
FUSED_BK = [8, 16, 32]
FUSED_PER_SM = [2, 4, 8]


def launch_floor(timer) -> float | None:
    """us per back-to-back launch of a one-program kernel that stores one value: what any extra launch
    costs in these graphs."""
    import triton
    import triton.language as tl

    @triton.jit
    def _one_store(p):
        tl.store(p, 1)

    buf = torch.empty(1, dtype=torch.int32, device="cuda")
    return timer([lambda: _one_store[(1,)](buf)], "launch floor")


def load_kernels():
    """Load the kernel module by path: larosa's package import pulls transformers, which the bench needs not."""
    path = ROOT / "src" / "larosa" / "kernels" / "topk_gemv.py"
    spec = importlib.util.spec_from_file_location("larosa_kernels_topk_gemv", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    if not mod.HAVE_TRITON:
        sys.exit("triton is not installed")
    return mod


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- timing
class Timer:
    """Median microseconds per call of fns[i % len(fns)](), back to back."""

    def __init__(self, cuda: bool, min_calls: int, replays: int):
        self.cuda, self.min_calls, self.replays = cuda, min_calls, replays
        self.kind = "cuda-graph" if cuda else "cpu-wallclock"
        self.fallbacks: list[str] = []  # what was timed by a launch loop because its capture failed

    def __call__(self, fns, what: str, graph: bool = True) -> float:
        if not self.cuda:  # interpreter: only shows the script runs
            t0 = time.perf_counter()
            for f in fns[:2]:
                f()
            return (time.perf_counter() - t0) * 1e6 / len(fns[:2])
        calls = len(fns) * math.ceil(self.min_calls / len(fns))
        if graph:
            try:
                return self._graph(fns, calls)
            except Exception as e:  # noqa: BLE001 - a capture failure should not lose the run
                log(f"CUDA graph capture failed for {what} ({type(e).__name__}: {e}); timing a launch loop")
                self.fallbacks.append(what)
                torch.cuda.synchronize()
        return self._loop(fns, calls)

    def _graph(self, fns, calls: int) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        del graph
        return statistics.median(times)

    def _loop(self, fns, calls: int) -> float:
        for f in fns:
            f()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                fns[i % len(fns)]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Device-to-device copy GB/s, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------------------------- checks
def check_selection(kern, x: torch.Tensor, k: int, **cfg) -> tuple[torch.Tensor, torch.Tensor]:
    idx, vals = kern.select_topk(x, k, **cfg)
    i = idx.long()
    if not cfg:  # the same set as torch.topk on distinct magnitudes; the lowest index among ties
        ref = torch.topk(x.float().abs(), k).values.min()
        tied = (x.float().abs() == ref).nonzero().flatten()
        kept = i[vals.float().abs() == ref]
        if not torch.equal(kept, tied[: kept.numel()]):
            raise SystemExit(f"FAIL: select_topk(d_in={x.numel()}, k={k}) broke ties out of index order")
    ok = (
        idx.shape == (k,)
        and bool((i >= 0).all())
        and bool((i < x.numel()).all())
        and bool((i[1:] > i[:-1]).all())
        and torch.equal(vals, x[i])
        and torch.equal(vals.float().abs().sort().values, torch.topk(x.float().abs(), k).values.sort().values)
    )
    if not ok:
        raise SystemExit(f"FAIL: select_topk(d_in={x.numel()}, k={k}, {cfg}) is not a top-k selection")
    return idx, vals


def check_gemv(kern, idx, vals, wt, what: str, **cfg) -> float:
    out = torch.full((wt.shape[1],), float("nan"), dtype=wt.dtype, device=wt.device)
    kern.sparse_gemv(idx, vals, wt, out=out, **cfg)
    ref = kern.sparse_gemv_reference(idx, vals, wt)
    err = float((out.float() - ref).norm() / ref.norm())
    if not (bool(torch.isfinite(out).all()) and err < 1e-2):
        raise SystemExit(f"FAIL: {what} {cfg}: relative error {err:.3g} (or unwritten outputs)")
    return err


def check_fused(kern, x, wt, k, what: str, **cfg) -> float:
    """topk_gemv (poisoned output) against the float32 product over select_topk's exact set; then the
    workspaces must be zero again."""
    out = torch.full((wt.shape[1],), float("nan"), dtype=wt.dtype, device=wt.device)
    kern.topk_gemv(x, wt, k, out=out, **cfg)
    idx, vals = kern.select_topk(x, k, method="single")
    ref = kern.sparse_gemv_reference(idx, vals, wt)
    err = float((out.float() - ref).norm() / ref.norm())
    acc, cnt = kern._GEMV_WORKSPACES[(wt.device.type, wt.device.index)]
    clean = int(kern._workspace(wt.device).abs().sum()) == 0 and int(cnt.abs().sum()) == 0
    clean = clean and float(acc.abs().sum()) == 0
    if not (bool(torch.isfinite(out).all()) and err < 1e-2 and clean):
        raise SystemExit(f"FAIL: {what} {cfg}: relative error {err:.3g}, workspace clean {clean} (or unwritten)")
    return err


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few configs (runs on CPU too)")
    ap.add_argument("--no-tune", action="store_true", help="skip the launch-config sweep")
    ap.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    ap.add_argument("--only", nargs="+", help="keep shapes whose 'model/weight' contains one of these")
    ap.add_argument("--l2-bytes", type=float, default=1e9, help="weight bytes to rotate through (L2-cold)")
    ap.add_argument("--max-gb", type=float, default=20.0, help="cap on the weight copies' memory")
    ap.add_argument("--min-calls", type=int, default=64, help="calls per CUDA graph")
    ap.add_argument("--replays", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=400, help="stop tuning (not timing) after this long")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            sys.exit("no CUDA device: only --smoke runs here (under the Triton interpreter)")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
    kern = load_kernels()
    import triton  # after TRITON_INTERPRET is set

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.only:
        shapes = [s for s in shapes if any(o in f"{s[0]}/{s[1]}" for o in args.only)]
    fused_bk, fused_per_sm = FUSED_BK, FUSED_PER_SM
    if args.smoke:
        fused_bk, fused_per_sm = fused_bk[:2], fused_per_sm[:1]
    if args.no_tune:
        fused_bk, fused_per_sm = [], []
    timer = Timer(cuda, args.min_calls, args.replays)
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 2
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    meta = dict(
        device=torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or 'interpreter'})",
        sms=n_sm,
        l2_bytes=getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None) if cuda else None,
        torch=torch.__version__,
        triton=triton.__version__,
        dtype="bfloat16",
        timer=timer.kind,
        smoke=args.smoke,
    )
    meta["copy_GBps"] = copy_bandwidth(device, 2 << 30) if cuda else None
    if cuda:
        log(f"{meta['device']}: device copy {meta['copy_GBps']:.0f} GB/s (read + write)")

    meta["launch_floor_us"] = launch_floor(timer) if cuda else None
    if cuda:
        log(f"one tiny launch: {meta['launch_floor_us']:.2f} us")
    rows, tuning = [], []
    select_cache: dict[tuple[int, int], dict] = {}  # selection timings per (d_in, k)
    gen = torch.Generator(device=device).manual_seed(0)
    for model, weight, d_in, d_out in shapes:
        w_bytes = d_in * d_out * 2
        n_copies = max(2, math.ceil(args.l2_bytes / w_bytes))
        n_copies = max(1, min(n_copies, int(args.max_gb * 1e9 // (2 * w_bytes))))
        if args.smoke:
            n_copies = 2
        if fused_bk and time.time() - t_start > args.budget_s:
            log(f"over --budget-s {args.budget_s:.0f}: no more tuning")
            fused_bk, fused_per_sm = [], []
        log(f"{model} {weight} {d_in}x{d_out}: {n_copies} copies of each layout ({n_copies * w_bytes / 1e9:.2f} GB)")
        ws = [torch.randn(d_out, d_in, generator=gen, device=device, dtype=dtype) * 0.02 for _ in range(n_copies)]
        wts = [w.t().contiguous() for w in ws]  # input-major copies for the sparse kernels
        xs = [torch.randn(d_in, generator=gen, device=device, dtype=dtype) for _ in range(n_copies)]

        dense_ref = xs[0].float() @ ws[0].float().t()
        dense = torch.nn.functional.linear(xs[0][None], ws[0])[0]
        if float((dense.float() - dense_ref).norm() / dense_ref.norm()) > 1e-2:
            raise SystemExit("FAIL: dense baseline disagrees with the reference")
        dense_us = timer([lambda w=w, x=x: torch.nn.functional.linear(x[None], w) for w, x in zip(ws, xs)], "dense")

        for s in args.sparsities:
            k = max(1, round((1 - s) * d_in))
            # correctness first: both selections, the GEMV, the fused path (poisoned outputs, fresh inputs)
            idx, vals = check_selection(kern, xs[0], k)
            check_selection(kern, xs[1], k, method="single")
            err = check_gemv(kern, idx, vals, wts[0], f"sparse_gemv {d_in}x{d_out} k={k}")
            fused_err = check_fused(kern, xs[-1], wts[-1], k, f"topk_gemv {d_in}x{d_out} k={k}")
            sel = [kern.select_topk(x, k) for x in xs]

            key = (d_in, k)
            if key not in select_cache:
                ws = kern._workspace(xs[0].device)
                entry = dict(
                    select_us=timer([lambda x=x, k=k: kern.select_topk(x, k) for x in xs], "select"),
                    select_v1_us=timer(
                        [lambda x=x, k=k: kern.select_topk(x, k, method="single") for x in xs], "select v1"
                    ),
                    # the threshold launch alone leaves its histogram dirty: zero it after timing
                    threshold_us=timer([lambda x=x, k=k: kern._threshold(x, k) for x in xs], "threshold"),
                    torch_topk_us=timer(
                        [lambda x=x, k=k: torch.topk(x.abs(), k, sorted=False) for x in xs], "topk", graph=False
                    ),
                )
                ws.zero_()
                check_selection(kern, xs[2 % len(xs)], k)
                select_cache[key] = entry
            sc = select_cache[key]

            gemv_us = timer([lambda wt=wt, i=i: kern.sparse_gemv(i[0], i[1], wt) for wt, i in zip(wts, sel)], "gemv")
            unfused_us = timer(
                [lambda wt=wt, x=x, k=k: kern.topk_gemv(x, wt, k, fused=False) for wt, x in zip(wts, xs)],
                "select+gemv",
            )
            fused_us = timer([lambda wt=wt, x=x, k=k: kern.topk_gemv(x, wt, k) for wt, x in zip(wts, xs)], "fused")
            pdl_us = None
            if cuda and kern.HAVE_GDC:
                try:
                    check_fused(kern, xs[0], wts[0], k, "topk_gemv pdl", pdl=True)
                    pdl_us = timer(
                        [lambda wt=wt, x=x, k=k: kern.topk_gemv(x, wt, k, pdl=True) for wt, x in zip(wts, xs)],
                        "fused pdl",
                    )
                except SystemExit:
                    raise
                except Exception as e:  # noqa: BLE001 - an optional variant
                    log(f"pdl variant failed: {type(e).__name__}: {e}")
                    torch.cuda.synchronize()
                    kern._workspace(xs[0].device).zero_()  # a launch that half ran may leave counts
            best_fused = (fused_us, None)
            for bk in fused_bk:
                for m in fused_per_sm:
                    split = kern._cdiv(m * n_sm, kern._cdiv(d_out, 1024))
                    cfg = dict(block_k=bk, split_k=split)
                    check_fused(kern, xs[0], wts[0], k, "topk_gemv (sweep)", **cfg)
                    fns = [lambda wt=wt, x=x, k=k, c=cfg: kern.topk_gemv(x, wt, k, **c) for wt, x in zip(wts, xs)]
                    us = timer(fns, f"fused {cfg}")
                    tuning.append(dict(kernel="fused", d_in=d_in, d_out=d_out, k=k, cfg=cfg, per_sm=m, us=us))
                    best_fused = min(best_fused, (us, dict(cfg, per_sm=m)), key=lambda b: b[0])
            check_fused(kern, xs[1], wts[1], k, "topk_gemv (after timing)")

            sparse_bytes = k * d_out * 2 + d_in * 2 + d_out * 2  # weight rows, x, output
            dense_bytes = w_bytes + d_in * 2 + d_out * 2
            bw = meta["copy_GBps"]
            row = dict(
                model=model, weight=weight, d_in=d_in, d_out=d_out, s=s, k=k, copies=n_copies, rel_err=err,
                fused_rel_err=fused_err,
                dense_us=dense_us, dense_GBps=dense_bytes / dense_us / 1e3,
                torch_topk_us=sc["torch_topk_us"], select_us=sc["select_us"], select_v1_us=sc["select_v1_us"],
                threshold_us=sc["threshold_us"],
                gemv_us=gemv_us, gemv_GBps=sparse_bytes / gemv_us / 1e3,
                unfused_us=unfused_us, fused_us=fused_us, fused_GBps=sparse_bytes / fused_us / 1e3,
                pdl_us=pdl_us,
                speedup=dense_us / fused_us, ideal_speedup=d_in / k,
                frac_of_ideal=dense_us / fused_us / (d_in / k),
                gemv_floor_us=sparse_bytes / bw / 1e3 if bw else None,
                dense_floor_us=dense_bytes / bw / 1e3 if bw else None,
                gemv_cfg=kern.gemv_config(k, d_out, dtype, torch.device(device)),
                fused_cfg=kern.fused_config(d_in, d_out, dtype, torch.device(device)),
                best_fused_us=best_fused[0], best_fused_cfg=best_fused[1],
                best_speedup=dense_us / min(x for x in (best_fused[0], pdl_us) if x is not None),
            )
            rows.append(row)
            log(
                f"  s={s:.2f} k={k}: dense {dense_us:.1f} | select {sc['select_us']:.1f} (v1 {sc['select_v1_us']:.1f},"
                f" threshold {sc['threshold_us']:.1f}) | gemv {gemv_us:.1f} | unfused {unfused_us:.1f} | fused "
                f"{fused_us:.1f} -> x{row['speedup']:.2f} of ideal x{d_in / k:.2f} ({row['frac_of_ideal']:.2f})"
                + (f" | pdl {pdl_us:.1f}" if pdl_us else "")
                + (f" | best {best_fused[0]:.1f} {best_fused[1]}" if best_fused[1] else "")
            )
        del ws, wts, xs, sel
        if cuda:
            torch.cuda.empty_cache()
        write(args.out, meta, rows, tuning, timer, t_start)  # after every shape: a cut run keeps its rows

    print(write(args.out, meta, rows, tuning, timer, t_start))
    log(f"done in {meta['seconds']:.0f} s: {args.out / 'results.json'}, {args.out / 'results.md'}")


def write(out: Path, meta: dict, rows: list[dict], tuning: list[dict], timer: Timer, t_start: float) -> str:
    meta["timer"] = timer.kind
    meta["graph_capture_failed"] = timer.fallbacks
    meta["seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows, tuning=tuning), indent=1))
    table = markdown(meta, rows)
    (out / "results.md").write_text(table)
    return table


def markdown(meta: dict, rows: list[dict]) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    def cfg(c):
        short = dict(block_n="bn", block_k="bk", split_k="sk", num_warps="w", per_sm="m")
        return "default" if not c else " ".join(f"{short.get(k, k)}{v}" for k, v in c.items())

    bw = f"{meta['copy_GBps']:.0f} GB/s" if meta["copy_GBps"] else "n/a"
    lines = [
        f"# Top-K select + gather-GEMV vs dense GEMV, batch 1, bf16, L2-cold ({meta['device']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, timer: {meta['timer']}, device copy bandwidth {bw}, "
        f"one tiny launch {f(meta.get('launch_floor_us'), '{:.2f}')} us. "
        "Times in us (median per call). select = v2 select_topk (threshold + compaction launches); v1 = the "
        "one-program select; threshold = its first launch alone; gemv = sparse_gemv on a given selection; "
        "unfused = select_topk + sparse_gemv; fused = topk_gemv (threshold + position-slice GEMV, 2 launches); "
        "pdl = fused with the GEMV as a programmatic dependent launch. GB/s counts weight rows read plus "
        "activations. speed-up = dense / fused; ideal = d_in / k; x ideal = speed-up / ideal (target >= 0.9).",
        "",
        "| model | weight | d_in x d_out | s | k | dense | torch.topk | select v1 | select | threshold | gemv "
        "| gemv GB/s | floor | unfused | fused | fused GB/s | speed-up | ideal | x ideal | pdl | best fused "
        "| best cfg | best x ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = min(x for x in (r["best_fused_us"], r["pdl_us"], r["fused_us"]) if x is not None)
        lines.append(
            f"| {r['model']} | {r['weight']} | {r['d_in']}x{r['d_out']} | {r['s']:.2f} | {r['k']} "
            f"| {f(r['dense_us'])} | {f(r['torch_topk_us'])} | {f(r['select_v1_us'])} | {f(r['select_us'])} "
            f"| {f(r['threshold_us'])} | {f(r['gemv_us'])} | {f(r['gemv_GBps'], '{:.0f}')} "
            f"| {f(r['gemv_floor_us'])} | {f(r['unfused_us'])} | {f(r['fused_us'])} "
            f"| {f(r['fused_GBps'], '{:.0f}')} | {f(r['speedup'], '{:.2f}')} | {f(r['ideal_speedup'], '{:.2f}')} "
            f"| {f(r['frac_of_ideal'], '{:.2f}')} | {f(r['pdl_us'])} | {f(r['best_fused_us'])} "
            f"| {cfg(r['best_fused_cfg'])} | {f(r['dense_us'] / best / r['ideal_speedup'], '{:.2f}')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
