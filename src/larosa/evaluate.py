"""Perplexity over token windows: exp of the mean NLL of every predicted token (seq_len - 1 per window)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .sparsify import measured_param_weighted, site_sparsity


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, progress: bool = True) -> dict:
    """{ppl, tokens, windows, seconds, site_sparsity, measured_param_weighted}, sparsity measured on these windows."""
    device = next(model.parameters()).device
    site_sparsity(model, reset=True)
    nll, tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(windows, desc="perplexity", unit="window", disable=not progress)
    for w in bar:
        ids = w[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
        bar.set_postfix(ppl=f"{math.exp(nll / tokens):.3f}")
    return {
        "ppl": math.exp(nll / tokens),
        "tokens": tokens,
        "windows": len(windows),
        "seconds": time.perf_counter() - start,
        "measured_param_weighted": measured_param_weighted(model),
        "site_sparsity": site_sparsity(model),
    }
