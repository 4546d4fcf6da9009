"""Layer-by-layer passes over calibration text, and the greedy per-site allocation run inside them.

TEAL's thresholds and greedy allocation, CATS's thresholds and LaRoSa's per-layer site search all need, for each
decoder layer in turn, the dense model's input to that layer (and samples of what its sites read); one layer
visits the compute device at a time, as in :func:`larosa.calibrate.calibrate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .calibrate import _first_layer_inputs, advance, run_layer
from .errors import LarosaError
from .models import default_device, resident

SAMPLE = 1 << 20  # |x| values kept per site and layer: quantiles to ~1e-3, and cheap to sort
GREEDY_TOKENS = 4096  # calibration tokens the greedy search measures layer output error on
MAX_SITE = 0.99  # the greedy search leaves at least 1 % of every site's input

# (layer index, layer, its call arguments, sorted samples per tap, dense inputs of the greedy tokens) -> plan
Chooser = Callable[[int, nn.Module, tuple, dict[str, torch.Tensor], torch.Tensor], dict]


class _Sample:
    """A random subsample of one site's |score| over the calibration tokens, for quantiles.

    torch.quantile refuses large inputs and a full sort of every token would not fit on the device for big
    models, so each window contributes a fixed number of random tokens (all of them when few).
    """

    def __init__(self, n_windows: int, generator: torch.Generator):
        self.n_windows, self.generator = n_windows, generator
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        rows = min(x.shape[0], math.ceil(SAMPLE / (x.shape[1] * self.n_windows)))
        idx = torch.randperm(x.shape[0], generator=self.generator)[:rows].to(x.device)
        self.parts.append(x[idx].abs().float().flatten())

    def sorted(self) -> torch.Tensor:
        return torch.cat(self.parts).sort().values.cpu()


@torch.no_grad()
def layerwise(model: nn.Module, windows: torch.Tensor, taps: dict[str, Callable], choose: Chooser,
              desc: str, device: str | None, progress: bool) -> list[dict]:
    """Run the dense model layer by layer on ``windows``, sampling what ``taps`` read at each layer, and return
    ``choose``'s plan for every layer.

    ``taps`` maps a sample name to a function of (adapter, layer) giving the module to hook and how to read
    the signal from its (input, output).
    """
    adapter = adapter_for(model)
    device = torch.device(device or default_device())
    hidden, calls = _first_layer_inputs(adapter, windows, device)
    kept = max(1, min(len(windows), GREEDY_TOKENS // windows.shape[1]))
    generator = torch.Generator().manual_seed(0)
    plans = []
    for i, layer in enumerate(tqdm(adapter.layers(), desc=desc, unit="layer", disable=not progress)):
        samples = {name: _Sample(len(windows), generator) for name in taps}
        with resident(model, layer, device):
            handles = []
            for name, tap in taps.items():
                module, read = tap(adapter, layer)
                handles.append(module.register_forward_hook(
                    lambda m, a, out, s=samples[name], read=read: s.add(read(a[0], out))))
            inputs = hidden[:kept].clone()
            advance(layer, calls[i], hidden, handles)
            values = {name: s.sorted() for name, s in samples.items()}
            plans.append(choose(i, layer, calls[i], values, inputs))
    return plans


def output_error(layer: nn.Module, call: tuple, inputs: torch.Tensor) -> Callable[[], float]:
    """A function giving ||y - y_dense||² / ||y_dense||² of the layer's output on ``inputs`` as it is now
    (sparse), against its dense output taken when this is called (before any site is attached)."""
    dense = run_layer(layer, call, inputs).float()  # all kept windows in one call: the masks broadcast
    norm = dense.pow(2).sum()
    return lambda: ((run_layer(layer, call, inputs).float() - dense).pow(2).sum() / norm).item()


def greedy_levels(weights: dict[str, int], target: float, step: float, error: Callable[[dict[str, float]], float],
                  max_level: float = MAX_SITE) -> dict[str, float]:
    """From all-dense, repeatedly raise by ``step`` the site whose raise adds the least ``error`` per weight read
    skipped, until the parameter-weighted sparsity sum(level * weights) / sum(weights) is ``target`` (the last
    raise is partial, so it lands on it). TEAL's block-wise greedy allocation, for any set of sites.

    The cost is per weight skipped because sites differ in size: an unnormalised comparison would favour the
    small sites for saving little.
    """
    goal = target * sum(weights.values())
    levels = dict.fromkeys(weights, 0.0)
    current = error(levels)
    while (missing := goal - sum(levels[s] * weights[s] for s in weights)) > 1e-9 * goal:
        best = None
        for s in weights:
            raise_by = min(step, max_level - levels[s], missing / weights[s])
            if raise_by <= 1e-12:
                continue
            trial = {**levels, s: levels[s] + raise_by}
            e = error(trial)
            cost = (e - current) / (raise_by * weights[s])
            if best is None or cost < best[0]:
                best = (cost, e, trial)
        if best is None:
            raise LarosaError(f"sites capped at {max_level} cannot reach parameter-weighted sparsity {target}")
        _, current, levels = best
    return levels
