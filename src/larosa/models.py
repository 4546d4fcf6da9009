"""Load a causal LM and its tokenizer by Hugging Face name or path, or the offline ``builtin:smollm2``; check what
a model can be run with (device, sequence length) before the work."""

from __future__ import annotations

import itertools
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import assets
from .arch import adapter_class
from .errors import LarosaError
from .io import verify_checksums

BUILTIN_MODELS = {"builtin:smollm2": assets.smollm2_dir}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 where there are no fast half-precision units (the CPU), bf16 on the GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def check_device(device: str | None) -> str | None:
    """``device`` if this machine has it (None stays None: the default device); else a clear error."""
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as e:
        raise LarosaError(f"unknown device {device!r}; use cpu or cuda (cuda:N for one GPU)") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise LarosaError(f"device {device!r}, but this machine has no usable CUDA GPU (torch "
                          f"{torch.__version__}); use --device cpu")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise LarosaError(f"device {device!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind not in ("cpu", "cuda"):
        raise LarosaError(f"larosa runs on cpu or cuda, not {device!r}")
    return device


def check_context(config, seq_len: int) -> None:
    """Windows of ``seq_len`` tokens fit the model's context (``max_position_embeddings``), where it names one."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise LarosaError(f"windows of {seq_len} tokens are longer than the model's context of {limit} "
                          f"(max_position_embeddings); use a sequence length of at most {limit} "
                          "(--seq-len, --calib-seq-len)")


def resolve(name: str) -> str:
    """A local path or a hub name to load ``name`` from; a file, or a path that does not exist and cannot be a
    hub name, is an error here."""
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise LarosaError(f"unknown builtin model {name!r}; choose from: {', '.join(BUILTIN_MODELS)}")
        return str(BUILTIN_MODELS[name]())
    path = Path(name).expanduser()
    if path.is_file():
        hint = "; a rotations file from larosa calibrate goes to --rotations" if path.suffix == ".safetensors" else ""
        raise LarosaError(f"{name} is a file, not a model (a directory, a Hugging Face name or builtin:smollm2){hint}")
    if path.exists():
        return str(path)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise LarosaError(f"model directory {name} does not exist; give a model directory, a Hugging Face name "
                          "(org/model) or builtin:smollm2") from None
    return name


def _offline(path: str) -> bool:
    """Whether ``path`` must come from the hub's local cache: a hub name while the hub cannot be reached."""
    return not Path(path).is_dir() and not assets.hub_reachable()


def _supported_config(name: str, path, offline: bool = False) -> AutoConfig:
    """The model's config, read before any weight; an unsupported architecture is an error here."""
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
    except OSError as e:
        if offline:
            raise LarosaError(f"cannot load model {name!r}: it is not a local directory, the Hugging Face hub "
                              "cannot be reached (offline?) and its cache has no copy") from e
        raise LarosaError(f"cannot load model {name!r}: {e}") from e
    adapter_class(config)
    return config


def load_config(name: str) -> AutoConfig:
    """The config of a model :func:`load_model` would load, without its weights (to check a run before it)."""
    path = resolve(name)
    return _supported_config(name, path, _offline(path))


def load_model(name: str, *, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer), in eval mode; the architecture is checked before any weight is read."""
    path = resolve(name)
    offline = _offline(path)
    _supported_config(name, path, offline)
    device = check_device(device) or default_device()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device), device_map=device,
                                                     local_files_only=offline)
    except SafetensorError as e:
        raise LarosaError(f"cannot read the weights of model {name!r}: {e} (a truncated or corrupted file); "
                          "download or save the model again") from e
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    return model.eval(), tokenizer


class DiskWeights:
    """A checkpoint's safetensors shards, read one module at a time: what lets calibration visit a model larger
    than RAM layer by layer (parameters stay on the meta device until :func:`resident` brings them in)."""

    def __init__(self, path: Path, dtype: torch.dtype):
        self.path, self.dtype = path, dtype
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            with self._open("model.safetensors") as f:
                self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise LarosaError(f"{path} has no model.safetensors or model.safetensors.index.json; lazy loading reads "
                              "safetensors checkpoints only")

    def _open(self, file: str, device: torch.device | str = "cpu"):
        try:
            return safe_open(self.path / file, "pt", device=str(device))
        except (SafetensorError, OSError) as e:
            raise LarosaError(f"cannot read {self.path / file}: {e} (a truncated or corrupted file); download or "
                              "save the model again") from e

    def load(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        """``module``'s parameters, and the buffers the checkpoint holds (a folded model's weight-aware scores)."""
        parameters = {name for name, _ in module.named_parameters()}
        for name in list(module.state_dict(keep_vars=True)):
            key = f"{prefix}{name}"
            if key not in self.weight_map:
                if name in parameters:
                    raise LarosaError(f"the checkpoint in {self.path} has no tensor {key!r}")
                continue  # a buffer the model makes itself
            with self._open(self.weight_map[key], device) as f:
                value = f.get_tensor(key)
            set_module_tensor_to_device(module, name, device,
                                        value=value.to(self.dtype) if value.is_floating_point() else value)


def load_lazy(name: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with the weights left on disk: parameters on the meta device, buffers (rotary tables)
    real. Use :func:`resident` to bring a module's weights in for a block of work."""
    path = Path(resolve(name))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                          local_files_only=_offline(str(path))))
        except Exception as e:  # offline, unknown repo, gated: one clear line
            raise LarosaError(f"cannot fetch model {name!r}: {e}") from e
    config = _supported_config(name, path)
    if getattr(config, "larosa", None) is not None:  # a folded directory: its weights are checked as on loading
        verify_checksums(path)
    weights = DiskWeights(path, dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.larosa_weights = weights
    return model.eval(), AutoTokenizer.from_pretrained(path)


def nonfinite(module: nn.Module) -> str | None:
    """The name of ``module``'s first parameter or buffer that holds NaN or Inf (weights left on disk skipped)."""
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            return name
    return None


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
