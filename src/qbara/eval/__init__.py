"""Evaluation: perplexity over non-overlapping windows, and the masked loss of instruction records."""

from qbara.eval.perplexity import perplexity

__all__ = ["perplexity"]
