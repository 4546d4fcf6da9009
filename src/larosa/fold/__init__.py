"""The deployable form: norm gains and rotations folded into the weights, saved and loaded as a Hugging Face
model (``larosa_<family>``)."""

from .folding import check_form, fold, fold_streamed, rotated, save_folded, weight_scaled
from .hf import folded_class
from .schema import FoldedSettings

__all__ = ["FoldedSettings", "check_form", "fold", "fold_streamed", "folded_class", "rotated", "save_folded",
           "weight_scaled"]
