"""Orthogonal PCA rotations and their file format.

A rotations file is one safetensors file. Per layer i it holds ``layers.{i}.attn`` and ``layers.{i}.mlp``
(``[d, d]`` Q of the attention and MLP block inputs), ``layers.{i}.heads`` (``[n_kv_heads, head_dim, head_dim]``,
one Q per KV group of the o_proj input) and, for the whole model, ``global`` (Q of all block inputs pooled).
Each Q is float32, its columns the eigenvectors of XᵀX in descending eigenvalue order, and ``NAME.eigvals``
holds the eigenvalues. The metadata names the model it was made for and the signal X was taken from, so that
pairing the file with another model is an error instead of a silently wrong result, and holds the sha256 of the
tensors and the rest of the metadata, so that a flipped bit is an error too (older files have none and still load).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .arch import adapter_for
from .errors import LarosaError
from .io import atomic_file
from .models import is_lazy, resident

FORMAT = "larosa-rotations/1"
SCOPES = ("block", "layer", "global")
# What Top-K sees at a rotated site: the norm output with its gain (the reference code), or without (the folded
# model, whose gains live in the weights).
SIGNALS = ("gain", "gainfree")
# What Q diagonalises: the signal's second moment XᵀX ("pca"), or that of the signal with each coordinate scaled by
# the norm of the weight row it multiplies, diag(n) XᵀX diag(n) ("weighted": what a dropped coordinate costs the
# block's output, not its input). A weighted Q is used as the transform diag(n) Q, which is not orthogonal: it folds
# in the input form only.
OBJECTIVES = ("pca", "weighted")


def pca_rotation(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, eigenvalues) of symmetric XᵀX (batched over leading dims), solved in float64, descending.

    Each column's sign is fixed (largest-magnitude entry positive) so the same data gives the same file.
    """
    evals, evecs = torch.linalg.eigh(second_moment.double())
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    pivot = evecs.abs().argmax(-2, keepdim=True)
    signs = evecs.gather(-2, pivot).sign()
    signs[signs == 0] = 1
    return (evecs * signs).float(), evals.float()


def config_hash(config) -> str:
    """Hash of the config fields that decide the shapes and meaning of the rotations."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    family = config.model_type.removeprefix("larosa_")
    blob = json.dumps({"model_type": family, **{k: getattr(config, k, None) for k in keys}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """A few embedding values in bf16: tells a fine-tune from its base, whatever dtype it was loaded in."""
    embedding = model.get_input_embeddings()
    if is_lazy(model) and embedding.weight.device.type == "meta":  # read it from the checkpoint
        with resident(model, embedding, "cpu"):
            return weights_fingerprint(model)
    sample = embedding.weight[:8, :8].detach().to("cpu", torch.bfloat16)
    return hashlib.sha256(sample.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and the metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def check_file(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a rotations file larosa wrote, read from its header alone (cheap: a check before the work;
    :meth:`Rotations.load` reads and verifies the tensors)."""
    path = Path(path)
    if path.is_dir():
        raise LarosaError(f"{path} is a directory, not a rotations file; give the .safetensors file that "
                          "larosa calibrate wrote")
    if not path.is_file():
        raise LarosaError(f"rotations file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise LarosaError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    if meta.pop("format", None) != FORMAT:
        raise LarosaError(f"{path} is not a larosa rotations file (expected format {FORMAT})")
    return meta


def is_rotations_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a rotations file larosa wrote (its header says so): the only file calibrate replaces."""
    try:
        check_file(path)
    except LarosaError:
        return False
    return True


@dataclass
class Rotations:
    tensors: dict[str, torch.Tensor]  # NAME -> Q and NAME.eigvals -> eigenvalues
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def hidden_size(self) -> int:
        return self.tensors["global"].shape[0]

    @property
    def signal(self) -> str:
        return self.meta["signal"]

    def q(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def for_scope(self, scope: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(Q of the attention input, Q of the MLP input) per layer: ``block`` gives each block its own Q,
        ``layer`` one Q per layer (the attention Q, as in the paper's reference code), ``global`` one for all."""
        if scope not in SCOPES:
            raise LarosaError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        out = []
        for i in range(self.n_layers):
            attn = self.tensors["global"] if scope == "global" else self.tensors[f"layers.{i}.attn"]
            mlp = self.tensors[f"layers.{i}.mlp"] if scope == "block" else attn
            out.append((attn, mlp))
        return out

    @property
    def objective(self) -> str:
        return self.meta.get("objective", "pca")

    def norms_for_scope(self, scope: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """A weighted objective's (n of the attention input, n of the MLP input) per layer: each block's own, but in
        the layer scope, where the attention's Q serves both blocks, the attention's; None for plain PCA."""
        if self.objective != "weighted":
            return None
        mlp = "attn" if scope == "layer" else "mlp"
        return [(self.tensors[f"layers.{i}.attn.norms"], self.tensors[f"layers.{i}.{mlp}.norms"])
                for i in range(self.n_layers)]

    def save(self, path: str | os.PathLike) -> None:
        meta = {k: v for k, v in self.meta.items() if k != "sha256"}
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp,
                      metadata={"format": FORMAT, **meta, "sha256": _digest(self.tensors, meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Rotations":
        meta = check_file(path)
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise LarosaError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
        want = meta.pop("sha256", None)
        if want is not None and _digest(tensors, meta) != want:
            raise LarosaError(f"{path} is corrupted: its contents do not match the sha256 it was saved with; "
                              "calibrate again or restore the file from a copy")
        rot = cls(tensors, meta)
        rot.validate(path)
        if "plans" in meta:
            warnings.warn(f"{path} carries searched plans (larosa 0.1 stored them in the rotations file); they are "
                          "used only when given as a plan: --plan FILE, or larosa.load_plans(FILE)", stacklevel=2)
        return rot

    def validate(self, where: object = "rotations", tol: float = 1e-3) -> None:
        """Every expected Q is present and orthogonal (a flipped bit or a hand-edited file fails here)."""
        if self.meta.get("signal") not in SIGNALS or "num_layers" not in self.meta:
            raise LarosaError(f"{where}: metadata lacks num_layers or a signal in {SIGNALS}")
        if self.objective not in OBJECTIVES:
            raise LarosaError(f"{where}: unknown objective {self.objective!r}")
        for name in (f"layers.{i}.{b}.norms" for i in range(self.n_layers) for b in ("attn", "mlp")):
            if self.objective == "weighted" and not (name in self.tensors and bool((self.tensors[name] > 0).all())):
                raise LarosaError(f"{where} lacks tensor {name!r} (positive), which a weighted objective needs")
        names = ["global"] + [f"layers.{i}.{b}" for i in range(self.n_layers) for b in ("attn", "mlp", "heads")]
        for name in names:
            if name not in self.tensors or f"{name}.eigvals" not in self.tensors:
                raise LarosaError(f"{where} lacks tensor {name!r}; the file is incomplete")
            q = self.tensors[name].double()
            eye = torch.eye(q.shape[-1], dtype=torch.float64)
            err = (q.transpose(-1, -2) @ q - eye).abs().max().item()
            if not err < tol:  # also catches NaN
                raise LarosaError(f"{where}: {name} is not orthogonal (max |QᵀQ - I| = {err:.2e})")

    def check_model(self, model) -> None:
        """Raise unless these rotations were made for this model's architecture and shapes."""
        dims = adapter_for(model).dims
        want = config_hash(model.config)
        got = self.meta.get("config_hash")
        if got != want or self.n_layers != dims.n_layers or self.hidden_size != dims.hidden:
            raise LarosaError(
                f"these rotations were made for {self.meta.get('model', '?')} (config {got}, "
                f"{self.n_layers} layers x {self.hidden_size}), not for this model (config {want}, "
                f"{dims.n_layers} layers x {dims.hidden}); calibrate this model first"
            )
        if self.meta.get("weights_fingerprint") not in (None, weights_fingerprint(model)):
            warnings.warn(
                "these rotations were calibrated on a model with the same architecture but other weights "
                f"({self.meta.get('model', '?')}); results may be worse than with its own calibration",
                stacklevel=2,
            )
