"""Tensors of safetensors files read on demand: a mapping whose values are loaded from the memory-mapped file
each time they are looked up and dropped by the caller, so code written for a dict of weights (LQ-LoRA's
error tables and decompositions) runs over a checkpoint holding one matrix at a time."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from qbara.errors import QbaraError
from qbara.tensor_checks import check_tensor

__all__ = ["LazyTensors", "tensor_shapes"]


class LazyTensors(Mapping):
    """name -> tensor, each read from `(file, key)` when looked up (as `dtype`, default float32) and checked
    (float, finite, sane magnitude). `shapes` answers shape questions from the file headers without reading.

    Nothing is cached: every lookup reads the file again (the page cache makes repeats cheap), so the
    memory held is what the caller keeps.
    """

    def __init__(self, locations: Mapping[str, tuple[Path, str]], dtype: torch.dtype | None = torch.float32):
        self.locations = {name: (Path(file), key) for name, (file, key) in locations.items()}
        self.dtype = dtype
        self.shapes = self._read_shapes()

    @classmethod
    def from_files(cls, files, names: Mapping[str, str] | None = None, dtype: torch.dtype | None = torch.float32
                   ) -> "LazyTensors":
        """Over the tensors of safetensors `files`: all of them by key, or `names` (name -> key) only."""
        where = {key: Path(file) for file in files for key in _keys(Path(file))}
        names = dict(names) if names is not None else {key: key for key in where}
        missing = sorted(key for key in names.values() if key not in where)
        if missing:
            raise QbaraError(f"{', '.join(str(f) for f in files)}: no tensor {missing[:3]}; the checkpoint does not "
                             f"fit its config")
        return cls({name: (where[key], key) for name, key in names.items()}, dtype)

    def _read_shapes(self) -> dict[str, tuple[int, ...]]:

        shapes = {}
        by_file: dict[Path, list[str]] = {}
        for name, (file, _) in self.locations.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with _open(file) as reader:
                for name in names:
                    shapes[name] = tuple(reader.get_slice(self.locations[name][1]).get_shape())
        return {name: shapes[name] for name in self.locations}

    def __getitem__(self, name: str) -> torch.Tensor:
        file, key = self.locations[name]
        with _open(file) as reader:
            tensor = reader.get_tensor(key)
        check_tensor(tensor, f"{file}: {key}")
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.locations)

    def __len__(self) -> int:
        return len(self.locations)


def _open(file: Path):
    from safetensors import SafetensorError, safe_open

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
