"""larosa: training-free activation sparsity for LLM decoding by layerwise rotated Top-K (LaRoSa).

    model, tok = larosa.load_model("builtin:smollm2")
    rotations = larosa.calibrate(model, "builtin:wiki", tokenizer=tok, signal="gainfree")
    larosa.sparsify(model, larosa.LaRoSaConfig(rotations, sparsity=0.4))      # simulate, in place
    larosa.unsparsify(model)
    folded = larosa.sparsify(model, larosa.LaRoSaConfig(rotations, target=0.4, mode="folded"))  # deployable
    larosa.save_folded(folded, tok, "out/")                      # AutoModelForCausalLM.from_pretrained("out/")
"""

from .api import describe, sparsify, unsparsify
from .calibrate import calibrate
from .data import token_windows
from .errors import LarosaError
from .eval import perplexity, perplexity_streamed
from .fold import fold_streamed, save_folded
from .models import load_lazy, load_model
from .rotations import Rotations
from .runtime import generate
from .sparsity import (CatsConfig, LaRoSaConfig, Plan, SparsityConfig, TealConfig, load_plans, save_plans,
                       site_sparsity)
from .version import __version__

__all__ = [
    "CatsConfig",
    "LaRoSaConfig",
    "LarosaError",
    "Plan",
    "Rotations",
    "SparsityConfig",
    "TealConfig",
    "__version__",
    "calibrate",
    "describe",
    "fold_streamed",
    "generate",
    "load_lazy",
    "load_model",
    "load_plans",
    "perplexity",
    "perplexity_streamed",
    "save_folded",
    "save_plans",
    "site_sparsity",
    "sparsify",
    "token_windows",
    "unsparsify",
]
