"""Decode-speed benchmark (batch 1, bf16, CUDA) on random weights with real shapes, or on a saved model.

Top-K fixes k, so a sparse projection reads the same bytes whatever the weights hold: random weights of the real
shapes give the real speed (thresholds keep a share that varies per token, so their rows report the share they
kept on random tokens). The dense and the folded LaRoSa model run in the same engine (static KV cache, CUDA-graph
decode); transformers' own ``generate`` with a static cache and torch.compile is timed beside them as what a user
would pick instead.
"""

from __future__ import annotations

import gc
import platform
import time

import torch

from ..api import select_by_thresholds, sparsify, unsparsify
from ..arch import Dims, adapter_class, adapter_for
from ..fold import FoldedSettings, folded_class
from ..models import load_model
from ..runtime import Engine, Transformer
from ..runtime.hf import CACHE_STEP, engine_for
from ..sparsity import TealConfig
from ..sparsity import sites as larosa_sites
from ..sparsity.levels import SparsityConfig, adapter_overhead, param_weighted, per_layer, site_weights
from ..sparsity.topk import DEFAULT_SCOPE

# What a row times: the folded LaRoSa model with exact Top-K or thresholds, or TEAL's greedy per-projection
# thresholds on the dense model, in the same engine.
SELECTIONS = ("topk", "threshold", "teal")
# Shapes of the models the targets name (weights are random; only the shapes matter).
CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def byte_ideal_speedup(dims: Dims, sparsity: SparsityConfig | None, scope: str | None, context: int,
                       form: str = "residual") -> float:
    """Bytes read per decoded token, dense over sparse: every decoder linear at (1 - s_site), the residual
    adapters dense, lm_head dense, the KV cache at ``context`` positions (docs/method.md, sparsity accounting)."""

    def per_token(cfg: SparsityConfig | None, adapter_scope: str | None) -> float:
        sites = site_weights(dims)
        linear = sum(w * (1 - (cfg.sites()[s] if cfg else 0.0)) for s, w in sites.items())
        adapters = adapter_overhead(dims, adapter_scope, form) * sum(sites.values())
        kv = 2 * dims.kv * context
        return dims.n_layers * (linear + adapters + kv) + dims.vocab * dims.hidden

    return per_token(None, None) / per_token(sparsity, scope)


def random_model(name: str, sparsity: SparsityConfig | None, scope: str):
    """A dense HF model, or a folded one (random orthogonal adapters), of the named shapes, bf16 on CUDA."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**CONFIGS[name])
    if sparsity is not None:
        settings = FoldedSettings(levels=tuple(per_layer(sparsity, config.num_hidden_layers)), scope=scope)
        config_class = folded_class(adapter_class(config)).config_class
        config = config_class(**{k: v for k, v in config.to_dict().items() if k != "model_type"},
                              larosa=settings.to_dict())
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("_adapter.weight"):
                p.copy_(torch.linalg.qr(torch.randn(p.shape, device="cuda"))[0])
    return model


def copy_bandwidth(gigabytes: float = 4.0) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = int(gigabytes * 1e9 / 2)
    a, b = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n * 2 / times[len(times) // 2] / 1e9


def _engine_tokens_per_s(model, max_seq: int, prompt: torch.Tensor, tokens: int, repeats: int, compile: bool,
                         select: str) -> float:
    """The engine's decode rate; a folded model selecting as saved reuses the engine its generate() runs, so that
    the two are timed on one compiled graph."""
    saved = FoldedSettings.of(model.config)
    if compile and saved is not None and select == saved.select:
        engine = engine_for(model, max_seq)
    else:
        engine = Engine(Transformer.from_hf(model, max_seq=max_seq, select=select), compile=compile)
    rates = sorted(engine.generate(prompt, tokens).tokens_per_s for _ in range(repeats))
    return rates[len(rates) // 2]


def _hf_tokens_per_s(model, prompt: torch.Tensor, tokens: int) -> float:
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, cache_implementation="static",
                  pad_token_id=0)
    ids = prompt[None].cuda()
    model.generate(ids, **kwargs)  # compiles
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def _measured(model, windows: torch.Tensor) -> float:
    """Parameter-weighted sparsity the model's sites reach on ``windows`` (thresholds vary k per token)."""
    with torch.no_grad():
        larosa_sites.site_sparsity(model, reset=True)
        model(windows.cuda())
    return larosa_sites.measured_param_weighted(model)


def bench_decode(config: str | None = "llama2-7b", sparsities: list[float] = (0.25, 0.4, 0.5), *,
                 model_dir: str | None = None, scope: str = DEFAULT_SCOPE["folded"],
                 selects: list[str] = ("topk", "threshold"), tokens: int = 128, prompt_len: int = 16,
                 repeats: int = 3, hf: bool = True, compile: bool = True) -> dict:
    """Tokens/s of the dense engine, of the folded model with each selection (exact Top-K; thresholds, which
    are calibrated on random tokens where the model has none), of TEAL ("teal": greedy thresholds per projection
    on the dense model, random weights only) and of transformers' generate, in one run: random weights of a named
    config at each nominal sparsity, or a saved (dense or folded) model as it is."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench decode needs a CUDA device")
    max_seq = -(-(prompt_len + tokens) // CACHE_STEP) * CACHE_STEP  # the cache generate() sizes its engine with
    bandwidth = copy_bandwidth()
    rows = []

    def time_model(model, label: float, select: str) -> None:
        folded = FoldedSettings.of(model.config)
        dims = adapter_for(model).dims
        levels = list(folded.levels) if folded and select != "dense" else None
        row = {"sparsity": label, "scope": folded.scope if levels else None, "select": select,
               "param_weighted_sparsity": param_weighted(levels, dims) if levels else 0.0}
        if select == "teal":  # greedy thresholds per projection, calibrated on random tokens
            sparsify(model, TealConfig(label, _random_windows(dims, 4, 128), greedy=True), device="cuda",
                     progress=False)
            levels = [SparsityConfig(label, label, label, label)] * dims.n_layers  # the same bytes on average
            row.update(param_weighted_sparsity=label, thresholds="calibrated on random tokens")
        if select == "threshold" and folded.thresholds is None:
            select_by_thresholds(model, _random_windows(dims, 4, 128), device="cuda", progress=False)
            row["thresholds"] = "calibrated on random tokens"
        if select in ("threshold", "teal"):
            row["measured_param_weighted"] = _measured(model, _random_windows(dims, 2, 128, seed=1))
        row["tokens_per_s"] = _engine_tokens_per_s(model, max_seq, prompt, tokens, repeats, compile,
                                                   "threshold" if select == "teal" else select)
        if select == "teal":
            unsparsify(model)
        uniform = levels[0] if levels and all(c == levels[0] for c in levels) else None
        row["byte_ideal_speedup"] = (byte_ideal_speedup(dims, uniform, row["scope"], max_seq,
                                                        folded.form if folded else "residual")
                                     if uniform or not levels else None)
        weight_bytes = 2 * (dims.n_layers * sum(site_weights(dims).values()) + dims.vocab * dims.hidden)
        row["weight_floor_tokens_per_s"] = bandwidth * 1e9 / weight_bytes
        saved = FoldedSettings.of(model.config)
        if hf and select == (saved.select if saved else "dense"):  # generate() runs the model as saved: a folded
            # one through the engine inside transformers' loop (larosa.runtime.hf)
            row["hf_generate_tokens_per_s"] = _hf_tokens_per_s(model, prompt, tokens)
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {config or model_dir} s={label} {select}: {row['tokens_per_s']:.1f} "
              "tokens/s" + (f", HF generate {row['hf_generate_tokens_per_s']:.1f}" if "hf_generate_tokens_per_s" in
                            row else ""), flush=True)  # a run cut short still shows what it measured

    if model_dir is not None:
        model, _ = load_model(model_dir, device="cuda", dtype=torch.bfloat16)
        prompt = torch.randint(0, adapter_for(model).dims.vocab, (prompt_len,))
        folded = FoldedSettings.of(model.config)
        nominal = folded.levels[0].nominal if folded else 0.0
        for select in ("dense", *(selects if folded else ())):
            time_model(model, nominal, select)
    else:
        prompt = torch.randint(0, CONFIGS[config]["vocab_size"], (prompt_len,))
        for s in [0.0, *sparsities]:
            model = random_model(config, SparsityConfig.from_nominal(s) if s else None, scope)
            for select in [x for x in selects if x != "teal"] if s else ("dense",):
                time_model(model, s, select)
            for t in sparsities if not s and "teal" in selects else ():  # TEAL sits on the dense model
                time_model(model, t, "teal")
            del model
            gc.collect()
            torch.cuda.empty_cache()
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        ideal = row["byte_ideal_speedup"]
        row["speedup_over_ideal"] = row["speedup"] / ideal if ideal else None
    return {"config": config if model_dir is None else model_dir, "tokens": tokens, "prompt": prompt_len,
            "compile": compile, "copy_bandwidth_gb_s": bandwidth, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "host": platform.node(), "rows": rows}


def _random_windows(dims, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, dims.vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def decode_table(result: dict) -> str:
    lines = [f"{result['config']}, batch 1, bf16, {result['tokens']} new tokens after a {result['prompt']}-token "
             f"prompt, {result['device']} (copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s), engine "
             f"{'with' if result['compile'] else 'without'} torch.compile", "",
             "| sparsity | scope | select | param-weighted (measured) | tokens/s | speed-up | byte-ideal | of ideal "
             "| HF generate |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        hf = f"{r['hf_generate_tokens_per_s']:.1f}" if "hf_generate_tokens_per_s" in r else ""
        label = "dense" if r["select"] == "dense" else "plan" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        measured = f" ({r['measured_param_weighted']:.3f})" if "measured_param_weighted" in r else ""
        ideal = "" if r["byte_ideal_speedup"] is None else f"{r['byte_ideal_speedup']:.3f}x"
        of_ideal = "" if r["speedup_over_ideal"] is None else f"{r['speedup_over_ideal']:.2f}"
        lines.append(f"| {label} | {r['scope'] or ''} | {r['select']} | {r['param_weighted_sparsity']:.3f}{measured} "
                     f"| {r['tokens_per_s']:.1f} | {r['speedup']:.3f}x | {ideal} | {of_ideal} | {hf} |")
    dense = result["rows"][0]
    lines.append(f"\ndense engine: {dense['tokens_per_s']:.1f} tokens/s against a weight-bandwidth floor of "
                 f"{dense['weight_floor_tokens_per_s']:.1f} tokens/s "
                 f"({dense['weight_floor_tokens_per_s'] / dense['tokens_per_s']:.2f}x slower than the floor)")
    return "\n".join(lines)
