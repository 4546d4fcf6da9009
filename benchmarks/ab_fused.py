"""A/B of the fused GEMV's two layouts on the GPU (bf16, L2-cold CUDA graphs, larosa.bench.kernels' timer).

- slices: each program takes a contiguous slice of positions and masks off the rows that do not pass (the layout
  of 2026-11-28..30; block_k 16 positions a step);
- rows: each program takes interleaved positions, lists the ones it keeps, then reads only full kept rows.

Each is timed with a calibrated threshold (threshold_gemv: one launch) and with exact Top-K (topk_gemv: the
threshold search, then the GEMV), on two kinds of x: "random" (i.i.d., what bench kernels uses) and "ordered"
(scale decaying along the coordinates, as in a PCA basis, where the kept entries crowd the leading positions).
Every timed configuration is first checked against a float32 reference.

    python benchmarks/ab_fused.py OUT.json [SPARSITIES]
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.nn.functional as F

from larosa import kernels as kern
from larosa.bench.kernels import SHAPES, Timer, log

SWEEP = ((8, 4), (8, 6), (8, 8), (16, 4))  # the rows layout: (block_k, programs per SM)


def kinds(d_in: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    scale = torch.exp(-3.0 * torch.arange(d_in, device="cuda") / d_in)
    z = torch.randn(d_in, generator=gen, device="cuda")
    return {"random": z.bfloat16(), "ordered": (z * scale).bfloat16()}


def check(y: torch.Tensor, x: torch.Tensor, wt: torch.Tensor, keep: torch.Tensor, what: str) -> None:
    ref = torch.where(keep, x.float(), 0.0) @ wt.float()
    err = float((y.float() - ref).norm() / ref.norm())
    if not (err < 1e-2 and kern.workspaces_clean(wt.device)):
        raise RuntimeError(f"{what}: relative error {err:.3g} or workspaces not zero")


def main(out: str, sparsities: tuple[float, ...]) -> None:
    timer, n_sm = Timer(), torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model, weight, d_in, d_out in SHAPES:
        copies = max(2, math.ceil(1e9 / (d_in * d_out * 2)))
        ws = [torch.randn(d_out, d_in, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
              for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        xd = torch.randn(1, d_in, generator=gen, device="cuda").bfloat16()
        dense = timer([lambda w=w: F.linear(xd, w) for w in ws])
        blocks = math.ceil(d_out / 1024)
        for s in sparsities:
            k = max(1, round((1 - s) * d_in))
            for kind, x in kinds(d_in, gen).items():
                t = float(x.float().abs().sort().values[d_in - k])
                state = kern.threshold_state(t, torch.bfloat16, x.device)
                keep_t = x.float().abs() >= torch.tensor(t).bfloat16().float()
                idx, vals = kern.select_topk(x, k)
                keep_k = torch.zeros(d_in, dtype=torch.bool, device="cuda")
                keep_k[idx.long()] = True
                res = dict(model=model, weight=weight, d_in=d_in, d_out=d_out, s=s, k=k, x=kind, dense_us=dense,
                           index_gemv_us=timer([lambda wt=wt: kern.sparse_gemv(idx, vals, wt) for wt in wts]))
                configs = [("slices", dict(rows=0, block_k=16))] + [
                    (f"rows bk{bk} {m}/SM", dict(rows=1, block_k=bk, split_k=math.ceil(m * n_sm / blocks)))
                    for bk, m in SWEEP]
                for name, cfg in configs:
                    check(kern.threshold_gemv(x, wts[0], state, **cfg), x, wts[0], keep_t, f"{name} threshold")
                    check(kern.topk_gemv(x, wts[0], k, fused=True, **cfg), x, wts[0], keep_k, f"{name} top-k")
                    res[f"{name} threshold_us"] = timer([lambda wt=wt: kern.threshold_gemv(x, wt, state, **cfg)
                                                         for wt in wts])
                    res[f"{name} topk_us"] = timer([lambda wt=wt: kern.topk_gemv(x, wt, k, fused=True, **cfg)
                                                    for wt in wts])
                rows.append(res)
                best = min((v, n) for n, v in res.items() if n.startswith("rows") and n.endswith("threshold_us"))
                log(f"{model} {weight} s={s} {kind}: dense {dense:.1f} ideal {dense * k / d_in:.1f} index "
                    f"{res['index_gemv_us']:.1f} | slices thr {res['slices threshold_us']:.1f} topk "
                    f"{res['slices topk_us']:.1f} | rows bk8 4/SM thr {res['rows bk8 4/SM threshold_us']:.1f} topk "
                    f"{res['rows bk8 4/SM topk_us']:.1f} | best rows thr {best[0]:.1f} ({best[1]})")
        del ws, wts
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], tuple(float(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0.4,0.5").split(",")))
