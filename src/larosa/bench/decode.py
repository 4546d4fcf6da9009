"""Decode-speed benchmark on random weights with real shapes (batch 1, bf16, CUDA).

Top-K fixes k, so a sparse projection reads the same bytes whatever the weights hold: random weights of the real
shapes give the real speed. The dense and the folded LaRoSa model run in the same engine (static KV cache, dense
prefill, CUDA-graph decode); transformers' own ``generate`` with a static cache and torch.compile is timed beside
them as what a user would pick instead.
"""

from __future__ import annotations

import gc
import platform
import time

import torch

from ..arch import Dims, adapter_class, adapter_for
from ..fold import FoldedSettings, folded_class
from ..runtime import Engine, Transformer
from ..sparsity.levels import SparsityConfig, adapter_overhead, per_layer, site_weights
from ..sparsity.topk import DEFAULT_SCOPE

# Shapes of the models the targets name (weights are random; only the shapes matter).
CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def byte_ideal_speedup(dims: Dims, sparsity: SparsityConfig | None, scope: str | None, context: int) -> float:
    """Bytes read per decoded token, dense over sparse: every decoder linear at (1 - s_site), the residual
    adapters dense, lm_head dense, the KV cache at ``context`` positions (docs/method.md, sparsity accounting)."""

    def per_token(cfg: SparsityConfig | None, adapter_scope: str | None) -> float:
        sites = site_weights(dims)
        linear = sum(w * (1 - (cfg.sites()[s] if cfg else 0.0)) for s, w in sites.items())
        adapters = adapter_overhead(dims, adapter_scope) * sum(sites.values())
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


def _engine_tokens_per_s(model, max_seq: int, prompt: torch.Tensor, tokens: int, repeats: int,
                         compile: bool) -> float:
    engine = Engine(Transformer.from_hf(model, max_seq=max_seq), compile=compile)
    rates = sorted(engine.generate(prompt, tokens).tokens_per_s for _ in range(repeats))
    del engine
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


def bench_decode(name: str, sparsities: list[float], scope: str = DEFAULT_SCOPE["folded"], tokens: int = 128, prompt_len: int = 16,
                 repeats: int = 3, hf: bool = True, compile: bool = True) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("bench decode needs a CUDA device")
    max_seq = prompt_len + tokens
    prompt = torch.randint(0, CONFIGS[name]["vocab_size"], (prompt_len,))
    bandwidth = copy_bandwidth()
    rows = []
    for s in [0.0, *sparsities]:
        cfg = SparsityConfig.from_nominal(s) if s else None
        model = random_model(name, cfg, scope)
        dims = adapter_for(model).dims
        rate = _engine_tokens_per_s(model, max_seq, prompt, tokens, repeats, compile)
        weight_bytes = 2 * (dims.n_layers * sum(site_weights(dims).values()) + dims.vocab * dims.hidden)
        row = {"sparsity": s, "scope": scope if s else None, "tokens_per_s": rate,
               "param_weighted_sparsity": cfg.param_weighted(dims) if cfg else 0.0,
               "byte_ideal_speedup": byte_ideal_speedup(dims, cfg, scope if cfg else None, max_seq),
               "weight_floor_tokens_per_s": bandwidth * 1e9 / weight_bytes}
        if hf and not s:
            row["hf_generate_tokens_per_s"] = _hf_tokens_per_s(model, prompt, tokens)
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {name} s={s}: {rate:.1f} tokens/s"
              + (f", HF generate {row['hf_generate_tokens_per_s']:.1f}" if "hf_generate_tokens_per_s" in row else ""),
              flush=True)  # a run cut short still shows what it measured
        del model
        gc.collect()
        torch.cuda.empty_cache()
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["speedup_over_ideal"] = row["speedup"] / row["byte_ideal_speedup"]
    return {"config": name, "tokens": tokens, "prompt": prompt_len, "compile": compile,
            "copy_bandwidth_gb_s": bandwidth,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
            "rows": rows}


def decode_table(result: dict) -> str:
    lines = [f"{result['config']}, batch 1, bf16, {result['tokens']} new tokens after a {result['prompt']}-token "
             f"prompt, {result['device']} (copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s), engine "
             f"{'with' if result['compile'] else 'without'} torch.compile", "",
             "| sparsity | scope | param-weighted | tokens/s | speed-up | byte-ideal | of ideal | HF generate |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        hf = f"{r['hf_generate_tokens_per_s']:.1f}" if "hf_generate_tokens_per_s" in r else ""
        label = "dense" if not r["sparsity"] else f"{r['sparsity']:.0%}"
        lines.append(f"| {label} | {r['scope'] or ''} | {r['param_weighted_sparsity']:.3f} | {r['tokens_per_s']:.1f} "
                     f"| {r['speedup']:.3f}x | {r['byte_ideal_speedup']:.3f}x | {r['speedup_over_ideal']:.2f} | {hf} |")
    dense = result["rows"][0]
    lines.append(f"\ndense engine: {dense['tokens_per_s']:.1f} tokens/s against a weight-bandwidth floor of "
                 f"{dense['weight_floor_tokens_per_s']:.1f} tokens/s "
                 f"({dense['weight_floor_tokens_per_s'] / dense['tokens_per_s']:.2f}x slower than the floor)")
    return "\n".join(lines)
