"""What a GGUF export accepts: a model of an architecture in the table, and an output path ending in .gguf."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from qbara.errors import QbaraError
from qbara.export.gguf.architectures import Architecture, architecture_of

ARCH = "llama"  # the GGUF architecture of LLaMA-architecture models (SmolLM2's shipped file)


def check_architecture(model: nn.Module) -> Architecture:
    """The table entry of `model`'s architecture, or a QbaraError saying what llama.cpp would not reproduce."""
    return architecture_of(model)


def check_llama(model: nn.Module) -> Architecture:
    """The same as `check_architecture`."""
    return check_architecture(model)


def check_path(path) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise QbaraError(f"GGUF output path {str(path)!r} must end in .gguf (e.g. model.gguf)")
    if path.is_dir():
        raise QbaraError(f"GGUF output path {str(path)!r} is a directory; give a file name such as "
                         f"{str(path / 'model.gguf')!r}")
    return path
