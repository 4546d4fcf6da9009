"""Text specs to token windows: tokenize the whole text once, cut consecutive non-overlapping windows.

A spec is one of:
  ``wikitext2`` or ``wikitext2:SPLIT``   WikiText-2 raw through Hugging Face ``datasets`` (online; default split test)
  ``builtin:wiki`` / ``builtin:c4``      real English text from the package registry, cached (see assets)
  a path to ``.txt``, or to ``.jsonl`` with a ``text`` field per line
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import assets
from .errors import LarosaError


def _wikitext2(split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise LarosaError("the wikitext2 spec needs the datasets package: pip install 'larosa[online]'") from e
    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    return "".join(r for r in rows if r.strip())  # blank lines dropped, as in the project's local copy


def _jsonl(path: Path) -> str:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LarosaError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
    return "\n\n".join(texts)


def load_text(spec: str) -> str:
    if spec == "wikitext2" or spec.startswith("wikitext2:"):
        return _wikitext2(spec.partition(":")[2] or "test")
    if spec.startswith("builtin:"):
        return assets.builtin_text(spec.partition(":")[2])
    path = Path(spec)
    if not path.is_file():
        raise LarosaError(
            f"data {spec!r} is neither a file nor a known spec (wikitext2[:split], builtin:wiki, builtin:c4)"
        )
    if path.suffix == ".jsonl":
        return _jsonl(path)
    return path.read_text(encoding="utf-8")


def token_windows(tokenizer, spec: str, n_windows: int | None, seq_len: int) -> torch.Tensor:
    """The first ``n_windows`` (all if None) windows of ``seq_len`` tokens, as a ``[n, seq_len]`` LongTensor."""
    if seq_len < 2:
        raise LarosaError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(load_text(spec), verbose=False)["input_ids"]
    available = len(ids) // seq_len
    n = available if n_windows is None else n_windows
    if n < 1 or n > available:
        raise LarosaError(
            f"{spec!r} gives {len(ids)} tokens: {available} windows of {seq_len}, but {n_windows} were asked for"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
