"""Layer-by-layer calibration: the second moment XᵀX of each block's input, then PCA rotations.

Only one decoder layer's weights sit on the compute device at a time, with the calibration hidden states; the
rest of the model stays where it was loaded: in CPU RAM, or on disk for a model from
:func:`larosa.models.load_lazy` (a 70B model in bf16 needs ~2 GB of GPU memory per layer then, not 140 GB of RAM).
Each layer reads the dense output of the layer before, as the paper does.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .arch import adapter_for
from .data import token_windows
from .errors import LarosaError
from .rotations import OBJECTIVES, SIGNALS, Rotations, config_hash, pca_rotation, weights_fingerprint
from .streaming import advance, passes
from .version import __version__


class SecondMoment:
    """Running XᵀX over tokens in float64 (sums of outer products lose digits in float32 over many tokens).

    With ``groups``, the last dimension is cut into ``groups`` x ``members`` x ``width`` and one ``width``-square
    moment is kept per group, pooling its members: the o_proj input per KV group of query heads.
    """

    def __init__(self, groups: int | None = None, members: int = 1) -> None:
        self.groups, self.members = groups, members
        self.xtx: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.groups is None:
            x = x.reshape(-1, x.shape[-1])
            xtx = x.T @ x
        else:
            x = x.reshape(-1, self.groups, self.members, x.shape[-1] // (self.groups * self.members))
            x = x.transpose(0, 1).reshape(self.groups, -1, x.shape[-1])
            xtx = x.transpose(1, 2) @ x
        self.xtx = xtx if self.xtx is None else self.xtx.add_(xtx)


def _row_norms(linears, gain: torch.Tensor | None) -> torch.Tensor:
    """Per input coordinate, the norm of the weight row it multiplies across ``linears`` (times its gain where the
    signal leaves the gain out), floored so that no coordinate's scale is 0."""
    w = torch.cat([lin.weight.detach().double().cpu() for lin in linears])
    norms = w.norm(dim=0) * (gain.double().abs() if gain is not None else 1.0)
    return norms.clamp_min(1e-6 * float(norms.mean()))


def _gain_free(h: torch.Tensor, eps: float, kept: torch.Tensor) -> torch.Tensor:
    """n(h), the RMS-normalised norm input without its gain, taken from the input (dividing the gained output by
    the gain fails where a gain is 0), and 0 where the gain is 0: no weight reads those coordinates (real Gemma 3
    270M has such gains in the MLP norms of 17 of its 18 layers), so they take no part in the ranking."""
    hf = h.float()
    return hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * kept


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: str | torch.Tensor,
    *,
    tokenizer=None,
    n_windows: int = 16,
    seq_len: int = 2048,
    signal: str = "gain",
    objective: str = "pca",
    device: str | None = None,
    progress: bool = True,
) -> Rotations:
    """PCA rotations of every layer's attention input, MLP input and o_proj input (per KV group), plus one
    global rotation of all block inputs pooled.

    ``data`` is a text spec (needs ``tokenizer``; see :mod:`larosa.data`) or a ``[n, seq_len]`` token tensor.
    ``signal="gain"`` takes X as the norm's output with its gain (the paper's reference code); ``"gainfree"``
    takes it without, which is what Top-K sees once the gains are folded into the weights. ``objective="weighted"``
    diagonalises diag(n) XᵀX diag(n) instead, n the norms of the weight rows each coordinate multiplies (see
    :data:`larosa.rotations.OBJECTIVES`); the norms are saved beside each Q.
    """
    if signal not in SIGNALS:
        raise LarosaError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    if objective not in OBJECTIVES:
        raise LarosaError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    adapter = adapter_for(model)
    dims = adapter.dims
    if isinstance(data, str):
        windows, spec = token_windows(tokenizer, data, n_windows, seq_len), data
    else:
        windows, spec = data, f"tensor[{data.shape[0]}x{data.shape[1]}]"
    start = time.perf_counter()
    fingerprint = weights_fingerprint(model)
    tensors: dict[str, torch.Tensor] = {}
    pooled = torch.zeros(dims.hidden, dims.hidden, dtype=torch.float64)
    eps = adapter.norm_eps()

    def taken(norm: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:  # the signal X of a norm's output
        return out if signal == "gain" else _gain_free(args[0], eps, (adapter.gain(norm) != 0).to(out.dtype))

    for i, layer, call, hidden in passes(model, windows, "calibrating", device, progress):
        moments = {"attn": SecondMoment(), "mlp": SecondMoment(),
                   "heads": SecondMoment(dims.n_kv_heads, dims.n_heads // dims.n_kv_heads)}
        handles = [
            adapter.attn_norm(layer).register_forward_hook(lambda m, a, out: moments["attn"].add(taken(m, a, out))),
            adapter.mlp_norm(layer).register_forward_hook(lambda m, a, out: moments["mlp"].add(taken(m, a, out))),
            adapter.o_proj(layer).register_forward_pre_hook(lambda m, a: moments["heads"].add(a[0])),
        ]
        advance(layer, call, hidden, [h.remove for h in handles], index=i)
        gains = {"attn": adapter.gain(adapter.attn_norm(layer)).cpu(),
                 "mlp": adapter.gain(adapter.mlp_norm(layer)).cpu()}
        linears = {"attn": adapter.qkv(layer), "mlp": adapter.gate_up(layer)}
        for block in ("attn", "mlp"):
            xtx = moments[block].xtx.cpu()
            if objective == "weighted":
                norms = _row_norms(linears[block], gains[block] if signal == "gainfree" else None)
                xtx = xtx * torch.outer(norms, norms)
                tensors[f"layers.{i}.{block}.norms"] = norms.float()
            pooled += xtx
            tensors[f"layers.{i}.{block}"], tensors[f"layers.{i}.{block}.eigvals"] = pca_rotation(xtx)
        tensors[f"layers.{i}.heads"], tensors[f"layers.{i}.heads.eigvals"] = pca_rotation(moments["heads"].xtx.cpu())
    tensors["global"], tensors["global.eigvals"] = pca_rotation(pooled)

    meta = {
        "model": str(getattr(model.config, "name_or_path", "") or model.config.model_type),
        "model_type": model.config.model_type,
        "config_hash": config_hash(model.config),
        "weights_fingerprint": fingerprint,
        "hidden_size": str(dims.hidden),
        "num_layers": str(dims.n_layers),
        "signal": signal,
        "objective": objective,
        "data": spec,
        "windows": str(windows.shape[0]),
        "seq_len": str(windows.shape[1]),
        "tokens": str(windows.numel()),
        "seconds": f"{time.perf_counter() - start:.1f}",
        "larosa_version": __version__,
    }
    return Rotations(tensors, meta)
