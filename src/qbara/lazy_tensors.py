"""A mapping whose tensors are read from memory-mapped safetensors files (or taken from a model's weights) on each
lookup, so code written for a dict of weights (LQ-LoRA's tables and decompositions) runs over a checkpoint holding
one matrix at a time."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qbara.errors import QbaraError
from qbara.tensor_checks import check_tensor

__all__ = ["LazyTensors", "tensor_shapes"]


class LazyTensors(Mapping):
    """name -> tensor produced by `read(name)` on each lookup, uncached (the memory held is what the caller keeps);
    `shapes` answers without reading."""

    def __init__(self, read: Callable[[str], torch.Tensor], shapes: Mapping[str, tuple[int, ...]]):
        self._read = read
        self.shapes = dict(shapes)

    @classmethod
    def from_files(cls, files, names: Mapping[str, str] | None = None, dtype: torch.dtype | None = torch.float32
                   ) -> "LazyTensors":
        """Over the tensors of safetensors `files`, all by key or `names` (name -> key) only; each read as `dtype`
        (None: the file's) and checked."""
        where = {key: Path(file) for file in files for key in _keys(Path(file))}
        names = dict(names) if names is not None else {key: key for key in where}
        missing = sorted(key for key in names.values() if key not in where)
        if missing:
            raise QbaraError(f"{', '.join(str(f) for f in files)}: no tensor {missing[:3]}; the checkpoint does not "
                             f"fit its config")
        locations = {name: (where[key], key) for name, key in names.items()}
        return cls(partial(_read_file, locations, dtype), _file_shapes(locations))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "LazyTensors":
        """Over tensors in memory, each returned as it is, nothing copied."""
        tensors = dict(tensors)
        return cls(tensors.__getitem__, {name: tuple(t.shape) for name, t in tensors.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _read_file(locations: Mapping[str, tuple[Path, str]], dtype: torch.dtype | None, name: str) -> torch.Tensor:
    file, key = locations[name]
    with _open(file) as reader:
        tensor = reader.get_tensor(key)
    check_tensor(tensor, f"{file}: {key}")
    return tensor if dtype is None else tensor.to(dtype)


def _file_shapes(locations: Mapping[str, tuple[Path, str]]) -> dict[str, tuple[int, ...]]:
    """name -> shape from the files' headers, each file opened once."""
    shapes = {}
    by_file: dict[Path, list[str]] = {}
    for name, (file, _) in locations.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as reader:
            for name in names:
                shapes[name] = tuple(reader.get_slice(locations[name][1]).get_shape())
    return {name: shapes[name] for name in locations}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise QbaraError(f"{file}: not a readable safetensors file ({err}); the file is damaged") from None


def _keys(file: Path) -> list[str]:
    with _open(file) as reader:
        return list(reader.keys())


def tensor_shapes(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """name -> shape of a dict of tensors, or of a `LazyTensors` without reading it."""
    shapes = getattr(weights, "shapes", None)
    if shapes is not None:
        return dict(shapes)
    return {name: tuple(tensor.shape) for name, tensor in weights.items()}
