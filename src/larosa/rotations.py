"""Orthogonal PCA rotations per layer and block, and their file format.

A rotations file is one safetensors file: ``layers.{i}.{block}`` holds Q (``[d, d]``, float32, columns are the
eigenvectors of XᵀX in descending eigenvalue order) and ``layers.{i}.{block}.eigvals`` the eigenvalues, for
block in ``attn`` (attention input) and ``mlp`` (MLP input). Its metadata names the model it was made for, so
that pairing it with another model is an error instead of a silently wrong result.
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

from .adapters import adapter_for
from .errors import LarosaError

FORMAT = "larosa-rotations/1"
BLOCKS = ("attn", "mlp")


def pca_rotation(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, eigenvalues) of a symmetric XᵀX, solved in float64; Q's columns sorted by descending eigenvalue.

    Each column's sign is fixed (largest-magnitude entry positive) so the same data gives the same file.
    """
    evals, evecs = torch.linalg.eigh(second_moment.double())
    evals, evecs = evals.flip(0), evecs.flip(1)
    pivot = evecs.abs().argmax(0)
    signs = evecs.gather(0, pivot[None]).sign()
    signs[signs == 0] = 1
    return (evecs * signs).float(), evals.float()


def config_hash(config) -> str:
    """Hash of the config fields that decide the shapes and meaning of the rotations."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    blob = json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """A few embedding values in bf16: tells a fine-tune from its base, whatever dtype it was loaded in."""
    sample = model.get_input_embeddings().weight[:8, :8].detach().to("cpu", torch.bfloat16)
    return hashlib.sha256(sample.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


@dataclass
class Rotations:
    q: dict[str, list[torch.Tensor]]  # block -> per-layer Q
    eigvals: dict[str, list[torch.Tensor]]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.q["attn"])

    @property
    def hidden_size(self) -> int:
        return self.q["attn"][0].shape[0]

    def save(self, path: str | os.PathLike) -> None:
        """Written to a temporary file and renamed, so an interrupted save never leaves a broken file."""
        tensors = {}
        for block in BLOCKS:
            for i, (q, ev) in enumerate(zip(self.q[block], self.eigvals[block])):
                tensors[f"layers.{i}.{block}"] = q.contiguous()
                tensors[f"layers.{i}.{block}.eigvals"] = ev.contiguous()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": FORMAT, **self.meta})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Rotations":
        path = Path(path)
        if not path.is_file():
            raise LarosaError(f"rotations file not found: {path}")
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                meta = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise LarosaError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
        if meta.pop("format", None) != FORMAT:
            raise LarosaError(f"{path} is not a larosa rotations file (expected format {FORMAT})")
        n = int(meta.get("num_layers", -1))
        try:
            q = {b: [tensors[f"layers.{i}.{b}"] for i in range(n)] for b in BLOCKS}
            ev = {b: [tensors[f"layers.{i}.{b}.eigvals"] for i in range(n)] for b in BLOCKS}
        except KeyError as e:
            raise LarosaError(f"{path} lacks tensor {e}; the file is incomplete") from e
        rot = cls(q, ev, meta)
        rot.check_orthogonal(path)
        return rot

    def check_orthogonal(self, where: object = "rotations", tol: float = 1e-3) -> None:
        for block in BLOCKS:
            for i, q in enumerate(self.q[block]):
                eye = torch.eye(q.shape[0])
                err = (q.double().T @ q.double() - eye).abs().max().item()
                if not err < tol:  # also catches NaN
                    raise LarosaError(f"{where}: layers.{i}.{block} is not orthogonal (max |QᵀQ - I| = {err:.2e})")

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
