"""A short, readable decoder for batch-1 generation, in the manner of gpt-fast.

One ``Transformer`` serves the dense model and the folded LaRoSa model, so their speed ratio is fair: the same
attention, cache and graph; only the projections differ. A sparse projection keeps its weight input-major
(``[d_in, d_out]``) so that the k rows Top-K selects are contiguous, and at decode runs the fused Top-K +
gather-GEMV kernel; a dense one keeps the ``[d_out, d_in]`` layout cuBLAS reads fastest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import adapter_for, soft_cap
from ..errors import LarosaError
from ..fold import FoldedSettings
from ..kernels import column_thresholds, pdl_supported, threshold_state
from ..sparsity import sites
from ..sparsity.peers import teal_thresholds
from ..sparsity.levels import keep_count, site_sizes
from ..sparsity.topk import keep_top, score
from . import ops

HALF = (torch.bfloat16, torch.float16)  # the kernels' activations


class Proj(nn.Module):
    """y = x Wᵀ + b, or with ``k``, y = topk(x, k) Wᵀ + b, or with ``threshold``, y = (x where |x| >= threshold) Wᵀ + b,
    reading only the kept rows of W.

    On CUDA the weight of a sparse projection is stored input-major, and at decode (one token, 16-bit) the Triton
    kernels read only its kept rows: exact Top-K is the threshold search and the fused GEMV, as programmatic
    dependent launches where the GPU allows (on the H200, Llama-2-7B at 50 %: the GEMV so launched, 1.7 to 2.4 %
    faster; the search too, 1.166x -> 1.200x the dense speed); a calibrated threshold is the fused GEMV alone. There
    ``scale`` (weight-aware scores) rewrites the product exactly as (x ⊙ s)(W / s)ᵀ, so that the kernels rank x ⊙ s,
    and a centring ``offset`` o is subtracted from x with W o added to the bias. Elsewhere the weight keeps the
    model's layout and the product is the one the Hugging Face module computes, bit for bit.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, k: int | None = None,
                 scale: torch.Tensor | None = None, threshold: float | Sequence[tuple[float, int]] | None = None,
                 offset: torch.Tensor | None = None):
        super().__init__()
        # A threshold, or (threshold, rows) for each weight stacked in ``weight`` (TEAL's q, k, v or gate, up)
        self.segments = _segments(threshold, weight.shape[0])
        self.per_column = self.segments is not None and len(self.segments) > 1
        if self.per_column and scale is not None:
            raise ValueError("thresholds per stacked weight take no weight-aware scale")
        self.threshold = self.segments[0][0] if self.segments and not self.per_column else None
        self.k = None if self.segments or k is None or k >= weight.shape[1] else k
        sparse = self.k is not None or self.segments is not None
        self.input_major = sparse and weight.is_cuda
        self.scale = nn.Parameter(scale, requires_grad=False) if scale is not None and sparse else None
        self.offset = nn.Parameter(offset, requires_grad=False) if offset is not None and sparse else None
        if self.input_major:
            if self.offset is not None:  # W (x - o + o) = W (x - o) + W o
                moved = weight.double() @ self.offset.double()
                bias = (moved if bias is None else bias.double() + moved).to(weight.dtype)
            if self.scale is not None:
                weight = (weight.double() / scale.double()).to(weight.dtype)
            weight = weight.T.contiguous()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        state = None
        if self.segments and self.input_major and weight.dtype in HALF:
            state = (column_thresholds(self.segments, weight.dtype, weight.device) if self.per_column
                     else threshold_state(self.threshold, weight.dtype, weight.device))
        self.register_buffer("state", state, persistent=False)
        self.pdl = weight.is_cuda and pdl_supported(weight.device)

    def keep(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return keep_top(x, scores, self.k) if self.threshold is None else x.masked_fill(scores < self.threshold, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k is None and self.segments is None:
            return F.linear(x, self.weight, self.bias)
        if self.per_column and not (self.state is not None and x.shape[0] == 1):
            return self._per_weight(x)
        if not self.input_major:  # as the folded model's site and module compute it
            if self.offset is None:
                return F.linear(self.keep(x, score(x, self.scale)), self.weight, self.bias)
            x = x - self.offset
            return F.linear(self.keep(x, score(x, self.scale)) + self.offset, self.weight, self.bias)
        if self.offset is not None:
            x = x - self.offset
        if self.scale is not None:
            x = x * self.scale
        if x.shape[0] == 1 and x.dtype in HALF:
            y = (ops.threshold_gemv(x[0], self.weight, self.state, self.per_column) if self.state is not None
                 else ops.topk_gemv(x[0], self.weight, self.k, self.pdl))[None]
        else:
            y = self.keep(x, x.abs()) @ self.weight
        return y if self.bias is None else y + self.bias

    def _per_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Each stacked weight's product with x under its own threshold, as its Linear and TEAL's site compute it."""
        parts, start = [], 0
        centred = x if self.offset is None else x - self.offset
        for threshold, rows in self.segments:
            kept = centred.masked_fill(centred.abs() < threshold, 0)
            end = start + rows
            bias = None if self.bias is None else self.bias[start:end]
            if self.input_major:  # the bias holds W o
                y = kept @ self.weight[:, start:end]
                parts.append(y if bias is None else y + bias)
            else:
                parts.append(F.linear(kept if self.offset is None else kept + self.offset, self.weight[start:end],
                                      bias))
            start = end
        return torch.cat(parts, dim=-1)


def _segments(threshold: float | Sequence[tuple[float, int]] | None, rows: int) -> list[tuple[float, int]] | None:
    """(threshold, rows) for each weight stacked in a Proj, checked to cover its ``rows``: one for a LaRoSa site,
    one per Linear for TEAL."""
    if threshold is None:
        return None
    if isinstance(threshold, (int, float)):
        return [(float(threshold), rows)]
    segments = [(float(t), int(n)) for t, n in threshold]
    if sum(n for _, n in segments) != rows:
        raise ValueError(f"thresholds for {sum(n for _, n in segments)} output rows, the weight has {rows}")
    return segments


class RMSNorm(nn.Module):
    """x / rms(x) times a gain, in float32; the gain multiplies after the cast back to x's dtype (Llama) or, with
    ``gain_in_float32``, before it (Gemma): each as the family's own norm rounds."""

    def __init__(self, gain: torch.Tensor, eps: float, gain_in_float32: bool = False):
        super().__init__()
        self.weight, self.eps = nn.Parameter(gain, requires_grad=False), eps
        self.gain_in_float32 = gain_in_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gain_in_float32:
            return (normed * self.weight).to(x.dtype)
        return normed.to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x with its first cos.shape[-1] dims turned by the rotary embedding: all of them, or a partial rotary
    embedding's share, the rest passing through (Phi-4-mini)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned, passed = x[..., :r], x[..., r:]
    return torch.cat((turned * cos + _rotate_half(turned) * sin, passed), dim=-1)


class KVCache(nn.Module):
    """One layer's keys and values for ``max_seq`` positions, in buffers of its own: with one buffer for all
    layers, sliced per layer, torch.compile wrote the whole cache back after every update (about 0.4 ms a token
    on Llama-2-7B, 8 % of the dense decode step)."""

    def __init__(self, n_kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape, kw = (n_kv_heads, max_seq, head_dim), {"dtype": dtype, "device": device}
        self.register_buffer("k", torch.zeros(shape, **kw), persistent=False)
        self.register_buffer("v", torch.zeros(shape, **kw), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(1, pos, k)
        self.v.index_copy_(1, pos, v)
        return self.k, self.v


@dataclass
class Shape:
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    scale: float  # of the query-key dot products


@dataclass(frozen=True)
class Attention:
    """Where one layer's attention looks: its rotary table (an index into the model's) and its window, if any."""

    rotary: int = 0
    window: int | None = None


class Layer(nn.Module):
    def __init__(self, shape: Shape, attn_norm, qkv: Proj, o: Proj, mlp_norm, gate_up: Proj, down: Proj,
                 mid_adapter: torch.Tensor | None, out_adapter: torch.Tensor | None, act,
                 transforms: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                 qk_norms: tuple[RMSNorm, RMSNorm] | None = None,
                 out_norms: tuple[RMSNorm | None, RMSNorm | None] = (None, None), attention: Attention = Attention()):
        super().__init__()
        self.shape, self.act, self.attention = shape, act, attention
        self.attn_norm, self.qkv, self.o, self.mlp_norm, self.gate_up, self.down = (
            attn_norm, qkv, o, mlp_norm, gate_up, down)
        self.mid_adapter = None if mid_adapter is None else Proj(mid_adapter)
        self.out_adapter = None if out_adapter is None else Proj(out_adapter)
        # the input form's d x d transforms of each block's normed input
        self.attn_transform, self.mlp_transform = (None if w is None else Proj(w) for w in transforms)
        self.q_norm, self.k_norm = qk_norms or (None, None)  # per head, where the family has them (Qwen3, Gemma 3)
        self.attn_out_norm, self.mlp_out_norm = out_norms  # on the blocks' outputs, where the family has them (Gemma 3)
        self.cache: KVCache | None = None  # set by Transformer, which knows the cache length

    def forward(self, h, cos, sin, pos, mask, kv_len: int | None = None):
        """``cos``/``sin``: this layer's rotary table at ``pos``; ``mask``: [t, cache] keys each token may see (its
        window applied); ``kv_len``: attend to the first keys only, as transformers does (see Transformer)."""
        s, window = self.shape, self.attention.window
        t = h.shape[0]
        x = self.attn_norm(h)
        q, k, v = self.qkv(x if self.attn_transform is None else self.attn_transform(x)).split(
            [s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim], dim=-1)
        q, k = q.view(t, s.n_heads, s.head_dim), k.view(t, s.n_kv_heads, s.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        v = v.view(t, s.n_kv_heads, s.head_dim).transpose(0, 1)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        k_cache, v_cache = self.cache.update(pos, k, v)
        if kv_len is None:  # the whole static cache, masked: one shape for every step (CUDA graphs)
            attn = F.scaled_dot_product_attention(q[None], k_cache[None], v_cache[None], attn_mask=mask[None, None],
                                                  scale=s.scale, enable_gqa=True)
        elif window is not None and kv_len > window:  # the written keys, through the window
            attn = F.scaled_dot_product_attention(q[None], k_cache[None, :, :kv_len], v_cache[None, :, :kv_len],
                                                  attn_mask=mask[None, None, :, :kv_len], scale=s.scale,
                                                  enable_gqa=True)
        else:  # the keys written so far, read as transformers' own attention reads them: its numbers, bit for bit
            attn = F.scaled_dot_product_attention(q[None], k_cache[None, :, :kv_len], v_cache[None, :, :kv_len],
                                                  is_causal=t > 1, scale=s.scale, enable_gqa=True)
        y = self.o(attn[0].transpose(0, 1).reshape(t, -1))
        h = h + (y if self.attn_out_norm is None else self.attn_out_norm(y))
        if self.mid_adapter is not None:
            h = self.mid_adapter(h)
        x = self.mlp_norm(h)
        gate, up = self.gate_up(x if self.mlp_transform is None else self.mlp_transform(x)).chunk(2, dim=-1)
        y = self.down(self.act(gate) * up)
        h = h + (y if self.mlp_out_norm is None else self.mlp_out_norm(y))
        if self.out_adapter is not None:
            h = self.out_adapter(h)
        return h


class Transformer(nn.Module):
    """Embedding (times ``embed_scale``, where the family scales it), layers, final norm, lm_head (its logits soft
    capped at ``logit_softcap``, where the family caps them); a static KV cache of ``max_seq`` positions. ``cos``
    and ``sin`` are [tables, positions, head_dim]: each layer reads the table its :class:`Attention` names."""

    def __init__(self, embedding, layers, final_norm, lm_head, cos, sin, max_seq: int,
                 embed_scale: float | None = None, logit_softcap: float | None = None):
        super().__init__()
        self.embedding = nn.Parameter(embedding, requires_grad=False)
        self.layers, self.final_norm, self.lm_head = nn.ModuleList(layers), final_norm, lm_head
        self.register_buffer("cos", cos[:, :max_seq], persistent=False)
        self.register_buffer("sin", sin[:, :max_seq], persistent=False)
        # the scale in the embedding's dtype, as transformers multiplies by it
        scale = None if embed_scale is None else torch.tensor(embed_scale).to(embedding.device, embedding.dtype)
        self.register_buffer("embed_scale", scale, persistent=False)
        self.logit_softcap = logit_softcap
        self.windows = sorted({layer.attention.window for layer in self.layers} - {None})
        self.register_buffer("positions", torch.arange(max_seq, device=embedding.device), persistent=False)
        for layer in self.layers:
            s = layer.shape
            layer.cache = KVCache(s.n_kv_heads, max_seq, s.head_dim, embedding.dtype, embedding.device)
        causal = torch.ones(max_seq, max_seq, dtype=torch.bool, device=embedding.device).tril()
        self.register_buffer("causal", causal, persistent=False)
        self.max_seq = max_seq

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits for ``tokens`` (1-D) at cache positions ``pos`` (1-D, same length, consecutive)."""
        h = self.embedding[tokens]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        cos, sin = self.cos[:, pos], self.sin[:, pos]
        masks = {None: self.causal[pos]}  # per window: the keys each token sees
        for w in self.windows:
            masks[w] = masks[None] & (pos[:, None] - self.positions < w)
        # Off CUDA there is no graph to keep one shape for: attend to the written keys only (a prefill from 0, or
        # one token), as transformers does. On CUDA the static, masked cache keeps the decode step capturable.
        kv_len = None
        if not tokens.is_cuda and (tokens.numel() == 1 or int(pos[0]) == 0):
            kv_len = int(pos[-1]) + 1
        for layer in self.layers:
            a = layer.attention
            h = layer(h, cos[a.rotary], sin[a.rotary], pos, masks[a.window], kv_len)
        return soft_cap(self.lm_head(self.final_norm(h)), self.logit_softcap).float()

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: nn.Module, max_seq: int, select: str | None = None) -> "Transformer":
        """From a dense, folded or TEAL-sparsified Hugging Face model; a folded one brings its own sparsity and
        adapters, and ``select`` ("dense", "topk" or "threshold") overrides how its sites select (default: as
        saved); a TEAL one brings a threshold per projection ("threshold", the default, or "dense"). Weights the
        engine keeps as the model has them are the model's own tensors, not copies."""
        adapter = adapter_for(model)
        dims = adapter.dims
        extras = adapter.attention_extras()
        if extras is not None:
            raise LarosaError(f"this model's attention has {extras}, which the decode engine does not compute; "
                              "run transformers' own generate on it")
        folded = FoldedSettings.of(model.config)
        teal = teal_thresholds(model)
        simulated = (sites.settings(model) or {}).get("mode") == "simulate" and teal is None
        select = select or (folded.select if folded else "threshold" if teal else None if simulated else "dense")
        if simulated and select != "dense":
            method = sites.settings(model)["method"]
            raise LarosaError(f"the engine runs dense, folded LaRoSa and TEAL models, not {method}'s simulated sites: "
                              "fold the model (larosa sparsify --mode folded) or pass select='dense'")
        if select != "dense" and folded is None and teal is None:
            raise ValueError(f"a dense model has no sparsity to select with ({select!r})")
        if teal is not None and select == "topk":
            raise ValueError("TEAL keeps the entries above its thresholds: select 'threshold' or 'dense'")
        if folded is not None and select == "threshold" and folded.thresholds is None:
            raise ValueError("this folded model has no calibrated thresholds (fold it with select='threshold')")
        configs = [None] * dims.n_layers if select == "dense" or folded is None else list(folded.levels)
        thresholds = folded.thresholds if select == "threshold" and folded else [{}] * dims.n_layers
        teal_offsets = [{}] * dims.n_layers
        if select == "threshold" and teal is not None:  # (threshold, rows) per stacked Linear, in each Proj's order
            stacked = {"attn_in": adapter.qkv, "o_in": lambda layer: [adapter.o_proj(layer)],
                       "mlp_in": adapter.gate_up, "down_in": lambda layer: [adapter.down_proj(layer)]}
            thresholds = [{site: [(by[m][0], m.out_features) for m in linears(layer)]
                           for site, linears in stacked.items()} for layer, by in zip(adapter.layers(), teal)]
            teal_offsets = [{site: by[linears(layer)[0]][1] for site, linears in stacked.items()  # one per input
                             if by[linears(layer)[0]][1] is not None} for layer, by in zip(adapter.layers(), teal)]
        sizes = site_sizes(dims)
        shape = Shape(dims.hidden, dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.intermediate,
                      adapter.attention_scale())
        eps, act = adapter.norm_eps(), adapter.activation()

        def norm(module: nn.Module | None) -> RMSNorm | None:
            return None if module is None else RMSNorm(adapter.gain(module).clone(), eps, adapter.gain_in_float32)

        kinds = list(dict.fromkeys(adapter.rotary_kind(i) for i in range(dims.n_layers)))  # the rotary tables
        layers = []
        for i, (layer, config, t, teal_offset) in enumerate(zip(adapter.layers(), configs, thresholds, teal_offsets)):
            kept = {} if config is None else {site: keep_count(s, sizes[site]) for site, s in config.sites().items()}
            made = {} if teal is not None else (sites.of(layer) or {})  # LaRoSa's sites carry scale and offset
            scale = {name: site.scale for name, site in made.items() if site.scale is not None}
            offset = teal_offset or {name: site.offset for name, site in made.items() if site.offset is not None}
            qkv = adapter.qkv(layer)  # q, k and v's Linears, or the one that fuses them (as gate_up)
            qkv_bias = None if qkv[0].bias is None else torch.cat([p.bias for p in qkv])
            adapters = [getattr(layer, name, None) for name in ("mid_adapter", "out_adapter")]
            transforms = [getattr(layer, name, None) for name in ("attn_transform", "mlp_transform")]
            norms = adapter.qk_norms(layer)
            layers.append(Layer(
                shape,
                norm(adapter.attn_norm(layer)),
                Proj(torch.cat([p.weight for p in qkv]), qkv_bias, kept.get("attn_in"), scale.get("attn_in"),
                     t.get("attn_in"), offset.get("attn_in")),
                Proj(adapter.o_proj(layer).weight, adapter.o_proj(layer).bias, kept.get("o_in"),
                     scale.get("o_in"), t.get("o_in"), offset.get("o_in")),
                norm(adapter.mlp_norm(layer)),
                Proj(torch.cat([p.weight for p in adapter.gate_up(layer)]), None, kept.get("mlp_in"),
                     scale.get("mlp_in"), t.get("mlp_in"), offset.get("mlp_in")),
                Proj(adapter.down_proj(layer).weight, adapter.down_proj(layer).bias, kept.get("down_in"),
                     scale.get("down_in"), t.get("down_in"), offset.get("down_in")),
                *[None if a is None else a.weight for a in adapters],
                act,
                tuple(None if m is None else m.weight for m in transforms),
                None if norms is None else tuple(norm(n) for n in norms),
                tuple(norm(n) for n in adapter.out_norms(layer)),
                Attention(kinds.index(adapter.rotary_kind(i)), adapter.sliding_window(i)),
            ))
        embedding = model.get_input_embeddings().weight
        positions = torch.arange(max_seq, device=embedding.device)
        tables = [adapter.rotary(positions, embedding.dtype, kind) for kind in kinds]
        cos, sin = (torch.stack(parts) for parts in zip(*tables))
        head = model.get_output_embeddings()
        return cls(embedding, layers, norm(adapter.final_norm()), Proj(head.weight, head.bias), cos,
                   sin, max_seq, adapter.embed_scale(), adapter.logit_softcap())


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token ([1]) from the last position's logits: greedy at temperature 0, else drawn from the
    softmax at ``temperature`` restricted to the smallest set of tokens whose probability reaches ``top_p``."""
    logits = logits[-1].float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reaches p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator)


@dataclass
class Generation:
    tokens: torch.Tensor  # the prompt and the new tokens
    new_tokens: int
    prefill_seconds: float
    tokens_per_s: float  # decode steps after the first new token, per second
    stopped: str  # "stop" (a stop token was drawn) or "length"


class Engine:
    """Generation with a prefill and a decode step replayed from a CUDA graph (on CUDA)."""

    def __init__(self, model: Transformer, use_graph: bool = True, compile: bool = False):
        self.model = model.eval()
        # torch.compile fuses the small element-wise kernels (norms, rotary, residual adds) that otherwise
        # cost a launch each; the Top-K kernels are custom ops inside the one graph.
        self.decode = torch.compile(model, dynamic=False) if compile else model
        device = model.embedding.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        if use_graph and device.type == "cuda":
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: kernel compilation and cuBLAS handles outside the graph
                self.decode(self.token, self.pos)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.decode(self.token, self.pos)

    @torch.no_grad()
    def step(self, token: int | torch.Tensor, pos: int) -> torch.Tensor:
        """Logits of the next token after ``token`` at position ``pos``."""
        self.token.fill_(token) if isinstance(token, int) else self.token.copy_(token.view(1))
        self.pos.fill_(pos)
        if self.graph is None:
            return self.decode(self.token, self.pos)
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, stop: Collection[int] = (),
                 on_token: Callable[[int], None] | None = None,
                 check: Callable[[torch.Tensor], None] | None = None) -> Generation:
        """The prompt continued by up to ``max_new_tokens`` tokens (see :func:`sample`), ending early after a
        token of ``stop``; ``on_token`` sees each new token as it is made. Without either, tokens stay on the
        device until the end (no per-token synchronisation: what the benchmarks time). ``check`` sees the prompt's
        logits first (a broken model's NaN would otherwise become token 0)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt.numel() + max_new_tokens > self.model.max_seq:
            raise ValueError(f"prompt + new tokens exceed the cache of {self.model.max_seq} positions")
        device = self.token.device
        prompt = prompt.to(device).view(-1)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        watch = bool(stop) or on_token is not None
        start = time.perf_counter()
        logits = self.model(prompt, torch.arange(prompt.numel(), device=device))
        if check is not None:
            check(logits)
        out = [prompt, sample(logits, temperature, top_p, generator)]
        sync()
        prefill = time.perf_counter() - start
        start, stopped = time.perf_counter(), "length"
        for i in range(max_new_tokens):
            if watch:
                token = int(out[-1])
                if on_token is not None:
                    on_token(token)
                if token in stop:
                    stopped = "stop"
                    break
            if i == max_new_tokens - 1:
                break
            out.append(sample(self.step(out[-1], prompt.numel() + i), temperature, top_p, generator))
        sync()
        seconds = time.perf_counter() - start
        tokens = torch.cat(out)
        new = tokens.numel() - prompt.numel()
        return Generation(tokens, new, prefill, (new - 1) / seconds if new > 1 else 0.0, stopped)
