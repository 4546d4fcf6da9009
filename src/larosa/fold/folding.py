"""Folding: norm gains and rotations into the weights (the paper's Fig. 2), in one of two forms.

``residual``: the residual stream of layer l is carried in basis Q_l, so no block input is rotated at run time;
Top-K runs directly on the gain-free norm output. The only online rotation left is a d x d residual adapter where
the basis changes: none for the ``global`` scope, one per layer for ``layer``, two for ``block``. The equations are
in docs/method.md.

``input``: the residual stream stays in the model's basis and each block's normed input n(h) is transformed by one
d x d matrix, diag(g) Q for Q of the gain-included signal (Q alone for the gain-free one, whose gain goes into the
weights); the block's input projections absorb Q (W Q). Top-K then sees exactly what simulate mode's sites see,
whatever the signal and scope, at the cost of two d x d products a layer.

A model larger than RAM is folded and written one layer at a time by :func:`fold_streamed`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig
from transformers.initialization import no_init_weights

from ..arch import Adapter, adapter_for
from ..errors import LarosaError
from ..io import staged_dir
from ..models import nonfinite, resident
from ..rotations import Rotations
from ..sparsity import sites
from ..sparsity.levels import SparsityConfig
from ..sparsity.peers import teal_thresholds
from ..sparsity.topk import LaRoSaConfig, weight_norms
from .hf import folded_class
from .schema import FoldedSettings


def default_form(family: type[Adapter], rotations: Rotations) -> str:
    """The residual form (no adapters in global scope) where it folds exactly; else the input form: a family
    whose blocks normalise their outputs with a gain (Gemma 3), or rotations of the weighted objective."""
    return "residual" if family.rotatable_residual and rotations.objective == "pca" else "input"


def check_form(family: type[Adapter], form: str) -> None:
    """The residual form carries the residual stream in a rotated basis, which a family with gained norms on its
    blocks' outputs does not allow (:attr:`Adapter.rotatable_residual`); the input form folds every family."""
    if form == "residual" and not family.rotatable_residual:
        raise LarosaError(f"{family.model_types[0]} normalises each block's output with a gained RMSNorm before the "
                          "residual add, so its residual stream cannot be rotated and the residual form cannot fold "
                          "it: fold it in the input form (--form input; form='input' in Python)")


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
    config: LaRoSaConfig
    levels: list[SparsityConfig]
    # (Q_attn, Q_mlp) per layer as stored, made float64 where used: a float64 copy of every layer's Q up front
    # would take 86 GB on a 70B model.
    qs: list[tuple[torch.Tensor, torch.Tensor]]
    # A weighted objective's (n_attn, n_mlp) per layer (see larosa.rotations.OBJECTIVES); None for plain PCA.
    ns: list[tuple[torch.Tensor, torch.Tensor]] | None

    @classmethod
    def of(cls, model: nn.Module, config: LaRoSaConfig) -> _Folding:
        if config.mode != "folded":
            raise LarosaError("fold takes a LaRoSa config with mode='folded'")
        if getattr(model.config, "larosa", None) is not None:
            raise LarosaError("this model is already folded")
        adapter = adapter_for(model)
        folded_class(type(adapter))  # an architecture that cannot be folded fails here
        config = replace(config, form=config.form or default_form(type(adapter), config.rotations))
        check_form(type(adapter), config.form)
        config.check_model(model)
        if config.rotations.signal != "gainfree" and config.form == "residual":
            warnings.warn("these rotations come from the gain-included signal, but the folded model's sites see the "
                          "gain-free one; calibrate with signal='gainfree' (--signal gainfree): on SmolLM2 at 40 % the "
                          "gain-included Q measured 28.4 PPL against 24.2", stacklevel=4)
        scope = config.resolved_scope
        return cls(adapter, config, config.levels(adapter.dims), config.rotations.for_scope(scope),
                   config.rotations.norms_for_scope(scope))

    @property
    def scope(self) -> str:
        return self.config.resolved_scope

    @property
    def form(self) -> str:
        return self.config.form

    def embedding(self, weight: torch.Tensor) -> torch.Tensor:
        """The input embedding, in the first layer's attention basis (the model's own in the input form)."""
        if self.form == "input":
            return weight.detach().clone()
        return (_f64(weight) @ self.qs[0][0].double()).to(weight.dtype)

    def head(self, weight: torch.Tensor, final_norm: nn.Module) -> torch.Tensor:
        """The LM head with the final norm's gain and the last basis folded in; the gain is set to 1 (the input
        form's residual is in the model's basis: the head and the norm stay)."""
        if self.form == "input":
            return weight.detach().clone()
        folded = (_f64(weight) * _f64(self.adapter.gain(final_norm)) @ self.qs[-1][1].double()).to(weight.dtype)
        self.adapter.set_gain(final_norm, 1.0)
        return folded

    def _block_input(self, norm: nn.Module, linears, q: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor | None:
        """Gain and Q into the projections that read a block's input; the norm's gain is set to 1 (in the input
        form, to 0 where it was 0, as the gain-free signal has it: larosa.calibrate). Returns the input form's
        transform of the normed input (as a Linear weight), None in the residual form. A weighted objective's n
        scales the transform by n and the weights by 1/n."""
        gain = _f64(self.adapter.gain(norm))
        in_signal = self.form == "input" and self.config.rotations.signal == "gain"  # the transform keeps the gain
        scale = torch.ones_like(gain) if in_signal else gain
        if n is not None:
            scale = scale / n.double()
        for lin in linears:
            _set(lin, _f64(lin.weight) * scale @ q)
        if self.form == "residual":
            self.adapter.set_gain(norm, 1.0)
            return None
        self.adapter.set_gain(norm, (gain != 0).to(torch.float32))
        row = gain if in_signal else torch.ones_like(gain)  # z = n(h) diag(g) Q  (or n(h) Q), times diag(n)
        if n is not None:
            row = row * n.double()
        return (row[:, None] * q).T

    def layer(self, i: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Fold decoder layer ``i`` in place; returns what the folded layer holds beyond its own weights (residual
        adapters, weight-aware scores), named relative to the layer."""
        adapter, dims = self.adapter, self.adapter.dims
        q_attn, q_mlp = (q.double() for q in self.qs[i])
        n_attn, n_mlp = self.ns[i] if self.ns is not None else (None, None)
        residual = self.form == "residual"
        extra = {}
        # Attention: gain and Q into q/k/v inputs; in the residual form, Q back out of o_proj's output.
        transform = self._block_input(adapter.attn_norm(layer), adapter.qkv(layer), q_attn, n_attn)
        if transform is not None:
            extra["attn_transform.weight"] = transform
        o = adapter.o_proj(layer)
        o_weight = _f64(o.weight)
        if self.config.head_rotation:
            v, rows = adapter.projection(layer, "v")  # v's rows of its Linear (a fused one holds q and k too)
            r = self.config.rotations.q(f"layers.{i}.heads").double()  # [n_kv, hd, hd]
            hd, group = dims.head_dim, dims.n_heads // dims.n_kv_heads
            weight = _f64(v.weight).clone()
            weight[rows] = (r.transpose(1, 2) @ weight[rows].view(dims.n_kv_heads, hd, -1)).flatten(0, 1)
            bias = None if v.bias is None else _f64(v.bias).clone()
            if bias is not None:
                bias[rows] = (bias[rows].view(dims.n_kv_heads, 1, hd) @ r).flatten()
            _set(v, weight, bias)
            o_cols = o_weight.view(-1, dims.n_kv_heads, group, hd)
            o_weight = torch.einsum("dgmh,ghk->dgmk", o_cols, r).flatten(1)
        if residual:
            _set(o, q_attn.T @ o_weight, None if o.bias is None else _f64(o.bias) @ q_attn)
        else:
            _set(o, o_weight)
        # MLP: the same with Q_mlp.
        transform = self._block_input(adapter.mlp_norm(layer), adapter.gate_up(layer), q_mlp, n_mlp)
        if transform is not None:
            extra["mlp_transform.weight"] = transform
        if residual:
            down = adapter.down_proj(layer)
            _set(down, q_mlp.T @ _f64(down.weight), None if down.bias is None else _f64(down.bias) @ q_mlp)
            # Residual adapters, as y = x Wᵀ: W = (Q_fromᵀ Q_to)ᵀ = Q_toᵀ Q_from.
            if self.scope == "block":
                extra["mid_adapter.weight"] = q_mlp.T @ q_attn
            if self.scope != "global" and i + 1 < len(self.qs):
                extra["out_adapter.weight"] = self.qs[i + 1][0].double().T @ q_mlp
        if self.config.resolved_score == "weight":  # norms of the folded weight rows: the basis and gain Top-K sees
            for site, norms in weight_norms(adapter, layer).items():
                extra[f"{sites.ATTR}.{site}.scale"] = norms
        return extra

    def folded_config(self, model: nn.Module) -> PretrainedConfig:
        """The folded model's config: the dense one untied, with the sparsity and how it was folded."""
        rotations = self.config.rotations
        config = self.config
        settings = FoldedSettings(
            levels=tuple(self.levels), scope=self.scope, score=config.resolved_score,
            head_rotation=config.head_rotation, signal=rotations.signal,
            rotations={k: v for k, v in rotations.meta.items() if k not in ("weights_fingerprint", "plans")},
            select=config.select if config.thresholds is not None else "topk", thresholds=config.thresholds,
            form=config.form,
        )
        config_dict = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
        config_class = folded_class(type(self.adapter)).config_class
        return config_class(**{**config_dict, "tie_word_embeddings": False, "larosa": settings.to_dict()})


@torch.no_grad()
def fold(model: nn.Module, config: LaRoSaConfig) -> nn.Module:
    """A new folded model from ``model`` (whose weights are changed in place and should be discarded).

    All products are taken in float64 and cast back to the model's dtype once. The default scope is ``global``:
    no residual adapters and, on SmolLM2, the best folded perplexity at 25 and 40 % (benchmarks/RESULTS-ppl.md).
    """
    folding = _Folding.of(model, config)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    dtype, device = emb.weight.dtype, emb.weight.device
    head_weight = folding.head(head.weight, folding.adapter.final_norm())  # before the embedding: may be one tensor
    emb.weight = nn.Parameter(folding.embedding(emb.weight))
    head.weight = nn.Parameter(head_weight)
    names = {m: name for name, m in model.named_modules()}
    extra = {}
    for i, layer in enumerate(folding.adapter.layers()):
        extra.update({f"{names[layer]}.{k}": v for k, v in folding.layer(i, layer).items()})
    with no_init_weights(), torch.device(device):
        folded = folded_class(type(folding.adapter))(folding.folded_config(model)).to(dtype)
    folded.load_state_dict({k: v.to(dtype) for k, v in {**model.state_dict(), **extra}.items()}, strict=True)
    _check_finite(nonfinite(folded))
    return folded.eval()


@torch.no_grad()
def rotated(model: nn.Module, rotations: Rotations) -> nn.Module:
    """A new model of ``model``'s own family whose residual stream is in the basis of one gain-free Q: the folded
    global residual form at sparsity 0 (norm gains in the weights, no adapters, the same logits), as a plain
    model with unit norm gains, for a method that sits on a dense model (TEAL's thresholds then rank rotated
    inputs). ``model``'s weights are changed in place and should be discarded."""
    family = type(adapter_for(model))
    if not family.rotatable_residual:
        raise LarosaError(f"{family.model_types[0]} normalises each block's output with a gained RMSNorm before the "
                          "residual add, so its residual stream cannot be rotated: use TEAL on it without rotations, "
                          "or LaRoSa's input form (select='topk' or 'threshold'; --select topk|threshold)")
    folded = fold(model, LaRoSaConfig(rotations, sparsity=0.0, scope="global", mode="folded", form="residual"))
    drop = ("larosa", "model_type", "architectures")
    config = type(model.config)(**{k: v for k, v in folded.config.to_dict().items() if k not in drop})
    emb = folded.get_input_embeddings().weight
    with no_init_weights(), torch.device(emb.device):
        plain = type(model)(config).to(emb.dtype)
    state, own = folded.state_dict(), plain.state_dict()
    gains = [k for k in own if k not in state]  # the folded model's norms carry no gain
    if not all(k.endswith("norm.weight") for k in gains):
        raise LarosaError(f"the rotated model lacks weights that are not norm gains: {gains}")
    plain.load_state_dict({**{k: torch.ones_like(own[k]) for k in gains}, **state}, strict=True)
    return plain.eval()


@torch.no_grad()
def weight_scaled(model: nn.Module) -> nn.Module:
    """``model`` with entry i of every projection input multiplied by the norm of the weight column it meets, and
    that column divided by it: the same function, whose thresholds on |x_i| then rank |x_i| ||W_:,i|| (weight-aware
    scores, as WINA's), at no run-time cost. The scales go where a linear map makes the input: the norm gains
    before q|k|v and gate|up (their columns' joint norms), v's rows before o_proj (one per KV head, the RMS over the
    query heads that share it), up's rows before down_proj. In place (weights change, logits up to rounding)."""
    adapter = adapter_for(model)
    d = adapter.dims
    group = d.n_heads // d.n_kv_heads

    def safe(norms: torch.Tensor) -> torch.Tensor:  # a column of zeros keeps scale 1
        return torch.where(norms > 0, norms, torch.ones_like(norms))

    def scale_rows(linear: nn.Linear, rows: slice, s: torch.Tensor) -> None:
        w = linear.weight.detach().double()
        w[rows] *= s[:, None].to(w.device)
        bias = None
        if linear.bias is not None:
            bias = linear.bias.detach().double()
            bias[rows] *= s.to(bias.device)
        _set(linear, w, bias)

    def scale_columns(linears, s: torch.Tensor) -> None:
        for linear in linears:
            _set(linear, linear.weight.detach().double() / s.to(linear.weight.device))

    for layer in adapter.layers():
        norms = weight_norms(adapter, layer)
        o = safe(norms["o_in"]).view(d.n_kv_heads, group, d.head_dim)
        v = o.square().mean(1).sqrt()  # [n_kv, head_dim]: what v's rows can carry for the heads that read them
        scale_rows(*adapter.projection(layer, "v"), v.flatten())
        scale_columns([adapter.o_proj(layer)], v[:, None].expand_as(o).flatten())
        down = safe(norms["down_in"])
        scale_rows(*adapter.projection(layer, "up"), down)
        scale_columns([adapter.down_proj(layer)], down)
        norms = weight_norms(adapter, layer)  # v's and up's rows changed the block inputs' columns
        for norm, linears, name in ((adapter.attn_norm(layer), adapter.qkv(layer), "attn_in"),
                                    (adapter.mlp_norm(layer), adapter.gate_up(layer), "mlp_in")):
            s = safe(norms[name])
            gain = adapter.gain(norm).double()
            adapter.set_gain(norm, gain * s.to(gain.device))
            scale_columns(linears, s)
    return model


def _check_finite(bad: str | None) -> None:
    if bad is not None:
        raise LarosaError(f"the folded {bad} holds NaN or Inf, so nothing was written: the model's weights are not "
                          "finite (larosa eval ppl names the broken one), or overflow in its dtype (use a wider "
                          "--dtype)")


@torch.no_grad()
def fold_streamed(model: nn.Module, config: LaRoSaConfig, out: str | os.PathLike, *, tokenizer=None,
                  overwrite: bool = False) -> PretrainedConfig:
    """:func:`fold` then :func:`save_folded`, one part of the model at a time; returns the folded config.

    Meant for a model from :func:`larosa.models.load_lazy`: each decoder layer is read from disk, folded on the
    CPU and written as its own safetensors shard before the next is read, so memory holds about one layer (or the
    embedding, or the head), not the model. The directory holds the same tensors as :func:`save_folded` writes.
    """
    if config.select == "threshold" and config.thresholds is None or config.centre:
        raise LarosaError("a model folded layer by layer takes calibrated thresholds, not calibration windows, and no "
                          "centring; fold it in memory")
    folding = _Folding.of(model, config)
    adapter = folding.adapter
    emb, head, final_norm = model.get_input_embeddings(), model.get_output_embeddings(), adapter.final_norm()
    dtype = emb.weight.dtype
    names = {m: name for name, m in model.named_modules()}
    with torch.device("meta"):  # the folded structure, for its config files and the names the shards must hold
        skeleton = folded_class(type(adapter))(folding.folded_config(model)).to(dtype)
    n_shards = len(adapter.layers()) + 2
    weight_map: dict[str, str] = {}
    shards: list[str] = []

    def write(staged: Path, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        _check_finite(next((k for k, v in tensors.items() if not torch.isfinite(v).all()), None))
        shards.append(f"model-{len(shards) + 1:05d}-of-{n_shards:05d}.safetensors")
        save_file(tensors, staged / shards[-1], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shards[-1]))

    with staged_dir(out, overwrite) as staged:
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


def save_folded(model: nn.Module, tokenizer, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a loadable directory atomically: staged next to ``out``, checksummed, then renamed into place
    (``overwrite`` replaces only a directory larosa wrote). A folded model, or a TEAL-sparsified one: that saves
    as its family's larosa type, whose loading puts the thresholds back (never the dense model by mistake)."""
    state = sites.settings(model) or {}
    teal = teal_thresholds(model) is not None
    if state.get("mode") == "simulate" and not teal:
        raise LarosaError(f"{state['method']}'s simulated sites are hooks a checkpoint would not keep (it would load "
                          "dense); fold the model first, or save a TEAL one")
    with staged_dir(out, overwrite) as staged:
        model.save_pretrained(staged)
        if teal and getattr(model.config, "larosa", None) is None:  # still the family's own type: retype it
            path = Path(staged) / "config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
            cls = folded_class(type(adapter_for(model)))
            config.update(model_type=cls.config_class.model_type, architectures=[cls.__name__], larosa=state)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
    return Path(out)
