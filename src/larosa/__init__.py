"""larosa: training-free activation sparsity for LLM decoding by layerwise rotated Top-K (LaRoSa).

    model, tok = larosa.load_model("builtin:smollm2")
    rotations = larosa.calibrate(model, "builtin:wiki", tokenizer=tok)
    larosa.sparsify(model, rotations, sparsity=0.4)
"""

__version__ = "0.1.0"

from .calibrate import calibrate
from .data import token_windows
from .errors import LarosaError
from .evaluate import perplexity
from .models import load_model
from .rotations import Rotations
from .sparsify import SparsityConfig, site_sparsity, sparsify, unsparsify

__all__ = [
    "LarosaError",
    "Rotations",
    "SparsityConfig",
    "calibrate",
    "load_model",
    "perplexity",
    "site_sparsity",
    "sparsify",
    "token_windows",
    "unsparsify",
]
