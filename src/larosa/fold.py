"""The deployable form: norm gains and rotations folded into the weights (the paper's Fig. 2).

The residual stream of layer l is carried in basis Q_l, so no block input is rotated at run time; Top-K runs
directly on the gain-free norm output. The only online rotation left is a d x d residual adapter where the
basis changes: none for the ``global`` scope, one per layer for ``layer``, two for ``block``. The equations are
in docs/method.md (shared with the project).

A folded model is a registered Hugging Face model type (``larosa_llama``, ``larosa_qwen2``): after
``import larosa``, ``AutoModelForCausalLM.from_pretrained(dir)`` loads it and ``generate()`` works. A model larger
than RAM is folded and written one layer at a time by :func:`fold_streamed`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig
from transformers.initialization import no_init_weights

from . import __version__
from .adapters import Adapter, adapter_for
from .assets import sha256
from .errors import LarosaError
from .models import resident
from .rotations import Rotations
from .sparsify import SCORES, Sparsity, SparsityConfig, attach_sites, per_layer, site_weight_norms

CHECKSUMS = "larosa_checksums.json"


class FoldedDecoderLayer(nn.Module):
    """A standard HF decoder layer (same children, same weight names) plus the residual adapters of its scope."""

    def __init__(self, layer: nn.Module, hidden: int, mid_adapter: bool, out_adapter: bool):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        self.mid_adapter = nn.Linear(hidden, hidden, bias=False) if mid_adapter else None
        self.out_adapter = nn.Linear(hidden, hidden, bias=False) if out_adapter else None

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        h = hidden_states
        h = h + self.self_attn(hidden_states=self.input_layernorm(h), **kwargs)[0]
        if self.mid_adapter is not None:
            h = self.mid_adapter(h)
        h = h + self.mlp(self.post_attention_layernorm(h))
        if self.out_adapter is not None:
            h = self.out_adapter(h)
        return h


class FoldedCausalLM:
    """Mixin for a family's ``*ForCausalLM``: builds the folded structure from ``config.larosa``.

    Loading is strict: a weight the config does not expect, or one it expects and the files lack, is an error
    (transformers would otherwise initialise it at random and go on), and weight files are checked against the
    checksums written with them.
    """

    def __init__(self, config):
        super().__init__(config)
        settings = config.larosa
        scope, layers = settings["scope"], self.model.layers
        configs = folded_sparsity(settings, len(layers))
        adapter = adapter_for(self)
        dims = adapter.dims
        sizes = {"attn_in": dims.hidden, "o_in": dims.n_heads * dims.head_dim, "mlp_in": dims.hidden,
                 "down_in": dims.intermediate}
        for i, layer in enumerate(layers):
            layers[i] = FoldedDecoderLayer(
                layer, config.hidden_size, mid_adapter=scope == "block",
                out_adapter=scope != "global" and i < len(layers) - 1,
            )
            # Weight-aware scores are saved with the weights (loaded over these placeholders).
            scales = {s: torch.ones(n) for s, n in sizes.items()} if settings.get("score") == "weight" else None
            attach_sites(adapter, layers[i], configs[i], scales=scales)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        if Path(path).is_dir():
            verify_checksums(Path(path))
        asked = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise LarosaError(f"{path}: weights do not match the folded config: {bad}")
        return (model, info) if asked else model


def folded_sparsity(settings: dict, n_layers: int) -> list[SparsityConfig]:
    """The per-layer sparsity a folded config carries: one config for all layers, or a searched plan."""
    if settings.get("sparsity_per_layer"):
        return per_layer([SparsityConfig(**c) for c in settings["sparsity_per_layer"]], n_layers)
    return per_layer(SparsityConfig(**settings["sparsity"]), n_layers)


def verify_checksums(path: Path) -> None:
    sums = path / CHECKSUMS
    if not sums.exists():
        raise LarosaError(f"{path} has no {CHECKSUMS}; it was not written by larosa sparsify, or not completely")
    for name, want in json.loads(sums.read_text()).items():
        file = path / name
        if not file.exists():
            raise LarosaError(f"{path}: {name} is missing")
        if sha256(file) != want:
            raise LarosaError(f"{path}: {name} is corrupted or truncated (sha256 differs from {CHECKSUMS})")


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype)
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().cpu()


@dataclass
class _Folding:
    """The folding of one model, checked once and applied a part at a time: :func:`fold` applies it to a model in
    RAM, :func:`fold_streamed` to one layer at a time read from disk. All products are taken in float64 and cast
    back to the model's dtype once."""

    adapter: Adapter
    rotations: Rotations
    configs: list[SparsityConfig]
    # (Q_attn, Q_mlp) per layer as stored, made float64 where used: a float64 copy of every layer's Q up front
    # would take 86 GB on a 70B model.
    qs: list[tuple[torch.Tensor, torch.Tensor]]
    scope: str
    head_rotation: bool
    score: str

    @classmethod
    def of(cls, model: nn.Module, rotations: Rotations, sparsity: Sparsity, scope: str, head_rotation: bool,
           score: str) -> _Folding:
        adapter = adapter_for(model)
        if adapter.folded is None:
            raise LarosaError(f"folding is not implemented for {model.config.model_type!r}")
        if model.config.model_type.startswith("larosa_"):
            raise LarosaError("this model is already folded")
        if score not in SCORES:
            raise LarosaError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        configs = per_layer(sparsity, len(adapter.layers()))
        rotations.check_model(model)
        if rotations.signal != "gainfree":
            warnings.warn("these rotations come from the gain-included signal, but folded Top-K sees the gain-free "
                          "one; calibrate with signal='gainfree' (--signal gainfree): on SmolLM2 at 40 % the "
                          "gain-included Q measured 28.4 PPL against 24.2", stacklevel=3)
        return cls(adapter, rotations, configs, rotations.for_scope(scope), scope, head_rotation, score)

    def embedding(self, weight: torch.Tensor) -> torch.Tensor:
        """The input embedding, in the first layer's attention basis."""
        return (_f64(weight) @ self.qs[0][0].double()).to(weight.dtype)

    def head(self, weight: torch.Tensor, final_norm: nn.Module) -> torch.Tensor:
        """The LM head with the final norm's gain and the last basis folded in; the gain is set to 1."""
        folded = (_f64(weight) * _f64(final_norm.weight) @ self.qs[-1][1].double()).to(weight.dtype)
        final_norm.weight.fill_(1.0)
        return folded

    def layer(self, i: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Fold decoder layer ``i`` in place; returns what the folded layer holds beyond its own weights (residual
        adapters, weight-aware scores), named relative to the layer."""
        adapter, dims = self.adapter, self.adapter.dims
        q_attn, q_mlp = (q.double() for q in self.qs[i])
        # Attention: gain and Q into q/k/v inputs; Q back out of o_proj's output.
        gain = _f64(adapter.attn_norm(layer).weight)
        for lin in adapter.qkv(layer):
            _set(lin, _f64(lin.weight) * gain @ q_attn)
        adapter.attn_norm(layer).weight.fill_(1.0)
        o = adapter.o_proj(layer)
        o_weight = _f64(o.weight)
        if self.head_rotation:
            v = adapter.qkv(layer)[2]
            r = self.rotations.q(f"layers.{i}.heads").double()  # [n_kv, hd, hd]
            hd, group = dims.head_dim, dims.n_heads // dims.n_kv_heads
            v_weight = _f64(v.weight).view(dims.n_kv_heads, hd, -1)
            v_bias = None if v.bias is None else (_f64(v.bias).view(dims.n_kv_heads, 1, hd) @ r).flatten()
            _set(v, (r.transpose(1, 2) @ v_weight).flatten(0, 1), v_bias)
            o_cols = o_weight.view(-1, dims.n_kv_heads, group, hd)
            o_weight = torch.einsum("dgmh,ghk->dgmk", o_cols, r).flatten(1)
        _set(o, q_attn.T @ o_weight, None if o.bias is None else _f64(o.bias) @ q_attn)
        # MLP: the same with Q_mlp.
        gain = _f64(adapter.mlp_norm(layer).weight)
        for lin in adapter.gate_up(layer):
            _set(lin, _f64(lin.weight) * gain @ q_mlp)
        adapter.mlp_norm(layer).weight.fill_(1.0)
        down = adapter.down_proj(layer)
        _set(down, q_mlp.T @ _f64(down.weight), None if down.bias is None else _f64(down.bias) @ q_mlp)

        # Residual adapters, as y = x Wᵀ: W = (Q_fromᵀ Q_to)ᵀ = Q_toᵀ Q_from.
        extra = {}
        if self.scope == "block":
            extra["mid_adapter.weight"] = q_mlp.T @ q_attn
        if self.scope != "global" and i + 1 < len(self.qs):
            extra["out_adapter.weight"] = self.qs[i + 1][0].double().T @ q_mlp
        if self.score == "weight":  # norms of the folded weight rows: the basis and gain Top-K sees
            for site, norms in site_weight_norms(adapter, layer).items():
                extra[f"larosa_sites.{site}.scale"] = norms
        return extra

    def config(self, model: nn.Module) -> PretrainedConfig:
        """The folded model's config: the dense one untied, with the sparsity and how it was folded."""
        configs = self.configs
        uniform = all(c == configs[0] for c in configs)
        settings = {
            "sparsity": configs[0].to_dict() if uniform else None,
            "sparsity_per_layer": None if uniform else [c.to_dict() for c in configs],
            "score": self.score,
            "scope": self.scope,
            "head_rotation": self.head_rotation,
            "signal": self.rotations.signal,
            "rotations": {k: v for k, v in self.rotations.meta.items() if k != "weights_fingerprint"},
            "larosa_version": __version__,
        }
        config_dict = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
        return self.adapter.folded.config_class(**{**config_dict, "tie_word_embeddings": False, "larosa": settings})


@torch.no_grad()
def fold(
    model: nn.Module,
    rotations: Rotations,
    sparsity: Sparsity = 0.4,
    *,
    scope: str = "global",
    head_rotation: bool = False,
    score: str = "magnitude",
) -> nn.Module:
    """A new folded model from ``model`` (whose weights are changed in place and should be discarded).

    All products are taken in float64 and cast back to the model's dtype once. The default scope is ``global``:
    no residual adapters and, on SmolLM2, the best folded perplexity at 25 and 40 % (benchmarks/RESULTS-ppl.md).
    """
    folding = _Folding.of(model, rotations, sparsity, scope, head_rotation, score)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    dtype, device = emb.weight.dtype, emb.weight.device
    head_weight = folding.head(head.weight, folding.adapter.final_norm())  # before the embedding: may be one tensor
    emb.weight = nn.Parameter(folding.embedding(emb.weight))
    head.weight = nn.Parameter(head_weight)
    extra = {}
    for i, layer in enumerate(folding.adapter.layers()):
        extra.update({f"model.layers.{i}.{k}": v for k, v in folding.layer(i, layer).items()})
    with no_init_weights(), torch.device(device):
        folded = folding.adapter.folded(folding.config(model)).to(dtype)
    folded.load_state_dict({k: v.to(dtype) for k, v in {**model.state_dict(), **extra}.items()}, strict=True)
    return folded.eval()


@torch.no_grad()
def fold_streamed(
    model: nn.Module,
    rotations: Rotations,
    sparsity: Sparsity,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    scope: str = "global",
    head_rotation: bool = False,
    score: str = "magnitude",
    overwrite: bool = False,
) -> PretrainedConfig:
    """:func:`fold` then :func:`save_folded`, one part of the model at a time; returns the folded config.

    Meant for a model from :func:`larosa.models.load_lazy`: each decoder layer is read from disk, folded on the
    CPU and written as its own safetensors shard before the next is read, so memory holds about one layer (or the
    embedding, or the head), not the model. The directory holds the same tensors as :func:`save_folded` writes.
    """
    folding = _Folding.of(model, rotations, sparsity, scope, head_rotation, score)
    adapter = folding.adapter
    emb, head, final_norm = model.get_input_embeddings(), model.get_output_embeddings(), adapter.final_norm()
    dtype = emb.weight.dtype
    names = {m: name for name, m in model.named_modules()}
    with torch.device("meta"):  # the folded structure, for its config files and the names the shards must hold
        skeleton = adapter.folded(folding.config(model)).to(dtype)
    n_shards = len(adapter.layers()) + 2
    weight_map: dict[str, str] = {}
    shards: list[str] = []

    def write(staged: Path, tensors: dict[str, torch.Tensor]) -> None:
        shards.append(f"model-{len(shards) + 1:05d}-of-{n_shards:05d}.safetensors")
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, staged / shards[-1],
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shards[-1]))

    with _staged(out, overwrite) as staged:
        # config.json and generation_config.json only; first, as it deletes weight files it did not write
        skeleton.save_pretrained(staged, state_dict={})
        with resident(model, emb, "cpu"):
            write(staged, {f"{names[emb]}.weight": folding.embedding(emb.weight)})
        for i, layer in enumerate(adapter.layers()):
            prefix = f"{names[layer]}."
            with resident(model, layer, "cpu"):
                extra = folding.layer(i, layer)  # first: the state dict holds the folded weights only after it
                write(staged, {**layer.state_dict(prefix=prefix), **{prefix + k: v for k, v in extra.items()}})
        # A tied head is the embedding (a lazy model's lm_head is never loaded).
        source = emb if model.config.tie_word_embeddings else head
        with resident(model, final_norm, "cpu"), resident(model, source, "cpu"):
            write(staged, {f"{names[head]}.weight": folding.head(source.weight, final_norm),
                           **final_norm.state_dict(prefix=f"{names[final_norm]}.")})
        want = skeleton.state_dict()
        if weight_map.keys() != want.keys():
            raise LarosaError(f"folded tensors do not match the folded structure: {set(weight_map) ^ set(want)}")
        total = sum(t.numel() * t.element_size() for t in want.values())
        (staged / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
    return skeleton.config


@contextmanager
def _staged(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A directory to write a folded model into, next to ``out``: checksummed and renamed into place when the block
    ends, removed if it fails, so ``out`` is never half-written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LarosaError(f"{out} exists; choose another directory or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staged
        sums = {p.name: sha256(p) for p in sorted(staged.glob("*.safetensors"))}
        (staged / CHECKSUMS).write_text(json.dumps(sums, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def save_folded(model: nn.Module, tokenizer, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a loadable directory atomically: staged next to ``out``, checksummed, then renamed into place."""
    with _staged(out, overwrite) as staged:
        model.save_pretrained(staged)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
    return Path(out)
