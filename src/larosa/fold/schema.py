"""The one reader and writer of what a folded model's config says about its sparsity (``config.larosa``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LarosaError
from ..sparsity.levels import SparsityConfig, per_layer
from ..version import __version__


@dataclass(frozen=True)
class FoldedSettings:
    levels: tuple[SparsityConfig, ...]  # one per decoder layer
    scope: str
    score: str = "magnitude"
    head_rotation: bool = False
    signal: str = "gainfree"
    rotations: dict = field(default_factory=dict)  # the rotations file's metadata: where Q came from
    larosa_version: str = __version__
    select: str = "topk"
    thresholds: tuple[dict[str, float], ...] | None = None  # one {site: threshold} per layer, with "threshold"
    form: str = "residual"
    centre: str | None = None  # the sites' offsets are saved with the weights

    def to_dict(self) -> dict:
        uniform = all(c == self.levels[0] for c in self.levels)
        return {
            "sparsity": self.levels[0].to_dict() if uniform else None,
            "sparsity_per_layer": None if uniform else [c.to_dict() for c in self.levels],
            "score": self.score,
            "scope": self.scope,
            "head_rotation": self.head_rotation,
            "signal": self.signal,
            "rotations": self.rotations,
            "larosa_version": self.larosa_version,
            "select": self.select,
            "thresholds": None if self.thresholds is None else [dict(t) for t in self.thresholds],
            "form": self.form,
            "centre": self.centre,
        }

    @classmethod
    def from_dict(cls, d: dict, n_layers: int) -> FoldedSettings:
        try:
            levels = ([SparsityConfig(**c) for c in d["sparsity_per_layer"]] if d.get("sparsity_per_layer")
                      else SparsityConfig(**d["sparsity"]))
            return cls(levels=tuple(per_layer(levels, n_layers)), scope=d["scope"],
                       score=d.get("score", "magnitude"), head_rotation=d.get("head_rotation", False),
                       signal=d.get("signal", "gainfree"), rotations=d.get("rotations", {}),
                       larosa_version=d.get("larosa_version", "0.1"), select=d.get("select", "topk"),
                       thresholds=None if d.get("thresholds") is None else tuple(d["thresholds"]),
                       form=d.get("form", "residual"), centre=d.get("centre"))
        except (KeyError, TypeError) as e:
            raise LarosaError(f"the folded config's larosa settings are incomplete or malformed ({e!r})") from e

    @classmethod
    def of(cls, config) -> FoldedSettings | None:
        """The settings of a folded model's config; None for any other model (a saved TEAL model's settings name
        their method; a folded model's do not)."""
        d = getattr(config, "larosa", None)
        return None if d is None or "method" in d else cls.from_dict(d, config.num_hidden_layers)
