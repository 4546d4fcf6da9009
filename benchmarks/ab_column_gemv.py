"""A/B on the GPU: the fused GEMV with one threshold against TEAL's threshold per output column (weights packed side
by side, some column blocks straddling two), and cuBLAS dense, each timed as 20 launches inside a CUDA graph.

    python benchmarks/ab_column_gemv.py        # one line per shape (us per launch)
"""

import torch

from larosa import kernels as K


def graph_us(f, n: int = 20, reps: int = 20) -> float:
    f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            f()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (n * reps) * 1000


torch.manual_seed(0)
# Llama-2-7B gate | up (11008 each: blocks straddle), q | k | v, Llama-3-8B q | k | v and gate | up, down
for d_in, widths in ((4096, (11008, 11008)), (4096, (4096, 4096, 4096)), (4096, (4096, 1024, 1024)),
                     (4096, (14336, 14336)), (11008, (4096,))):
    d_out = sum(widths)
    wt = torch.randn(d_in, d_out, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(d_in, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(d_out, device="cuda", dtype=torch.bfloat16)
    row = [f"{d_in}x{widths} dense {graph_us(lambda: torch.mv(wt.T, x)):.1f}"]
    for t in (0.45, 0.67):  # about 35 % and 50 % of N(0, 1) entries dropped
        single = K.threshold_state(t, torch.bfloat16, "cuda")
        equal = K.column_thresholds([(t, w) for w in widths], torch.bfloat16, "cuda")
        differ = K.column_thresholds([(t * (0.8 + 0.2 * i), w) for i, w in enumerate(widths)], torch.bfloat16, "cuda")
        row.append(f"t {t}: one {graph_us(lambda: K.threshold_gemv(x, wt, single, out)):.1f} "
                   f"per-column equal {graph_us(lambda: K.threshold_gemv(x, wt, equal, out, per_column=True)):.1f} "
                   f"differing {graph_us(lambda: K.threshold_gemv(x, wt, differ, out, per_column=True)):.1f}")
    print(" | ".join(row), flush=True)
