"""Layer-by-layer passes: the model's decoder layers visit the compute device one at a time, each reading what the
layer before it wrote for every window.

Calibration, streamed perplexity, the peers' thresholds and the per-layer search all run this way, so a model
larger than the GPU (or, from :func:`larosa.models.load_lazy`, than RAM) is processed with each weight read once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter, adapter_for
from .errors import LarosaError
from .models import check_context, check_device, default_device, nonfinite, resident

SAMPLE = 1 << 20  # |x| values kept per tap and layer: quantiles to ~1e-3, and cheap to sort
GREEDY_TOKENS = 4096  # calibration tokens a chooser measures layer output error on
# Centring: a per-coordinate offset of a signal, subtracted before entries are selected (the weights add W·offset
# back as a bias, free at run time): the dropped entries then stand at the offset, not at 0.
CENTRES = ("mean", "median")
CENTRE_TOKENS = 4096  # calibration tokens an offset is taken over

# (layer index, layer, its call arguments, sorted |samples| per tap (centred where offsets are), dense inputs of
# GREEDY_TOKENS tokens, the taps' centring offsets (none unless asked)) -> result
Chooser = Callable[[int, nn.Module, tuple, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]], object]
# (adapter, layer) -> (module to hook, how to read the signal from its (input, output))
Tap = Callable[[Adapter, nn.Module], tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]


def first_layer_inputs(adapter: Adapter, windows: torch.Tensor, device: torch.device):
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
    with contextlib.ExitStack() as stack:
        for m in others:
            stack.enter_context(resident(adapter.model, m, device))
        try:
            for i, layer in enumerate(layers):
                layer.forward = recorder(i)
            for w in windows:
                body(input_ids=w[None].to(device), use_cache=False)
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
        hidden = torch.cat(hidden)
        check_finite(hidden, "the embedding", body)
    return hidden, calls


def check_finite(x: torch.Tensor, what: str, module: nn.Module) -> None:
    """Raise when ``x``, what ``module`` gave, holds NaN or Inf, naming the weight that does if one does: going on
    would write rotations, a perplexity or a folded model from a broken model."""
    if bool(torch.isfinite(x).all()):
        return
    bad = nonfinite(module)
    cause = (f"its {bad} holds NaN or Inf (a broken checkpoint: download or save the model again)" if bad else
             f"its activations overflow in {x.dtype} (use a wider --dtype: bfloat16 or float32)")
    raise LarosaError(f"{what} gives NaN or Inf: {cause}")


def run_layer(layer: nn.Module, call: tuple, x: torch.Tensor) -> torch.Tensor:
    args, kwargs = call
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def advance(layer: nn.Module, call: tuple, hidden: torch.Tensor, cleanup: Iterable[Callable[[], object]] = (), *,
            index: int | None = None) -> None:
    """Every window's hidden state through ``layer`` (decoder layer ``index``), in place, one window at a time;
    the ``cleanup`` calls (removing hooks) run afterwards, also on error. A NaN or Inf in the output is an error."""
    try:
        for j in range(hidden.shape[0]):
            hidden[j] = run_layer(layer, call, hidden[j : j + 1])[0]
    finally:
        for undo in cleanup:
            undo()
    check_finite(hidden, "a decoder layer" if index is None else f"decoder layer {index}", layer)


def passes(model: nn.Module, windows: torch.Tensor, desc: str, device: str | torch.device | None, progress: bool):
    """Yield (i, layer, call, hidden) for each decoder layer with its weights resident on ``device``; ``hidden``
    holds every window's input to the layer, and the caller advances it (:func:`advance`) before the next."""
    adapter = adapter_for(model)
    check_context(model.config, windows.shape[1])
    device = torch.device(check_device(device) or default_device())
    hidden, calls = first_layer_inputs(adapter, windows, device)
    for i, layer in enumerate(tqdm(adapter.layers(), desc=desc, unit="layer", disable=not progress)):
        with resident(model, layer, device):
            yield i, layer, calls[i], hidden


class QuantileSample:
    """A random subsample of one tap's signal over the calibration tokens, for quantiles of its magnitude.

    torch.quantile refuses large inputs and a full sort of every token would not fit on the device for big
    models, so each window contributes a fixed number of random tokens (all of them when few; at least
    ``min_rows`` where a per-coordinate offset is taken over the same tokens).
    """

    def __init__(self, n_windows: int, generator: torch.Generator, min_rows: int = 1):
        self.n_windows, self.generator, self.min_rows = n_windows, generator, min_rows
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        rows = min(x.shape[0], max(self.min_rows, math.ceil(SAMPLE / (x.shape[1] * self.n_windows))))
        idx = torch.randperm(x.shape[0], generator=self.generator)[:rows].to(x.device)
        self.parts.append(x[idx].float())

    def offset(self, centre: str) -> torch.Tensor:
        return centre_of(torch.cat(self.parts), centre)

    def sorted(self, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The sampled |x| (|x - offset| where centred), sorted."""
        rows = torch.cat(self.parts)
        return (rows if offset is None else rows - offset).abs().flatten().sort().values.cpu()


class RowSample:
    """Random rows (tokens) of one signal over the calibration windows, a fixed number from each window: what a
    per-coordinate statistic (a mean, a median) is taken over."""

    def __init__(self, rows_per_window: int, generator: torch.Generator):
        self.rows, self.generator = rows_per_window, generator
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        idx = torch.randperm(x.shape[0], generator=self.generator)[: self.rows].to(x.device)
        self.parts.append(x[idx].float())

    def all(self) -> torch.Tensor:
        return torch.cat(self.parts)


def centre_of(rows: torch.Tensor, centre: str) -> torch.Tensor:
    """The per-coordinate ``centre`` ("mean" or "median") of ``rows`` ([tokens, d]): a centring offset."""
    return rows.mean(0) if centre == "mean" else rows.median(0).values


def quantile(values: torch.Tensor, level: float) -> float:
    """The threshold under which a share ``level`` of the sorted sample ``values`` lies: zeroing |x| below it
    drops that share; level 0 keeps everything."""
    if level <= 0.0:
        return 0.0
    return values[min(round(level * len(values)), len(values) - 1)].item()


@torch.no_grad()
def layerwise(model: nn.Module, windows: torch.Tensor, taps: dict[str, Tap], choose: Chooser, desc: str,
              device: str | None, progress: bool, centre: str | None = None) -> list:
    """Run the dense model layer by layer on ``windows``, sampling what ``taps`` read at each layer, and return
    ``choose``'s result for every layer; with ``centre`` ("mean" or "median") each tap's samples come centred on
    their per-coordinate offset, which ``choose`` is given too."""
    adapter = adapter_for(model)
    kept = max(1, min(len(windows), GREEDY_TOKENS // windows.shape[1]))
    generator = torch.Generator().manual_seed(0)
    results = []
    for i, layer, call, hidden in passes(model, windows, desc, device, progress):
        min_rows = math.ceil(CENTRE_TOKENS / len(windows)) if centre else 1
        samples = {name: QuantileSample(len(windows), generator, min_rows) for name in taps}
        handles = []
        for name, tap in taps.items():
            module, read = tap(adapter, layer)
            handles.append(module.register_forward_hook(
                lambda m, a, out, s=samples[name], read=read: s.add(read(a[0], out))))
        inputs = hidden[:kept].clone()
        advance(layer, call, hidden, [h.remove for h in handles], index=i)
        offsets = {name: s.offset(centre) for name, s in samples.items()} if centre else {}
        values = {name: s.sorted(offsets.get(name)) for name, s in samples.items()}
        offsets = {name: o.to(hidden.dtype) for name, o in offsets.items()}
        results.append(choose(i, layer, call, values, inputs, offsets))
    return results


def output_error(layer: nn.Module, call: tuple, inputs: torch.Tensor) -> Callable[[], float]:
    """A function giving ||y - y_dense||² / ||y_dense||² of the layer's output on ``inputs`` as it is now
    (sparse), against its dense output taken when this is called (before any site is attached)."""
    dense = run_layer(layer, call, inputs).float()  # all kept windows in one call: the masks broadcast
    norm = dense.pow(2).sum()
    return lambda: ((run_layer(layer, call, inputs).float() - dense).pow(2).sum() / norm).item()
