"""Perplexity over token windows: exp of the mean NLL of every predicted token (seq_len - 1 per window)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import adapter_for, soft_cap
from ..errors import LarosaError
from ..models import check_context, resident
from ..sparsity import sites
from ..sparsity.topk import LaRoSaConfig, prepare
from ..streaming import advance, check_finite, passes


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> dict:
    """{ppl, tokens, windows, seconds, site_sparsity, measured_param_weighted}, sparsity measured on these windows.

    ``batch_size`` windows run per forward: the same result, faster on a GPU (a small model at batch 1 is bound
    by kernel launches and the sites' Python hooks).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise LarosaError(f"batch size must be a positive integer, got {batch_size!r}")
    check_context(model.config, windows.shape[1])
    device = next(model.parameters()).device
    sites.site_sparsity(model, reset=True)
    nll, tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        check_finite(logits, "the model", model)
        nll += F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        tokens += ids[:, 1:].numel()
        bar.update(len(batch))
        bar.set_postfix(ppl=f"{math.exp(nll / tokens):.3f}")
    bar.close()
    return {
        "ppl": math.exp(nll / tokens),
        "tokens": tokens,
        "windows": len(windows),
        "seconds": time.perf_counter() - start,
        "measured_param_weighted": sites.measured_param_weighted(model),
        "site_sparsity": sites.site_sparsity(model),
    }


@torch.no_grad()
def perplexity_streamed(model: nn.Module, windows: torch.Tensor, config: LaRoSaConfig | None = None, *,
                        device: str | None = None, progress: bool = True) -> dict:
    """:func:`perplexity` of the dense model, or of LaRoSa simulated by ``config``, with one decoder layer's
    weights resident at a time.

    Every window passes through a layer before the next layer is read, so the device holds one layer and the
    hidden states of all windows: a model larger than the GPU, or than RAM with :func:`larosa.models.load_lazy`,
    is scored with each weight read once.
    """
    if config is not None and not isinstance(config, LaRoSaConfig):
        raise LarosaError("streamed perplexity scores the dense model or LaRoSa in simulate mode, not a peer")
    if config is not None and (config.select == "threshold" and config.thresholds is None or config.centre):
        raise LarosaError("streamed perplexity takes calibrated thresholds, not calibration windows, and no "
                          "centring")
    adapter = adapter_for(model)
    start = time.perf_counter()
    attach = prepare(model, config)[1] if config is not None else None
    sites.site_sparsity(model, reset=True)  # a folded model's own sites count from here
    measured = []  # each layer's sites, kept for their counters once the layer is gone
    hidden = None
    for i, layer, call, hidden in passes(model, windows, "perplexity", device, progress):
        if attach is not None:
            attach(i, layer)
            advance(layer, call, hidden, [lambda: measured.append(sites.detach(layer))], index=i)
        else:  # the dense model, or a folded one, which carries its sites
            advance(layer, call, hidden, index=i)
            measured += [own] if (own := sites.of(layer)) is not None else []
    device = hidden.device
    # The output head: the embedding itself where the model ties them (a lazy model's lm_head is never loaded).
    head = model.get_input_embeddings() if model.config.tie_word_embeddings else model.get_output_embeddings()
    nll, tokens, cap = 0.0, 0, adapter.logit_softcap()
    with resident(model, adapter.final_norm(), device), resident(model, head, device):
        for j in range(hidden.shape[0]):
            logits = soft_cap(F.linear(adapter.final_norm()(hidden[j : j + 1]), head.weight), cap)[0, :-1]
            check_finite(logits, "the output head", model)
            nll += F.cross_entropy(logits.float(), windows[j, 1:].to(device), reduction="sum").item()
            tokens += windows.shape[1] - 1
    return {
        "ppl": math.exp(nll / tokens),
        "tokens": tokens,
        "windows": len(windows),
        "seconds": time.perf_counter() - start,
        "measured_param_weighted": sites.param_weighted_share(measured, adapter.dims),
        "site_sparsity": sites.by_site(measured),
    }
