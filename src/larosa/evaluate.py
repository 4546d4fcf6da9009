"""Perplexity over token windows: exp of the mean NLL of every predicted token (seq_len - 1 per window)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .calibrate import _first_layer_inputs, advance
from .errors import LarosaError
from .models import default_device, resident
from .rotations import Rotations
from .sparsify import (Sparsity, layer_sites, measured_param_weighted, param_weighted_share, site_sparsity,
                       sparsity_by_site)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> dict:
    """{ppl, tokens, windows, seconds, site_sparsity, measured_param_weighted}, sparsity measured on these windows.

    ``batch_size`` windows run per forward: the same result, faster on a GPU (a small model at batch 1 is bound
    by kernel launches and the sites' Python hooks).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise LarosaError(f"batch size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    site_sparsity(model, reset=True)
    nll, tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        tokens += ids[:, 1:].numel()
        bar.update(len(batch))
        bar.set_postfix(ppl=f"{math.exp(nll / tokens):.3f}")
    bar.close()
    return {
        "ppl": math.exp(nll / tokens),
        "tokens": tokens,
        "windows": len(windows),
        "seconds": time.perf_counter() - start,
        "measured_param_weighted": measured_param_weighted(model),
        "site_sparsity": site_sparsity(model),
    }


@torch.no_grad()
def perplexity_streamed(model: nn.Module, windows: torch.Tensor, *, rotations: Rotations | None = None,
                        sparsity: Sparsity | None = None, scope: str = "block", score: str = "magnitude",
                        device: str | None = None, progress: bool = True) -> dict:
    """:func:`perplexity` of the dense model, or of LaRoSa simulated with ``sparsity`` (as :func:`sparsify` would
    make it), with one decoder layer's weights resident at a time.

    Every window passes through a layer before the next layer is read, so the device holds one layer and the
    hidden states of all windows: a model larger than the GPU, or than RAM with :func:`larosa.models.load_lazy`,
    is scored with each weight read once.
    """
    adapter = adapter_for(model)
    device = torch.device(device or default_device())
    start = time.perf_counter()
    attach = layer_sites(model, rotations, sparsity, scope=scope, score=score)[1] if sparsity is not None else None
    hidden, calls = _first_layer_inputs(adapter, windows, device)
    measured = []  # each layer's sites, kept for their counters once the layer is gone
    for i, layer in enumerate(tqdm(adapter.layers(), desc="perplexity", unit="layer", disable=not progress)):
        with resident(model, layer, device):
            try:
                advance(layer, calls[i], hidden, attach(i, layer) if attach else ())
            finally:
                if "larosa_sites" in layer._modules:
                    measured.append(layer._modules.pop("larosa_sites"))
    # The output head: the embedding itself where the model ties them (a lazy model's lm_head is never loaded).
    head = model.get_input_embeddings() if model.config.tie_word_embeddings else model.get_output_embeddings()
    nll, tokens = 0.0, 0
    with resident(model, adapter.final_norm(), device), resident(model, head, device):
        for j in range(hidden.shape[0]):
            logits = F.linear(adapter.final_norm()(hidden[j : j + 1]), head.weight)[0, :-1].float()
            nll += F.cross_entropy(logits, windows[j, 1:].to(device), reduction="sum").item()
            tokens += windows.shape[1] - 1
    return {
        "ppl": math.exp(nll / tokens),
        "tokens": tokens,
        "windows": len(windows),
        "seconds": time.perf_counter() - start,
        "measured_param_weighted": param_weighted_share(measured, adapter.dims),
        "site_sparsity": sparsity_by_site(measured),
    }
