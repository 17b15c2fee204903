"""The one per-tensor quantize path (`_fill`): tensors read one at a time from safetensors shards, a GGUF file
or a model's own state dict, each checked, hashed for the dense model's fingerprint and, for a target linear,
quantized straight into its packed buffers: no dense copy of the model exists. The other weights keep their
storage dtype and are cast to the compute dtype where used (`use_compute_dtype`)."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from qbara.adapters.attach import adapter_layers
from qbara.errors import QbaraError
from qbara.fingerprint import combine_fingerprint, tensor_fingerprint
from qbara.memory import release_freed_memory
from qbara.models.files import LOAD_ERRORS, load_config, one_line
from qbara.models.smollm2 import check_gguf_layout, gguf_config
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.quant.tensor import quantize
from qbara.state import enable_native_save, state_of
from qbara.targets import ALL_LINEAR, layer_configs, rounding_importance, set_submodule
from qbara.tensor_checks import check_tensor
from qbara.validate import SAFETENSORS_INDEX, check_config_sizes, check_hf_folder, safetensors_index_files

__all__ = ["empty_model", "quantize_model", "dequantize_model", "rank_rows", "rows_held"]

SINGLE = "model.safetensors"
INDEX = SAFETENSORS_INDEX
_RANK_ROWS: ContextVar[tuple[int, int] | None] = ContextVar("qbara_rank_rows", default=None)
_ROWS_HELD = "_qbara_rows_held"  # module attribute: leaf -> (full shape, (rank, world)) of each part it holds


@contextlib.contextmanager
def rank_rows(rank: int, world: int):
    """Within: `_fill` keeps of each parameter and packed buffer it sets only `rank`'s dim-0 chunk of `world` (the
    rows FSDP2's `fully_shard` would keep: ceil(rows / world) each, the last ones shorter or empty), noting the full
    shape (`rows_held`), so a loading rank holds its share plus the tensor in hand; `qbara.train.fsdp.shard_model`
    puts the parts into place. Until then the model cannot compute."""
    token = _RANK_ROWS.set((rank, world))
    try:
        yield
    finally:
        _RANK_ROWS.reset(token)


def rows_held(module: nn.Module) -> dict[str, tuple[torch.Size, tuple[int, int]]]:
    """leaf -> (full shape, (rank, world)) for each tensor of `module` held as one rank's rows (`rank_rows`)."""
    return getattr(module, _ROWS_HELD, {})


def _keep_rows(module: nn.Module, leaf: str, tensor: Tensor) -> Tensor:
    """`tensor`, or within `rank_rows` a copy of this rank's rows of it (its full shape noted on `module`)."""
    share = _RANK_ROWS.get()
    if share is None or tensor.dim() == 0 or tensor.is_meta:
        return tensor
    rank, world = share
    rows = tensor.shape[0]
    size = -(-rows // world)
    start = min(rank * size, rows)
    module.__dict__.setdefault(_ROWS_HELD, {})[leaf] = (tensor.shape, share)
    return tensor.narrow(0, start, min(size, rows - start)).clone()


def _keep_module_rows(new: QuantizedLinear, old: nn.Module) -> QuantizedLinear:
    """Within `rank_rows`: the packed buffers and bias of a new QuantizedLinear as this rank's rows (a bias
    already read as rows, into the layer it replaces, keeps its noted shape)."""
    if _RANK_ROWS.get() is None:
        return new
    if "bias" in rows_held(old):
        new.__dict__[_ROWS_HELD] = {"bias": rows_held(old)["bias"]}
    for name in new._buffer_names:
        new._buffers[name] = _keep_rows(new, name, new._buffers[name])
    if new.bias is not None and "bias" not in rows_held(new):
        new.bias = nn.Parameter(_keep_rows(new, "bias", new.bias.data), requires_grad=False)
    return new


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards of an HF folder (its index's files, or the single model.safetensors)."""
    if (folder / INDEX).is_file():
        return safetensors_index_files(folder)
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise QbaraError(f"{folder}: quantize-on-load reads safetensors checkpoints and finds none ({SINGLE} or "
                     f"{INDEX}); convert the checkpoint to safetensors, or load it without quant=")


def default_compute_dtype(device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (bf16 matmul is slow on CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_quantized_stream(folder, quant: QuantConfig | Mapping[str, QuantConfig], modules=ALL_LINEAR,
                          dtype: torch.dtype | None = None, device="cpu", progress: bool = False):
    """The causal LM of an HF folder (eval, frozen), target linears quantized as read, others in `dtype`."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    check_hf_folder(folder, files)  # config values and sizes, shard headers: before anything is built
    config = load_config(folder)
    return stream_checkpoint(config, safetensors_reader(files), folder, quant, modules,
                             dtype or checkpoint_dtype(files[0]), device, progress)


def load_gguf_stream(path, quant: QuantConfig | Mapping[str, QuantConfig], modules=ALL_LINEAR,
                     dtype: torch.dtype | None = None, device="cpu", progress: bool = False):
    """The causal LM in a GGUF file, each tensor dequantized by gguf-py and quantized at once if targeted;
    other weights in `dtype` (default fp32)."""
    path = Path(path)
    check_gguf_layout(path)
    config = gguf_config(path)  # its values checked before transformers computes with them
    check_config_sizes(config.to_dict(), path.stat().st_size, path)
    return stream_checkpoint(config, lambda model: _gguf_tensors(path, model), path, quant, modules,
                             dtype or torch.float32, device, progress)


def _gguf_tensors(path: Path, model):
    """(HF name, loader, where) for each tensor of a GGUF file, in file order, each dequantized when reached."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    processor = TENSOR_PROCESSORS.get(model.config.model_type, TensorProcessor)(config=parsed.get("config", {}))
    mapping = get_gguf_hf_weights_map(model, processor)
    for tensor in GGUFReader(str(path)).tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name not in mapping:
            continue
        weights = torch.from_numpy(np.copy(result.weights))
        yield mapping[result.name], (lambda weights=weights: weights), f"{path}: {tensor.name}"
        del weights, result


def empty_model(config, storage: torch.dtype, source="the model config"):
    """The causal LM of `config` on meta tensors; a config it cannot build is one QbaraError."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=storage)
    except LOAD_ERRORS as exc:
        raise QbaraError(f"{source}: cannot build the model its config describes ({one_line(exc)}); the config is "
                         f"damaged (fix the value or get the model again)") from None


def _open_safetensors(file: Path):
    """safe_open on a shard; a refusal is one QbaraError naming the file."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as err:
        raise QbaraError(f"{file}: not a readable safetensors file ({' '.join(str(err).split())[:200]}); the file "
                         f"is damaged, write it again") from None


def safetensors_reader(files: list[Path]):
    """read(model) for `stream_checkpoint`: (key, load, where) for every tensor of the shards, in file order."""

    def read(model):
        for file in files:
            with _open_safetensors(file) as reader:
                for key in reader.keys():
                    yield key, (lambda reader=reader, key=key: reader.get_tensor(key)), f"{file}: {key}"
            release_freed_memory()

    return read


def stream_checkpoint(config, read, source, quant, modules, storage: torch.dtype, device, progress: bool, packed=None,
            importance=None):
    """Fill a weightless skeleton of `config` from `read(model)`'s (key, load, where) triples.
    packed: layer name -> ready QuantizedTensor (an LQ-LoRA / LoftQ Q) used instead of quantizing that weight, which
    is still read and hashed. importance: layer name -> rounding importance for gguf:* layers."""
    model = empty_model(config, storage, source)
    per_layer = layer_configs(model, quant, modules)  # shapes checked on the skeleton, before any read
    plain = {n: c for n, c in per_layer.items() if n not in (packed or {})}
    importance = rounding_importance(plain, importance, require_gguf=False)
    expected = set(model.state_dict())
    tied = getattr(config, "tie_word_embeddings", False)
    # a tied lm_head missing from the checkpoint is hashed as the embedding is read (under `rank_rows` only this
    # rank's rows of it are kept)
    names = {module: name for name, module in model.named_modules()}
    alias = {f"{names[model.get_input_embeddings()]}.weight": f"{names[model.get_output_embeddings()]}.weight"} \
        if tied and model.get_output_embeddings() is not None else {}
    digests, unexpected = _fill(model, read, per_layer, importance, "quantize on load", progress, device=device,
                                storage=storage, packed=packed, alias=alias)
    if tied:
        model.tie_weights()
    missing = sorted(expected - set(digests))
    if missing or unexpected:
        raise QbaraError(f"{source}: the checkpoint does not fit its config for quantize-on-load (missing "
                         f"{missing[:3]}, unexpected {sorted(unexpected)[:3]}); load it without quant= (transformers "
                         f"may rename its keys) or fix the checkpoint")
    model.requires_grad_(False)
    model.eval()
    use_compute_dtype(model, default_compute_dtype(device))
    state = state_of(model)
    state.base_fingerprint, state.loaded_quant = combine_fingerprint(config, digests), quant
    return enable_native_save(model)


def _fill(model: nn.Module, read, per_layer: Mapping[str, QuantConfig], importance: Mapping[str, Tensor], desc: str,
          progress: bool, device=None, storage: torch.dtype | None = None, packed=None, checked: bool = True,
          hashed: bool = True, alias: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The per-tensor loop: load, check shape (`checked`), hash (`hashed`), then quantize a target linear
    (`per_layer`, or take its `packed` tensor) or, given `storage`, cast and set it into the skeleton. device: where
    results go (None: where they are). alias: key -> another key hashed from the same tensor where the checkpoint
    has none of its own (a tied lm_head). Returns (key -> digest, keys the model has no place for)."""
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}  # meta shapes for a skeleton
    triples = read(model)
    digests, unexpected = {}, []
    total = len(triples) if isinstance(triples, list) else len(shapes)
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for key, load, where in triples:
            if key not in shapes:
                unexpected.append(key)
                continue
            tensor = load()
            if checked:
                check_tensor(tensor, where, shape=shapes[key], floating=False)
            if hashed:
                digests[key] = tensor_fingerprint(key, tensor)
            module_name, _, leaf = key.rpartition(".")
            if leaf == "weight" and module_name in per_layer:
                old = model.get_submodule(module_name)
                if packed is not None and module_name in packed:
                    qtensor = packed[module_name].to(device)
                else:  # in its own dtype: the quantizer makes fp32 copies of a few rows at a time
                    qtensor = quantize(tensor if device is None else tensor.to(device=device),
                                       per_layer[module_name], name=module_name, importance=importance.get(module_name))
                set_submodule(model, module_name, _keep_module_rows(QuantizedLinear(qtensor, old.bias), old))
                del qtensor
            elif storage is not None:
                kept = _own_copy(tensor, device, storage)
                if hashed and key in (alias or {}) and alias[key] not in digests:
                    digests[alias[key]] = tensor_fingerprint(alias[key], kept)  # as the tied weight is kept
                _set_tensor(model, key, kept)
                del kept
            del tensor
            if _RANK_ROWS.get() is not None:  # hand the whole tensor's freed pages back now: the peak is the share
                release_freed_memory()
            bar.update(1)
    release_freed_memory()
    return digests, unexpected


def _own_copy(tensor: Tensor, device, storage: torch.dtype) -> Tensor:
    """A kept weight in `storage` on `device`, never sharing memory with the tensor read: safetensors hands out
    views into its memory-mapped shard, and one kept view (a norm) would keep the whole shard mapped and counted in
    the process's RSS after loading. One tensor is copied at a time, only when the cast made no copy."""
    cast = tensor.to(device=device, dtype=storage if tensor.is_floating_point() else None)
    if cast.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        cast = cast.clone()
    return cast


def _own_tensors(keys: list[str], model: nn.Module) -> list:
    """`_fill`'s source for a model in memory, fetched lazily so a dense weight is freed once quantized."""
    triples = []
    for key in keys:
        module_name, _, leaf = key.rpartition(".")
        triples.append((key, functools.partial(_get_tensor, model, module_name, leaf), key))
    return triples


def _get_tensor(model: nn.Module, module_name: str, leaf: str) -> Tensor:
    return getattr(model.get_submodule(module_name), leaf).detach()


def _quantize_in_place(model: nn.Module, quant, modules, progress: bool, importance, hashed: bool) -> dict[str, str]:
    """Quantize the target linears of a model in memory through `_fill`; returns the dense tensors' digests."""
    per_layer = layer_configs(model, quant, modules)  # every shape checked before any layer is replaced
    importance = rounding_importance(per_layer, importance)
    # every tensor when hashed (the dense model's fingerprint), else only the weights it quantizes
    keys = list(model.state_dict()) if hashed else [f"{name}.weight" for name in per_layer]
    digests, _ = _fill(model, functools.partial(_own_tensors, keys), per_layer, importance, "quantizing", progress,
                       checked=False, hashed=hashed)
    return digests


def quantize_model(model: nn.Module, quant: QuantConfig | Mapping[str, QuantConfig], modules=ALL_LINEAR,
                   progress: bool = False, importance: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Replace the selected nn.Linear layers (all but lm_head by default) by QuantizedLinear, in place.
    `quant`: one config, or layer name -> config (exactly those layers). `importance`: layer name -> rounding importance
    (per column or per weight), required for every gguf:* layer, as llama-quantize's imatrix."""
    _quantize_in_place(model, quant, modules, progress, importance, hashed=False)
    return enable_native_save(model)


def quantize_loaded_model(model: nn.Module, quant, modules=ALL_LINEAR, progress: bool = False) -> nn.Module:
    """`quantize_model` that also records the dense fingerprint and the quant, as a streamed load does."""
    digests = _quantize_in_place(model, quant, modules, progress, None, hashed=True)
    state = state_of(model)
    state.base_fingerprint, state.loaded_quant = combine_fingerprint(model.config, digests), quant
    return enable_native_save(model)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear by an fp32 nn.Linear of its dequantized weight, in place; adapters must
    be merged first. The model then forgets its base, so a later `prepare` quantizes afresh."""
    if adapter_layers(model):
        raise QbaraError("this model still has adapters: merge them first (qbara.merge(model, into='dense')), "
                         "then dequantize")
    state = state_of(model)
    dequantized = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for name in dequantized:
        set_submodule(model, name, model.get_submodule(name).to_linear())
    if dequantized:  # another base now: neither its fingerprint nor the quant it was loaded with describe it
        state.forget_base()
    return model


def checkpoint_dtype(file: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a safetensors file, from its header."""
    with _open_safetensors(file) as reader:
        for key in reader.keys():
            dtype = reader.get_slice(key).get_dtype()
            resolved = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype)
            if resolved is not None:
                return resolved
    return torch.float32


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(_keep_rows(module, leaf, tensor), requires_grad=False)
    else:
        module._buffers[leaf] = tensor


# ---------------------------------------------------------------- storage dtype vs compute dtype


class UpcastEmbedding(nn.Embedding):
    """An embedding stored in a narrow dtype whose looked-up rows come out in the compute dtype."""

    compute_dtype = torch.float32

    def forward(self, ids):
        return super().forward(ids).to(self.compute_dtype)


class _UpcastMatmul(torch.autograd.Function):
    """x W^T (+ b) with W cast to x's dtype in forward and backward, so autograd saves the narrow weight."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return grad_out @ weight.to(grad_out.dtype), None, None


class UpcastLinear(nn.Linear):
    """A frozen linear (lm_head) stored in a narrow dtype, applied in its input's dtype."""

    def forward(self, x):
        trainable = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if self.weight.dtype == x.dtype or trainable:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return nn.functional.linear(x, self.weight.to(x.dtype), bias)
        return _UpcastMatmul.apply(x, self.weight, self.bias)


def use_compute_dtype(model: nn.Module, compute: torch.dtype, every_linear: bool = False) -> nn.Module:
    """Make a narrow-stored embedding / lm_head (`every_linear`: every frozen linear) compute in `compute`."""
    embedding = model.get_input_embeddings()
    if embedding is None or embedding.weight.dtype == compute:
        return model
    if type(embedding) is nn.Embedding:
        embedding.__class__ = UpcastEmbedding
        embedding.compute_dtype = compute
    output = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is nn.Linear] if every_linear else [output]
    for linear in linears:
        if linear is not None and type(linear) is nn.Linear:
            linear.__class__ = UpcastLinear
    return model

