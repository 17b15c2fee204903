"""Evaluation: perplexity over non-overlapping windows."""

from qbara.eval.perplexity import PerplexityResult, make_windows, perplexity, text_perplexity

__all__ = ["PerplexityResult", "make_windows", "perplexity", "text_perplexity"]
