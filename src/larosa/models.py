"""Load a causal LM and its tokenizer by Hugging Face name or path, or the offline ``builtin:smollm2``."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import assets
from .adapters import adapter_class
from .errors import LarosaError

BUILTIN_MODELS = {"builtin:smollm2": assets.smollm2_dir}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 where there are no fast half-precision units (the CPU), bf16 on the GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def resolve(name: str) -> str:
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise LarosaError(f"unknown builtin model {name!r}; choose from: {', '.join(BUILTIN_MODELS)}")
        return str(BUILTIN_MODELS[name]())
    return name


def load_model(name: str, *, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer), in eval mode; the architecture is checked before any weight is read."""
    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise LarosaError(f"cannot load model {name!r}: {e}") from e
    adapter_class(config)
    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device), device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
