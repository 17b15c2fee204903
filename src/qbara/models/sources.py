"""A checkpoint to quantize, seen one way whether it is a safetensors folder (streamed one matrix at a time; the
dense model is never built) or a dense model in memory: its weightless skeleton, its weights looked up lazily, the
file budget of a GGUF made from it, the dense model for calibration, and the model quantized from it. LQ-LoRA
(models.lq) and the GGUF mix (export.gguf.mix) plan and build through it."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qbara.errors import QbaraError
from qbara.lazy_tensors import LazyTensors
from qbara.lq.filesize import FileBudget
from qbara.models.files import load_config, load_tokenizer
from qbara.models.loader import embedded_folder, load_model
from qbara.models.quantized_io import is_quantized_folder
from qbara.models.streaming import (
    INDEX,
    SINGLE,
    checkpoint_dtype,
    checkpoint_files,
    default_compute_dtype,
    empty_model,
    quantize_model,
    safetensors_reader,
    stream_checkpoint,
    use_compute_dtype,
)
from qbara.quant.config import QuantConfig
from qbara.state import state_of
from qbara.targets import rounding_importance
from qbara.validate import check_hf_folder

__all__ = ["FolderSource", "ModelSource", "open_checkpoint", "checkpoint_folder", "checkpoint_file_budget",
           "load_calibration_model"]


class FolderSource:
    """A safetensors folder: checked (no custom code, sizes the weights can hold) before anything is built, planned
    on a weightless skeleton, read one matrix at a time, quantized while streamed."""

    def __init__(self, folder: Path, tokenizer=None):
        self.folder, self.files = Path(folder), checkpoint_files(folder)
        check_hf_folder(self.folder, self.files)
        self.storage = checkpoint_dtype(self.files[0])
        self.config = load_config(self.folder)
        self.skeleton = _skeleton(self.config, self.storage, self.folder)
        self.model = None
        self.dense_fingerprint = None  # hashed while the shards are streamed (`quantize`)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    def weights(self, names) -> LazyTensors:
        return LazyTensors.from_files(self.files, {n: f"{n}.weight" for n in names})

    def file_budget(self, targets="all-linear", **options) -> FileBudget:
        """`FileBudget.of_model` on the skeleton (options: embedding_format, output_format, extra_shapes)."""
        return FileBudget.of_model(self.skeleton, targets, **options)

    def dense(self) -> nn.Module:
        """The dense model for calibration, loaded now in the checkpoint's dtype (2 bytes/param for bf16)."""
        return load_calibration_model(self.folder)[0]

    def quantize(self, layers: Mapping[str, QuantConfig], importance=None, progress: bool = True,
                 packed: Mapping | None = None) -> nn.Module:
        """The model streamed from the shards with `layers` quantized (`packed`: ready QuantizedTensors used
        instead of quantizing those weights, e.g. LQ-LoRA's Q); the dense fingerprint is hashed on the way."""
        model = stream_checkpoint(self.config, safetensors_reader(self.files), self.folder, layers, "all-linear",
                                  self.storage, "cpu", progress, packed=packed, importance=importance)
        self.dense_fingerprint = state_of(model).base_fingerprint
        return model


class ModelSource:
    """A dense model in memory: planned on itself, its weights looked up as they are, quantized in place."""

    folder = None

    def __init__(self, model: nn.Module, tokenizer=None):
        if not isinstance(model, nn.Module):
            raise QbaraError(f"expected a dense model (qbara.load_model) or a checkpoint folder, got "
                             f"{type(model).__name__}")
        self.model = self.skeleton = model
        self.config = getattr(model, "config", None)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise QbaraError("a model in memory needs its tokenizer: pass tokenizer=tokenizer")
        return self._tokenizer

    def weights(self, names) -> LazyTensors:
        return LazyTensors.from_tensors({n: self.model.get_submodule(n).weight.detach() for n in names})

    def file_budget(self, targets="all-linear", **options) -> FileBudget:
        return FileBudget.of_model(self.model, targets, **options)

    def dense(self) -> nn.Module:
        return self.model

    def quantize(self, layers: Mapping[str, QuantConfig], importance=None, progress: bool = True) -> nn.Module:
        """The model itself with `layers` quantized in place (rounding importance for their gguf:* layers)."""
        weighted = rounding_importance(layers, importance, require_gguf=False)
        if layers:
            quantize_model(self.model, dict(layers), progress=progress, importance=weighted or None)
        return self.model


def open_checkpoint(source, tokenizer=None, *, load: bool = False) -> FolderSource | ModelSource:
    """A model in memory, or a name / path: its safetensors folder streamed; with `load`, a name with no folder
    (e.g. tiny-llama) is loaded into memory, otherwise refused."""
    if isinstance(source, nn.Module):
        return ModelSource(source, tokenizer)
    if not isinstance(source, (str, Path)):
        raise QbaraError(f"expected a model, a model name or a checkpoint folder, got {type(source).__name__}")
    folder = checkpoint_folder(source)
    if folder is not None:
        return FolderSource(folder, tokenizer)
    if not load:
        raise QbaraError(f"{str(source)!r} is not a folder of safetensors shards to stream from; load the model "
                         f"(qbara.load_model) and pass the model instead")
    model, loaded_tokenizer = load_model(str(source))
    return ModelSource(model.eval(), tokenizer or loaded_tokenizer)


def checkpoint_folder(name_or_path) -> Path | None:
    """The safetensors HF folder behind a model name, or None when there is none to stream from."""
    embedded = embedded_folder(name_or_path)
    if embedded is not None:
        return embedded
    path = Path(str(name_or_path)).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file() or is_quantized_folder(path):
        return None
    return path if (path / SINGLE).is_file() or (path / INDEX).is_file() else None


def checkpoint_file_budget(name_or_path, targets="all-linear", **options) -> FileBudget:
    """`FileBudget.of_model` for a safetensors folder, from its config alone (after `check_hf_folder`)."""
    folder = checkpoint_folder(name_or_path)
    if folder is None:
        raise QbaraError(f"{str(name_or_path)!r} is not a safetensors checkpoint folder; load the model and use "
                         f"FileBudget.of_model(model)")
    return FolderSource(folder).file_budget(targets, **options)


def load_calibration_model(folder):
    """(model, tokenizer): a folder's dense model in the checkpoint's dtype, computing in fp32."""
    model, tokenizer = load_model(str(folder), dtype=checkpoint_dtype(checkpoint_files(Path(folder))[0]))
    return use_compute_dtype(model, default_compute_dtype("cpu"), every_linear=True), tokenizer


def _skeleton(config, storage: torch.dtype, folder: Path) -> nn.Module:
    """The weightless model, its head tied to the embedding where the config says so (as loading does)."""
    skeleton = empty_model(config, storage, folder)
    if getattr(config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    return skeleton
