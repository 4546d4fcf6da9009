"""Sweep the fused Top-K GEMV's warps per program with its tiles (the issue-4 sweep held 4 warps; at 1024 x 16
the kernel takes 248 registers a thread, so only 2 programs fit an SM). L2-cold, CUDA-graph timing as
`larosa bench kernels`. Usage: python benchmarks/sweep_fused_warps.py OUT_DIR"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from larosa.bench.kernels import SHAPES, Timer
from larosa.io import write_json
from larosa.kernels import topk_gemv, topk_gemv_reference

# (block_n, block_k, programs per SM, warps); the first is fused_config's default
CONFIGS = [(1024, 16, 4, 4), (1024, 16, 4, 8), (1024, 16, 2, 8), (1024, 32, 4, 8), (1024, 32, 2, 8),
           (2048, 16, 2, 8), (2048, 16, 4, 8), (2048, 32, 2, 16), (1024, 16, 8, 8), (512, 16, 4, 2)]


def main(out: str) -> None:
    timer, n_sm = Timer(), torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model, weight, d_in, d_out in SHAPES:
        copies = max(2, math.ceil(1e9 / (2 * d_in * d_out)))
        wts = [torch.randn(d_in, d_out, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
               for _ in range(copies)]
        xs = [torch.randn(d_in, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for s in (0.4, 0.5):
            k = round((1 - s) * d_in)
            ref = topk_gemv_reference(xs[0], wts[0], k).float()
            for bn, bk, per_sm, warps in CONFIGS:
                cfg = dict(block_n=bn, block_k=bk, split_k=math.ceil(per_sm * n_sm / math.ceil(d_out / bn)),
                           num_warps=warps)
                y = topk_gemv(xs[0], wts[0], k, fused=True, **cfg).float()
                err = float((y - ref).norm() / ref.norm())
                us = timer([lambda wt=wt, x=x: topk_gemv(x, wt, k, fused=True, **cfg) for wt, x in zip(wts, xs)])
                rows.append(dict(shape=f"{model} {weight}", d_in=d_in, d_out=d_out, s=s, block_n=bn, block_k=bk,
                                 per_sm=per_sm, warps=warps, us=us, rel_err=err))
                print(f"{model} {weight} s={s} {bn}x{bk} {per_sm}/SM {warps}w: {us:.1f} us (err {err:.1e})",
                      flush=True)
        del wts, xs
        torch.cuda.empty_cache()
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "sweep-fused-warps.json", rows)


if __name__ == "__main__":
    main(sys.argv[1])
