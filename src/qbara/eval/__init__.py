"""Evaluation: perplexity over non-overlapping windows, and the masked loss of instruction records."""

from qbara.eval.loss import masked_loss
from qbara.eval.perplexity import PerplexityResult, make_windows, perplexity, text_perplexity

__all__ = ["masked_loss", "PerplexityResult", "make_windows", "perplexity", "text_perplexity"]
