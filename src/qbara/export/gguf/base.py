"""`export_gguf` / `write_gguf`: the base model as one GGUF file llama.cpp and transformers load."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_VERSION
from torch import nn

from qbara.atomic import write_file_atomic
from qbara.errors import QbaraError
from qbara.export.gguf.architectures import Architecture, extra_tensors
from qbara.export.gguf.checks import ARCH, check_architecture, check_path
from qbara.export.gguf.linears import DENSE_TYPES, Linear, refuse_inexact, resolve_linear
from qbara.export.gguf.metadata import (
    file_type,
    source_gguf,
    tokenizer_fields,
    write_hparams,
)
from qbara.export.gguf.provenance import model_name, provenance_fields
from qbara.export.gguf.report import ExportReport
from qbara.export.gguf.tensors import (
    EMBEDDING_TYPES,
    LinearStats,
    block_tensors,
    float_tensor,
    output_tensors,
    param_count,
    type_name,
)
from qbara.outputs import GGUF_MARK, output_file


def export_gguf(model: nn.Module, tokenizer, path, lossy: bool = False, *, embedding_type: str = "q8_0",
                tokenizer_gguf=None, name: str | None = None, overwrite: bool = False,
                base_model: str | None = None, adapter: str | None = None,
                separate_lora: bool = False, dense_type: str | None = None,
                output_type: str | None = None) -> ExportReport:
    """Check and lock the output `path` (a file qbara did not write is refused unless overwrite), then `write_gguf`."""
    with output_file(check_path(path), overwrite=overwrite, option="path"):
        return write_gguf(model, tokenizer, path, lossy, embedding_type=embedding_type,
                          tokenizer_gguf=tokenizer_gguf, name=name, base_model=base_model, adapter=adapter,
                          separate_lora=separate_lora, dense_type=dense_type, output_type=output_type)


def _check_options(embedding_type, lossy, dense_type=None, output_type=None) -> None:
    """Refuse an unknown type name or a non-bool `lossy` before anything is written (output_type None: the
    embedding's type)."""
    if embedding_type not in EMBEDDING_TYPES:
        raise QbaraError(f"unknown embedding_type {embedding_type!r}: choose one of {', '.join(EMBEDDING_TYPES)}")
    if output_type is not None and output_type not in EMBEDDING_TYPES:
        raise QbaraError(f"unknown output_type {output_type!r}: choose one of {', '.join(EMBEDDING_TYPES)}")
    if not isinstance(lossy, bool):
        raise QbaraError(f"lossy must be True or False, got {lossy!r}")
    if dense_type is not None and dense_type not in DENSE_TYPES:
        raise QbaraError(f"unknown dense_type {dense_type!r}: choose one of {', '.join(DENSE_TYPES)} (or None to "
                         f"refuse / re-quantize dense layers)")


def _resolve_linears(model: nn.Module, lossy: bool, separate_lora: bool, arch: Architecture,
                     dense: bool = False) -> list[list[Linear]]:
    """Every decoder block's linears, resolved before anything is written (a layer that cannot go is refused first)."""
    resolved = [[resolve_linear(f"model.layers.{i}.{slot.hf}", layer.get_submodule(slot.hf), lossy, separate_lora,
                                bias_ok=slot.bias, arch=arch.gguf_arch, dense=dense)
                 for slot in arch.linears] for i, layer in enumerate(model.model.layers)]
    if not lossy:
        refuse_inexact([item for row in resolved for item in row], dense)
    return resolved


def _model_tensors(model: nn.Module, resolved: list[list[Linear]], embedding_type: str,
                  arch: Architecture, dense_type: str | None = None, output_type: str | None = None):
    """(tensors in file order, linear-layer stats, embedding relative error)."""
    stats = LinearStats()
    arr, raw, emb_err = float_tensor("token_embd.weight", model.get_input_embeddings().weight, embedding_type)
    tensors = [("token_embd.weight", arr, raw)]
    for i, (layer, row) in enumerate(zip(model.model.layers, resolved)):
        tensors += block_tensors(i, layer, row, arch, model.config, stats, dense_type)
    tail, out_err = output_tensors(model, output_type or embedding_type, arch)
    extra = [(n, data, None) for n, data in extra_tensors(arch, model.config)]
    return tensors + tail + extra, stats, max(emb_err, out_err)


def _linear_names(arch: Architecture, blocks: int) -> set[str]:
    """Names of the blocks' linear weight tensors."""
    return {f"blk.{i}.{slot.gguf}.weight" for i in range(blocks) for slot in arch.linears}


def _linear_params(tensors, names: set[str]) -> dict[str, int]:
    """GGML type name -> weights of the linear layers stored in it."""
    out = {}
    for n, data, raw in tensors:
        if n in names:
            kind = type_name(data, raw)
            out[kind] = out.get(kind, 0) + param_count(data, raw)
    return out


def _bits_per_param(tensors, names=None) -> float:
    chosen = [(d, r) for n, d, r in tensors if names is None or n in names]
    params = sum(param_count(d, r) for d, r in chosen)
    return 8 * sum(d.nbytes for d, _ in chosen) / params if params else 0.0


def write_file(path: Path, header, tensors, arch: str = ARCH) -> None:
    """Write the GGUF atomically: `header(writer)` adds the metadata, then the tensors follow."""
    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, arch)
        header(writer)
        for tensor_name, data, raw_dtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomic(path, write)


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer, path, lossy: bool = False, *, embedding_type: str = "q8_0",
               tokenizer_gguf=None, name: str | None = None, base_model: str | None = None,
               adapter: str | None = None, separate_lora: bool = False,
               dense_type: str | None = None, output_type: str | None = None) -> ExportReport:
    """Write a model as a GGUF file llama.cpp runs at `path`, with the metadata, tensor names and weight transforms
    llama.cpp's converter writes for its architecture. Adapters that fold are merged on the fly.
    lossy: re-quantize the layers that cannot go exactly (else refused); dense_type "f32" / "f16": write them as
    floats instead; separate_lora: leave plain LoRA adapters out, for `export_gguf_lora`.
    embedding_type: the token embedding's type (q8_0, f16, f32 or another GGML block format); output_type: an
    untied lm_head's (default the embedding's), e.g. a llama.cpp preset's Q6_K output beside a Q4_K embedding.
    """
    start = time.perf_counter()
    path = check_path(path)
    arch = check_architecture(model)
    _check_options(embedding_type, lossy, dense_type, output_type)
    resolved = _resolve_linears(model, lossy, separate_lora, arch, dense=dense_type is not None)
    tensors, stats, emb_err = _model_tensors(model, resolved, embedding_type, arch, dense_type, output_type)
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    source = source_gguf(tokenizer, tokenizer_gguf)
    tok_fields = tokenizer_fields(tokenizer, vocab_size, source)
    general = provenance_fields(source, base_model, adapter, config=model.config, vocab_size=vocab_size,
                                arch=arch.gguf_arch)
    linear_names = _linear_names(arch, len(model.model.layers))
    linear_params = _linear_params(tensors, linear_names)

    def header(writer) -> None:
        writer.add_type("model")
        writer.add_name(model_name(model, name, base_model))
        for key, (value, vtype, sub_type) in general.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        write_hparams(writer, arch, model.config, len(model.model.layers), vocab_size, file_type(linear_params))
        tok_fields.write(writer)
        writer.add_uint32("general.quantization_version", int(GGML_QUANT_VERSION))
        writer.add_string("general.quantized_by", GGUF_MARK)  # how qbara.outputs knows its own files

    write_file(path, header, tensors, arch.gguf_arch)
    return ExportReport(
        path=path,
        size_bytes=path.stat().st_size,
        tensor_types={n: type_name(d, r) for n, d, r in tensors},
        exact_q4_1=stats.exact_q4_1,
        exact_ggml=stats.exact_ggml,
        exact_q5_1=stats.exact_q5_1,
        requantized=stats.requantized,
        requantize_error=stats.requantize_error,
        max_layer_error=stats.max_layer_error,
        embedding_type=embedding_type,
        embedding_error=emb_err,
        adapters_merged=sum(item.merged for row in resolved for item in row),
        adapters_separate=sum(item.separate for row in resolved for item in row),
        tokenizer_source=tok_fields.source,
        provenance={k: v[0] for k, v in general.items()},
        seconds=time.perf_counter() - start,
        linear_types=dict(stats.types),
        bits_per_param=_bits_per_param(tensors),
        linear_bits_per_param=_bits_per_param(tensors, linear_names),
        architecture=arch.gguf_arch,
        dense=stats.dense,
        dense_error=stats.dense_error,
    )
