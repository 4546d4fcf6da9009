"""Layer-by-layer calibration: the second moment XᵀX of each block's input, then PCA rotations.

Only one decoder layer's weights sit on the compute device at a time, with the calibration hidden states; the
rest of the model stays where it was loaded (CPU RAM). Each layer reads the dense output of the layer before,
as the paper does.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .adapters import Adapter, adapter_for
from .data import token_windows
from .models import default_device
from .rotations import BLOCKS, Rotations, config_hash, pca_rotation, weights_fingerprint


def _first_layer_inputs(adapter: Adapter, windows: torch.Tensor, device: torch.device):
    """Hidden states entering layer 0 for every window, and the other arguments each layer is called with.

    Runs the model's own forward with every layer replaced by a recorder that passes its input through, so
    masks and rotary tables are exactly what the model builds for itself, for any architecture.
    """
    layers = adapter.layers()
    body = adapter.body()
    hidden: list[torch.Tensor] = []
    calls: list[tuple | None] = [None for _ in layers]

    def recorder(i: int):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                hidden.append(hidden_states)
            if calls[i] is None:
                calls[i] = (args, kwargs)
            return hidden_states

        return forward

    others = [m for m in body.children() if m is not layers]
    homes = [next(m.parameters(), next(m.buffers(), None)) for m in others]
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for m in others:
            m.to(device)
        for w in windows:
            body(input_ids=w[None].to(device), use_cache=False)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for m, home in zip(others, homes):
            if home is not None:
                m.to(home.device)
    return torch.cat(hidden), calls


class SecondMoment:
    """Running XᵀX over tokens in float64: sums of outer products lose digits in float32 over many tokens."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None
        self.tokens = 0

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> None:
        x = output.reshape(-1, output.shape[-1]).double()
        self.xtx = x.T @ x if self.xtx is None else self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: str | torch.Tensor,
    *,
    tokenizer=None,
    n_windows: int = 16,
    seq_len: int = 2048,
    device: str | None = None,
    progress: bool = True,
) -> Rotations:
    """PCA rotations for every layer's attention and MLP inputs.

    ``data`` is a text spec (needs ``tokenizer``; see :mod:`larosa.data`) or a ``[n, seq_len]`` token tensor.
    The rotated signal is the norm's output with its gain, as in the paper's reference code.
    """
    adapter = adapter_for(model)
    if isinstance(data, str):
        windows, spec = token_windows(tokenizer, data, n_windows, seq_len), data
    else:
        windows, spec = data, f"tensor[{data.shape[0]}x{data.shape[1]}]"
    device = torch.device(device or default_device())
    start = time.perf_counter()

    hidden, layer_calls = _first_layer_inputs(adapter, windows, device)
    q: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    eigvals: dict[str, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    layers = adapter.layers()
    for i, layer in enumerate(tqdm(layers, desc="calibrating", unit="layer", disable=not progress)):
        home = next(layer.parameters()).device
        layer.to(device)
        moments = {b: SecondMoment() for b in BLOCKS}
        handles = [
            adapter.attn_norm(layer).register_forward_hook(moments["attn"].hook),
            adapter.mlp_norm(layer).register_forward_hook(moments["mlp"].hook),
        ]
        try:
            for j in range(hidden.shape[0]):
                args, kwargs = layer_calls[i]
                out = layer(hidden[j : j + 1], *args, **kwargs)
                hidden[j] = out[0] if isinstance(out, tuple) else out
        finally:
            for h in handles:
                h.remove()
            layer.to(home)
        for b in BLOCKS:
            rot, ev = pca_rotation(moments[b].xtx)
            q[b].append(rot.cpu())
            eigvals[b].append(ev.cpu())

    dims = adapter.dims
    meta = {
        "model": str(getattr(model.config, "name_or_path", "") or model.config.model_type),
        "model_type": model.config.model_type,
        "config_hash": config_hash(model.config),
        "weights_fingerprint": weights_fingerprint(model),
        "hidden_size": str(dims.hidden),
        "num_layers": str(dims.n_layers),
        "signal": "norm_output_with_gain",
        "data": spec,
        "windows": str(windows.shape[0]),
        "seq_len": str(windows.shape[1]),
        "tokens": str(windows.numel()),
        "seconds": f"{time.perf_counter() - start:.1f}",
        "larosa_version": __version__,
    }
    return Rotations(q, eigvals, meta)
