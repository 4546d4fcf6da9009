"""Sparsity: the site levels and their accounting, the site protocol, searched plans, and the methods that zero
activations (LaRoSa's rotated Top-K in simulate form, TEAL and CATS)."""

from .levels import DEFAULT_SPLIT, FORMS, SCORES, SITES, Sparsity, SparsityConfig
from .peers import CatsConfig, TealConfig
from .plan import Plan, load_plans, save_plans
from .sites import measured_param_weighted, site_sparsity
from .topk import CENTRES, DEFAULT_SCOPE, MODES, SELECTS, LaRoSaConfig

# One vocabulary of methods, used by the API, the CLI, compare and every report.
METHODS = ("dense", "larosa", "teal", "teal-greedy", "cats")
LABELS = {"dense": "dense", "larosa": "LaRoSa", "teal": "TEAL uniform", "teal-greedy": "TEAL greedy", "cats": "CATS"}

__all__ = [
    "CENTRES", "DEFAULT_SCOPE", "DEFAULT_SPLIT", "FORMS", "LABELS", "METHODS", "MODES", "SCORES", "SELECTS", "SITES",
    "CatsConfig",
    "LaRoSaConfig", "Plan", "Sparsity", "SparsityConfig", "TealConfig", "load_plans", "measured_param_weighted",
    "save_plans", "site_sparsity",
]
