"""Load a causal LM and its tokenizer by Hugging Face name or path, or the offline ``builtin:smollm2``."""

from __future__ import annotations

import itertools
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import assets
from .arch import adapter_class
from .errors import LarosaError

BUILTIN_MODELS = {"builtin:smollm2": assets.smollm2_dir}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _supported_config(name: str, path) -> AutoConfig:
    """The model's config, read before any weight; an unsupported architecture is an error here."""
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise LarosaError(f"cannot load model {name!r}: {e}") from e
    adapter_class(config)
    return config


def load_model(name: str, *, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer), in eval mode; the architecture is checked before any weight is read."""
    path = resolve(name)
    _supported_config(name, path)
    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device), device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


class DiskWeights:
    """A checkpoint's safetensors shards, read one module at a time: what lets calibration visit a model larger
    than RAM layer by layer (parameters stay on the meta device until :func:`resident` brings them in)."""

    def __init__(self, path: Path, dtype: torch.dtype):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise LarosaError(f"{path} has no model.safetensors or model.safetensors.index.json; lazy loading reads "
                              "safetensors checkpoints only")
        self.path, self.dtype, self.weight_map = path, dtype, weight_map

    def load(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        for name, _ in list(module.named_parameters()):
            key = f"{prefix}{name}"
            if key not in self.weight_map:
                raise LarosaError(f"the checkpoint in {self.path} has no tensor {key!r}")
            with safe_open(self.path / self.weight_map[key], "pt", device=str(device)) as f:
                value = f.get_tensor(key).to(self.dtype)
            set_module_tensor_to_device(module, name, device, value=value)


def load_lazy(name: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with the weights left on disk: parameters on the meta device, buffers (rotary tables)
    real. Use :func:`resident` to bring a module's weights in for a block of work."""
    path = Path(resolve(name))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # offline, unknown repo, gated: one clear line
            raise LarosaError(f"cannot fetch model {name!r}: {e}") from e
    config = _supported_config(name, path)
    weights = DiskWeights(path, dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.larosa_weights = weights
    return model.eval(), AutoTokenizer.from_pretrained(path)


def is_lazy(model: nn.Module) -> bool:
    """Whether ``model`` came from :func:`load_lazy`: its weights are read from disk a module at a time."""
    return getattr(model, "larosa_weights", None) is not None


@contextmanager
def resident(model: nn.Module, module: nn.Module, device: torch.device | str):
    """``module``'s weights on ``device`` for the block: a lazily loaded model reads them from disk and drops them
    after; otherwise they move there and back to where they were."""
    if not is_lazy(model):
        # Record devices, not tensors: Module.to moves a parameter in place, so the tensor would follow the move.
        home = next((t.device for t in itertools.chain(module.parameters(), module.buffers())), None)
        module.to(device)
        try:
            yield module
        finally:
            if home is not None:
                module.to(home)
        return
    prefix = next(name for name, m in model.named_modules() if m is module)
    model.larosa_weights.load(module, f"{prefix}." if prefix else "", torch.device(device))
    buffers = [name for name, _ in module.named_buffers()]
    for name in buffers:
        set_module_tensor_to_device(module, name, device)
    try:
        yield module
    finally:
        for name, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, name, "meta")
        for name in buffers:
            set_module_tensor_to_device(module, name, "cpu")
