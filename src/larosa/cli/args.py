"""The ``larosa`` command line: every subcommand's arguments, one meaning per option name.

``--sparsity`` is always a nominal level (split between rotated and plain sites by ``--split``); ``--target`` is
always a parameter-weighted level (the share of decoder weight reads skipped), a comma list where several are
allowed; ``--plan`` is a plan file from ``larosa search``. Scope defaults come from ``DEFAULT_SCOPE``.
"""

from __future__ import annotations

import argparse
import math

from ..bench.decode import CONFIGS
from ..compare import DEFAULT_ROWS, ROWS
from ..errors import LarosaError
from ..models import DTYPES, check_device
from ..rotations import OBJECTIVES, SCOPES, SIGNALS
from ..sparsity import CENTRES, DEFAULT_SCOPE, DEFAULT_SPLIT, FORMS, SCORES, SELECTS, SITES
from ..version import __version__

DATA_HELP = "wikitext2[:split], builtin:wiki, builtin:c4, or a .txt / .jsonl file"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _levels(text: str) -> list[float]:
    values = _floats(text)
    if not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must lie in [0, 1), got {text!r}")
    return values


def _split(text: str) -> tuple[float, float]:
    values = _floats(text)
    if len(values) != 2 or not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise argparse.ArgumentTypeError(f"expected two numbers >= 0, not both 0, like 0.8,1.2; got {text!r}")
    return values[0], values[1]


def _count(text: str, least: int = 1) -> int:
    """A whole number of windows, tokens, examples... at least ``least``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
    return value


def _count_or_zero(text: str) -> int:
    return _count(text, least=0)


def _seq_len(text: str) -> int:
    return _count(text, least=2)  # one token to predict from, one to predict


def _device(text: str) -> str:
    try:
        return check_device(text)
    except LarosaError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _site_override(text: str) -> tuple[str, float]:
    site, _, value = text.partition("=")
    if site not in SITES:
        raise argparse.ArgumentTypeError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    try:
        return site, float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected SITE=VALUE, got {text!r}") from e


def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face name or local directory, or builtin:smollm2 (offline)")
    p.add_argument("--device", type=_device, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_count, default=1,
                   help="windows per forward pass: same result, faster on a GPU (default 1)")


def _lazy(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--lazy", action="store_true",
                   help=f"leave the weights on disk and {what} one layer at a time (models larger than the GPU or "
                        "RAM; safetensors checkpoints)")


def _larosa(p: argparse.ArgumentParser, folded_only: bool) -> None:
    """What makes a model LaRoSa-sparse: the same options wherever LaRoSa is applied."""
    p.add_argument("--rotations", help="rotations file from `larosa calibrate`"
                   + (" (needed, but with --method teal / teal-greedy)" if folded_only
                      else " (omit for unrotated Top-K)")
                   + "; with --method teal / teal-greedy, TEAL's thresholds sit on the model rotated by its global Q")
    p.add_argument("--sparsity", type=float, help="nominal sparsity s in [0, 1), split by --split")
    p.add_argument("--split", type=_split, default=DEFAULT_SPLIT,
                   help="multipliers of the nominal sparsity at the rotated,plain sites (default 0.8,1.2)")
    p.add_argument("--site", type=_site_override, action="append", default=[], metavar="SITE=S",
                   help=f"set one site's sparsity ({', '.join(SITES)}); repeatable")
    p.add_argument("--target", type=float,
                   help="parameter-weighted sparsity (share of decoder weight reads skipped) instead of --sparsity, "
                        "reached with --split; with --plan, which of the file's plans to use")
    p.add_argument("--plan", help="plan file from `larosa search`: its searched per-layer levels (and its scope and "
                                  "score, unless given)")
    p.add_argument("--scope", choices=SCOPES,
                   help="block: each block its own Q; layer: one Q per layer, the attention input's, as the paper's "
                        "code; global: one Q for all layers, no residual adapters when folded (default: the plan's, "
                        f"else {DEFAULT_SCOPE['simulate']} when simulated, {DEFAULT_SCOPE['folded']} when folded)")
    p.add_argument("--score", choices=SCORES,
                   help="Top-K by |x| (magnitude) or by |x| times the norm of the weight row it multiplies; with "
                        "TEAL the thresholds rank the same, the scales folded into the weights (default: the plan's, "
                        "else magnitude)")
    p.add_argument("--head-rotation", action="store_true",
                   help="folded only: rotate the o_proj input per KV head (free at run time)")
    p.add_argument("--form", choices=FORMS,
                   help="folded only: residual rotates the residual stream, d x d adapters where the basis changes "
                        "(none in global scope); input transforms each block's normed input by a d x d matrix (two a "
                        "layer), which folds any family, scope and Q exactly as simulated (default: residual where "
                        "it folds exactly, else input)")
    p.add_argument("--centre", choices=CENTRES,
                   help="centre every site's (rotated) input on a per-coordinate offset, the mean or the median of "
                        "it on --calib-data, before it selects; the weights add it back as a bias (LaRoSa and TEAL)")
    p.add_argument("--select", choices=SELECTS,
                   help="topk: exactly k entries a token at every site; threshold: every entry at or above a per-site "
                        "threshold calibrated on --calib-data to drop the site's share (k varies per token; no "
                        "selection launch when decoding); greedy: a threshold per projection of the globally "
                        "rotated model, allocated for --target by TEAL's greedy search on --calib-data, centred and "
                        "weight-aware (no adapters; the most accurate at equal bytes read). Default: greedy for "
                        "sparsify given --target alone, else topk")
    _calib(p)


def _calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-data",
                   help=f"text thresholds are calibrated on (--select threshold|greedy, peers; {DATA_HELP})")
    p.add_argument("--calib-windows", type=_count, default=16, help="calibration windows (default 16)")
    p.add_argument("--calib-seq-len", type=_seq_len,
                   help="tokens per calibration window (default: --seq-len where the command has it, else 2048)")


def _evaluated(p: argparse.ArgumentParser) -> None:
    """What makes the evaluated model sparse: the same for `eval ppl` and `eval tasks`."""
    _larosa(p, folded_only=False)
    p.add_argument("--mode", choices=("simulate", "folded"), default="simulate",
                   help="simulate: rotate, Top-K, rotate back around dense weights (the paper's code); "
                        "folded: the deployable model, built in memory")
    _method(p, ("larosa", "teal", "teal-greedy", "cats"))


def _method(p: argparse.ArgumentParser, methods: tuple[str, ...]) -> None:
    p.add_argument("--method", choices=methods, default="larosa",
                   help="larosa (default), or a peer in the same harness: TEAL thresholds (uniform or greedy per "
                        "projection)" + (" or CATS (MLP gate)" if "cats" in methods else "")
                        + "; peers need --target and --calib-data")


def _calibrate(sub) -> None:
    c = sub.add_parser("calibrate", help="PCA rotations per layer, layer by layer, to a safetensors file")
    _model(c)
    c.add_argument("--data", required=True, help=DATA_HELP)
    c.add_argument("--out", required=True, help="rotations file to write (.safetensors)")
    c.add_argument("--windows", type=_count, default=16, help="calibration windows (default 16)")
    c.add_argument("--seq-len", type=_seq_len, default=2048, help="tokens per window (default 2048)")
    c.add_argument("--signal", choices=SIGNALS, default="gain",
                   help="gain: PCA of the norm output with its gain (the reference code, default); gainfree: "
                        "without it, the signal Top-K sees in the folded model")
    c.add_argument("--objective", choices=OBJECTIVES, default="pca",
                   help="pca: Q diagonalises XᵀX (the paper, default); weighted: diag(n) XᵀX diag(n), n the norms "
                        "of the weight rows each coordinate multiplies (folds with --form input only)")
    _lazy(c, "calibrate")


def _eval(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a dense or sparse model")
    esub = e.add_subparsers(dest="metric", required=True)
    ppl = esub.add_parser("ppl", help="perplexity on the first N windows of a text")
    _model(ppl)
    ppl.add_argument("--data", required=True, help=DATA_HELP)
    _evaluated(ppl)
    ppl.add_argument("--windows", type=_count, help="score the first N windows (default: all)")
    ppl.add_argument("--seq-len", type=_seq_len, default=2048, help="tokens per window (default 2048)")
    _batch(ppl)
    _lazy(ppl, "run every window through")

    tk = esub.add_parser("tasks", help="zero-shot acc / acc_norm through lm-evaluation-harness (pip install "
                                       "'larosa[tasks]')")
    _model(tk)
    tk.add_argument("--tasks", required=True,
                    help="comma-separated: arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande,sciq")
    tk.add_argument("--task-data", help="directory of local task files, <task>/<split>.jsonl (default: "
                                        "$LAROSA_TASK_DATA, else the Hugging Face hub)")
    tk.add_argument("--limit", type=_count, help="score the first N examples of each task (default: all)")
    tk.add_argument("--batch-size", type=_count, default=1)
    _evaluated(tk)


def _sparsify(sub) -> None:
    f = sub.add_parser("sparsify", help="fold rotations and norm gains into the weights (or calibrate TEAL's "
                                        "thresholds); save a loadable directory")
    _model(f)
    _larosa(f, folded_only=True)
    _method(f, ("larosa", "teal", "teal-greedy"))
    f.add_argument("--out", required=True, help="directory to write (safetensors, config, tokenizer)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a model directory larosa wrote (anything else is refused)")
    _lazy(f, "fold and write")


def _search(sub) -> None:
    s = sub.add_parser("search", help="search the split and per-layer site levels for parameter-weighted targets; "
                                      "write them to a plan file")
    _model(s)
    s.add_argument("--rotations", required=True, help="rotations file from `larosa calibrate`")
    s.add_argument("--data", required=True, help=f"calibration text ({DATA_HELP})")
    s.add_argument("--target", type=_levels, required=True, help="parameter-weighted targets, e.g. 0.25,0.4,0.5")
    s.add_argument("--skip", type=_count_or_zero, default=16,
                   help="windows of --data to pass over first: those the rotations were calibrated on (default 16)")
    s.add_argument("--windows", type=_count, default=4,
                   help="windows after them that the per-layer greedy is fitted on (default 4)")
    s.add_argument("--held-out", type=_count_or_zero, default=8,
                   help="windows after those that every candidate is scored on (default 8; 0: the fitting windows)")
    _batch(s)
    s.add_argument("--seq-len", type=_seq_len, default=2048)
    s.add_argument("--scope", choices=SCOPES, default=DEFAULT_SCOPE["simulate"],
                   help=f"rotation scope the plans are for (default {DEFAULT_SCOPE['simulate']}, the simulate "
                        f"default; {DEFAULT_SCOPE['folded']} for a plan to fold with the default scope)")
    s.add_argument("--score", choices=SCORES, default="magnitude")
    s.add_argument("--no-layers", action="store_true", help="search the split only, no per-layer site search")
    _lazy(s, "score every trial")
    s.add_argument("--out", required=True,
                   help="plan file to write (JSON); an existing plan file keeps its other targets' plans")


def _compare(sub) -> None:
    cmp = sub.add_parser("compare", help="dense, TEAL, CATS and LaRoSa variants on the same windows at equal "
                                         "parameter-weighted sparsity")
    _model(cmp)
    cmp.add_argument("--methods", type=lambda t: t.split(","), default=list(DEFAULT_ROWS),
                     help=f"comma-separated, from {','.join(ROWS)} (default {','.join(DEFAULT_ROWS)})")
    cmp.add_argument("--target", type=_levels, default=[0.25, 0.4, 0.5],
                     help="parameter-weighted targets (default 0.25,0.4,0.5)")
    cmp.add_argument("--data", required=True, help=f"evaluation text ({DATA_HELP})")
    cmp.add_argument("--windows", type=_count, default=40)
    _batch(cmp)
    cmp.add_argument("--calib-data", required=True, help="calibration text (thresholds, rotations, search)")
    cmp.add_argument("--calib-windows", type=_count, default=16)
    cmp.add_argument("--search-windows", type=_count, default=4,
                     help="windows after the calibration windows that the searches' greedy is fitted on (default 4)")
    cmp.add_argument("--held-out-windows", type=_count_or_zero, default=8,
                     help="windows after those that the searches score their candidates on (default 8)")
    cmp.add_argument("--seq-len", type=_seq_len, default=2048)
    cmp.add_argument("--rotations", help="rotations file (default: calibrate on --calib-data)")
    cmp.add_argument("--scope", choices=SCOPES, default=DEFAULT_SCOPE["simulate"],
                     help=f"LaRoSa's scope (simulated; default {DEFAULT_SCOPE['simulate']})")
    cmp.add_argument("--out", help="directory for compare.json, compare.md, compare.png, the rotations and the "
                                   "searched plans; a comparison there with the same settings is resumed")


def _bench(sub) -> None:
    b = sub.add_parser("bench", help="GPU speed benchmarks on random weights with real shapes")
    bsub = b.add_subparsers(dest="what", required=True)
    bd = bsub.add_parser("decode", help="end-to-end batch-1 decode tokens/s: dense vs folded LaRoSa vs HF generate")
    bd.add_argument("--config", choices=CONFIGS, default="llama2-7b", help="random weights of these shapes")
    bd.add_argument("--model", help="a saved dense or folded model instead of random weights (its own sparsity)")
    bd.add_argument("--select", type=lambda t: t.split(","), default=["topk", "threshold"],
                    help="selections to time, comma-separated: topk and threshold (the folded LaRoSa model; "
                         "thresholds are calibrated on random tokens where the model has none) and teal (TEAL's "
                         "greedy thresholds per projection on the dense model, same engine); default topk,threshold")
    bd.add_argument("--sparsity", type=_levels, default=[0.25, 0.4, 0.5],
                    help="nominal sparsities, comma-separated (default 0.25,0.4,0.5)")
    bd.add_argument("--scope", choices=SCOPES, default=DEFAULT_SCOPE["folded"],
                    help=f"the folded model's scope (default {DEFAULT_SCOPE['folded']})")
    bd.add_argument("--tokens", type=_count, default=128, help="new tokens per generation (default 128)")
    bd.add_argument("--prompt", type=_count, default=16, help="prompt tokens (default 16)")
    bd.add_argument("--repeats", type=_count, default=3, help="generations per engine; the median counts")
    bd.add_argument("--no-hf", action="store_true", help="skip timing transformers' generate")
    bd.add_argument("--no-compile", action="store_true", help="run the engine's decode step without torch.compile")
    bd.add_argument("--out", help="directory for JSON and a markdown table")
    bd.add_argument("--json", action="store_true")
    bk = bsub.add_parser("kernels", help="Top-K select + sparse GEMV vs dense cuBLAS per Llama shape, L2-cold")
    bk.add_argument("--sparsity", type=_levels, default=[0.25, 0.4, 0.5, 0.7],
                    help="sparsity of each projection's input, comma-separated (default 0.25,0.4,0.5,0.7)")
    bk.add_argument("--only", nargs="+", help="keep shapes whose model/weight contains one of these, e.g. llama3 down")
    bk.add_argument("--tune", action="store_true", help="also sweep the fused GEMV's tiles")
    bk.add_argument("--l2-bytes", type=float, default=1e9, help="weight bytes to rotate through (default 1e9)")
    bk.add_argument("--out", help="directory for kernels.json and kernels.md")
    bk.add_argument("--json", action="store_true")


def _generate(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a dense or folded model in the decode engine, "
                                        "streaming the text")
    _model(g)
    g.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                                                            "probability reaches P (default 1)")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--no-compile", action="store_true", help="do not compile the decode step (CUDA compiles it)")


def _demo(sub) -> None:
    d = sub.add_parser("demo", help="offline: calibrate SmolLM2-135M, then PPL at dense/25/40/50%%")
    d.add_argument("--calib-windows", type=_count, default=4, help="calibration windows of builtin:wiki (default 4)")
    d.add_argument("--windows", type=_count, default=6, help="scored windows of builtin:c4 (default 6)")
    d.add_argument("--seq-len", type=_seq_len, default=2048)
    d.add_argument("--json", action="store_true")
    d.add_argument("--quiet", action="store_true")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larosa", description="Training-free rotated Top-K activation sparsity "
                                "(LaRoSa) for faster LLM decoding.")
    p.add_argument("--version", action="version", version=f"larosa {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_calibrate, _eval, _sparsify, _search, _compare, _generate, _bench, _demo):
        add(sub)
    return p
