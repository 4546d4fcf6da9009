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
    """WikiText-2 from the hub; without network, from the datasets cache at once, or a clear error at once."""
    try:
        import datasets.config
        from datasets import load_dataset
    except ImportError as e:
        raise LarosaError("the wikitext2 spec needs the datasets package: pip install 'larosa[online]'") from e
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or not assets.hub_reachable()
    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except OSError as e:  # no network and no cached copy, or the hub refused
        where = ("the Hugging Face hub cannot be reached (offline?) and the datasets cache has no copy"
                 if datasets.config.HF_HUB_OFFLINE else str(e).splitlines()[0])
        raise LarosaError(f"cannot load wikitext2:{split}: {where}; offline, use builtin:wiki, builtin:c4 or a "
                          ".txt file") from e
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    return "".join(r for r in rows if r.strip())  # blank lines dropped, as in the project's local copy


def _read(path: Path) -> str:
    """A UTF-8 text file; a binary or otherwise encoded file is an error that says so."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LarosaError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); give a "
                          "UTF-8 .txt or .jsonl file") from e
    except OSError as e:
        raise LarosaError(f"cannot read {path}: {e.strerror}") from e
    if "\x00" in text:
        raise LarosaError(f"{path} holds NUL bytes: a binary file, not text")
    return text


def _jsonl(path: Path) -> str:
    texts = []
    for n, line in enumerate(_read(path).split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LarosaError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
        if not isinstance(text, str):
            raise LarosaError(f"{path}:{n}: the 'text' field must be a string, not {type(text).__name__}")
        texts.append(text)
    return "\n\n".join(texts)


def load_text(spec: str) -> str:
    if spec == "wikitext2" or spec.startswith("wikitext2:"):
        return _wikitext2(spec.partition(":")[2] or "test")
    if spec.startswith("builtin:"):
        return assets.builtin_text(spec.partition(":")[2])
    path = Path(spec)
    if path.is_dir():
        raise LarosaError(f"data {spec!r} is a directory; give a .txt or .jsonl file")
    if not path.is_file():
        raise LarosaError(
            f"data {spec!r} is neither a file nor a known spec (wikitext2[:split], builtin:wiki, builtin:c4)"
        )
    return _jsonl(path) if path.suffix == ".jsonl" else _read(path)


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
