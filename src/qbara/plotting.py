"""Matplotlib without a display, and figures written atomically as PNG."""
from __future__ import annotations

from pathlib import Path

from qbara.atomic import write_file_atomic

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Write `fig` to `path` as PNG through `write_file_atomic`, then close it."""
    try:
        return write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
