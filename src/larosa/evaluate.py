"""Perplexity over token windows: exp of the mean NLL of every predicted token (seq_len - 1 per window)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import LarosaError
from .sparsify import measured_param_weighted, site_sparsity


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
