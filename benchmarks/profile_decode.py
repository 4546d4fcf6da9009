"""Where a decode token's time goes: the kernels of one CUDA-graph decode step, by name, and the idle gaps
between them (GPU only: graph replays back to back, so the Python loop of `generate` is not in it).

    python benchmarks/profile_decode.py --config llama2-7b --sparsity 0,0.5 --select threshold --out DIR

Writes DIR/profile-CONFIG.json and .md. Random weights with real shapes, as `larosa bench decode`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from larosa import SparsityConfig
from larosa.api import select_by_thresholds
from larosa.bench.decode import random_model
from larosa.io import write_report
from larosa.runtime import Engine, Transformer
from larosa.sparsity import DEFAULT_SCOPE

# Kernel families, by substrings of their names (first match wins); inductor's kernels start with "triton_".
FAMILIES = [("fused elementwise (inductor)", ("triton_",)), ("Top-K select", ("_select", "_threshold", "_compact")),
            ("sparse GEMV", ("_gather_gemv", "_topk_gemv", "_sum_splits")),
            ("cuBLAS GEMV/GEMM", ("gemv", "gemm", "xmma", "cutlass", "splitK", "sm90", "nvjet")),
            ("attention", ("fmha", "attention", "flash", "softmax")),
            ("copy / index", ("copy", "index", "elementwise"))]


def family(name: str) -> str:
    return next((f for f, keys in FAMILIES if any(name.startswith(k) if k == "triton_" else k in name for k in keys)),
                "other")


def gpu_ms_per_token(engine: Engine, steps: int = 200) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    engine.graph.replay()
    start.record()
    for _ in range(steps):
        engine.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def kernel_profile(engine: Engine, steps: int = 20) -> dict:
    """Kernels of ``steps`` replays from the profiler's trace: per-token time and count by name, and the span
    from the first kernel's start to the last one's end, whose excess over the kernel sum is idle GPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        return {"kernels": [], "note": "the profiler recorded no kernels inside the graph"}
    by_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    busy = sum(e["dur"] for e in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    rows = [{"name": n[:120], "family": family(n), "us_per_token": t / steps, "per_token": c / steps}
            for n, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])]
    families = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        families[r["family"]][0] += r["us_per_token"]
        families[r["family"]][1] += r["per_token"]
    return {"kernels_per_token": len(kernels) / steps, "busy_us_per_token": busy / steps,
            "span_us_per_token": span / steps, "idle_us_per_token": (span - busy) / steps,
            "families": {f: {"us_per_token": t, "per_token": c} for f, (t, c) in families.items()}, "kernels": rows}


def profile_config(name: str, sparsity: float, scope: str, select: str, compile: bool, max_seq: int = 256) -> dict:
    cfg = SparsityConfig.from_nominal(sparsity) if sparsity else None
    model = random_model(name, cfg, scope)
    if sparsity and select == "threshold":  # calibrated on random tokens, as bench decode does
        vocab = model.config.vocab_size
        select_by_thresholds(model, torch.randint(0, vocab, (4, 128)), device="cuda", progress=False)
    engine = Engine(Transformer.from_hf(model, max_seq=max_seq, select=select if sparsity else "dense"),
                    compile=compile)
    del model
    prompt = torch.randint(0, 1000, (16,))
    tokens_per_s = sorted(engine.generate(prompt, 128).tokens_per_s for _ in range(3))[1]
    result = {"sparsity": sparsity, "scope": scope if sparsity else None, "select": select if sparsity else None,
              "compile": compile,
              "generate_tokens_per_s": tokens_per_s, "graph_ms_per_token": gpu_ms_per_token(engine),
              **kernel_profile(engine)}
    del engine
    torch.cuda.empty_cache()
    return result


def table(runs: list[dict]) -> str:
    lines = []
    for r in runs:
        label = "dense" if not r["sparsity"] else f"{r['sparsity']:.0%} {r['scope']} {r.get('select') or 'topk'}"
        summary = (f"generate {r['generate_tokens_per_s']:.1f} tokens/s ({1e3 / r['generate_tokens_per_s']:.3f} ms); "
                   f"graph replay alone {r['graph_ms_per_token']:.3f} ms/token; kernels "
                   f"{r.get('kernels_per_token', 0):.0f}/token, busy {r.get('busy_us_per_token', 0):.0f} us, "
                   f"idle between kernels {r.get('idle_us_per_token', 0):.0f} us (negative: kernels overlap)")
        lines += [f"### {label}, torch.compile {'on' if r['compile'] else 'off'}", "", summary, "",
                  "| family | us / token | kernels / token |", "|---|---:|---:|"]
        lines += [f"| {f} | {v['us_per_token']:.1f} | {v['per_token']:.0f} |"
                  for f, v in sorted(r.get("families", {}).items(), key=lambda kv: -kv[1]["us_per_token"])]
        lines += ["", "| kernel | family | us / token | per token |", "|---|---|---:|---:|"]
        lines += [f"| `{k['name'][:70]}` | {k['family']} | {k['us_per_token']:.1f} | {k['per_token']:.0f} |"
                  for k in r["kernels"][:25]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama2-7b")
    p.add_argument("--sparsity", default="0,0.5")
    p.add_argument("--scope", default=DEFAULT_SCOPE["folded"])
    p.add_argument("--select", default="topk", choices=("topk", "threshold"))
    p.add_argument("--no-compile", action="store_true", help="also profile without torch.compile")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    runs = []
    for s in [float(v) for v in a.sparsity.split(",")]:
        for compile in [True, False] if a.no_compile else [True]:
            runs.append(profile_config(a.config, s, a.scope, a.select, compile))
            print(table(runs[-1:]), flush=True)
    result = {"config": a.config, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs}
    write_report(a.out, f"profile-{a.config}-{a.scope}-{a.select}", result, table(runs))


if __name__ == "__main__":
    main()
