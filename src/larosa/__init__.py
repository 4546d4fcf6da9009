"""larosa: training-free activation sparsity for LLM decoding by layerwise rotated Top-K (LaRoSa).

    model, tok = larosa.load_model("builtin:smollm2")
    rotations = larosa.calibrate(model, "builtin:wiki", tokenizer=tok)
    larosa.sparsify(model, rotations, sparsity=0.4)              # simulate: quality, as the paper's code
    folded = larosa.fold(model, rotations, sparsity=0.4)         # deployable: rotations in the weights
    larosa.save_folded(folded, tok, "out/")                      # AutoModelForCausalLM.from_pretrained("out/")
"""

__version__ = "0.1.0"

from .calibrate import calibrate
from .data import token_windows
from .errors import LarosaError
from .evaluate import perplexity, perplexity_streamed
from .fold import fold, fold_streamed, save_folded
from .models import load_lazy, load_model
from .peers import cats, teal
from .rotations import Rotations
from .sparsify import SparsityConfig, site_sparsity, sparsify, unsparsify

__all__ = [
    "LarosaError",
    "Rotations",
    "SparsityConfig",
    "calibrate",
    "cats",
    "fold",
    "fold_streamed",
    "load_lazy",
    "load_model",
    "perplexity",
    "perplexity_streamed",
    "save_folded",
    "site_sparsity",
    "sparsify",
    "teal",
    "token_windows",
    "unsparsify",
]
